"""The pipeline driver: walks the modalities in order and runs each one's stages on Ray:
(align), finetune, replay sampling, merge (from the second modality on), realign, evaluate.

Each finished stage is recorded in RUN/manifest.json with its outputs and result, written last,
so `--resume` skips what is recorded and re-runs the rest. Whatever an interrupted stage left
behind is not recorded, hence not trusted: it is removed before the stage runs again.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time

from mera_ds.config import RunConfig
from mera_ds.errors import MeraError
from mera_ds.layout import RunLayout
from mera_ds.storage import exists, join, read_json, url_to_fs, write_json

log = logging.getLogger("mera_ds.pipeline")

# Settings that may change between a run and its resume: where it runs, not what it computes.
NOT_HASHED = {("cluster", "ray_address")}


def _flat(d: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in d.items():
        key = prefix + (k,)
        if isinstance(v, dict):
            out.update(_flat(v, key))
        elif key not in NOT_HASHED:
            out[key] = v
    return out


def _fingerprint(cfg: RunConfig) -> dict:
    return {".".join(k): v for k, v in _flat(cfg.model_dump(mode="json")).items()}


class Manifest:
    """RUN/manifest.json: the config the run was started with and the stages it finished."""

    def __init__(self, url: str, config: dict, stages: dict):
        self.url, self.config, self.stages = url, config, stages

    @classmethod
    def open(cls, cfg: RunConfig, resume: bool) -> "Manifest":
        layout = RunLayout.of(cfg)
        url, config = layout.manifest, _fingerprint(cfg)
        if not exists(url):
            if exists(join(layout.run_dir, "stages")):
                if not resume:
                    raise MeraError(f"{layout.run_dir}: holds stages but no manifest; run with "
                                    f"--resume to continue it, or choose another run_dir")
                log.warning("%s: no manifest; every stage runs again", layout.run_dir)
            return cls(url, config, {})
        data = read_json(url)
        if not resume:
            raise MeraError(f"{layout.run_dir}: a run is already there "
                            f"({len(data['stages'])} stages done); add --resume to continue it, "
                            f"or choose another run_dir")
        changed = sorted(k for k in set(config) | set(data["config"])
                         if config.get(k) != data["config"].get(k))
        if changed:
            k = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise MeraError(f"{url}: the config changed since this run started: {k} was "
                            f"{data['config'].get(k)!r}, is {config.get(k)!r}{more}")
        return cls(url, config, data["stages"])

    def record(self, name: str, outputs: list[str], result: dict, seconds: float) -> None:
        self.stages[name] = {"outputs": outputs, "result": result, "seconds": seconds,
                             "finished": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        write_json(self.url, {"version": 1, "config": self.config, "stages": self.stages})


def _remove(url: str) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        log.warning("removing %s: left by an interrupted stage, not in the manifest", url)
        fs.rm(path, recursive=True)


def _evaluate_task(cfg: RunConfig, modality: str, llm_dir: str, connectors: dict) -> dict:
    import torch

    from mera_ds.stages.evaluate import evaluate, write_metrics

    device = "cuda" if cfg.cluster.use_gpu and torch.cuda.is_available() else "cpu"
    result = evaluate(cfg, modality, llm_dir=llm_dir, connectors=connectors, device=device)
    write_metrics(RunLayout.of(cfg).eval_metrics(modality), result)
    return result


def run_pipeline(cfg: RunConfig, source: str = "<config>", resume: bool = False) -> dict:
    """Run (or resume) every stage of every modality; return {stage: seconds} of the stages run
    now. Results are in the run directory (manifest, eval/metrics.json of every stage)."""
    import ray

    from mera_ds.data.replay import sample_replay
    from mera_ds.dist.cluster import connect
    from mera_ds.dist.merge_actor import merge_on_ray
    from mera_ds.dist.train_job import run_stage

    layout = RunLayout.of(cfg)
    manifest = Manifest.open(cfg, resume)
    connect(cfg.cluster.ray_address)
    timings = {}

    def stage(name: str, outputs: list[str], fn, *args, **kwargs) -> dict:
        if name in manifest.stages:
            log.info("%s: done earlier, skipped", name)
            return manifest.stages[name]["result"]
        for url in outputs:
            _remove(url)
        t0 = time.time()
        result = fn(*args, **kwargs)
        if dataclasses.is_dataclass(result):
            result = dataclasses.asdict(result)
        timings[name] = time.time() - t0
        manifest.record(name, outputs, result, timings[name])
        return result

    for modality in layout.order:
        i, tag = layout.index(modality), f"{layout.index(modality):02d}-{modality}"
        here = layout.stage_dir(modality)
        if cfg.stages.align.enabled:
            stage(f"{tag}/align", [join(here, "align")], run_stage, cfg, "align", modality,
                  source=source)
        m = stage(f"{tag}/finetune", [join(here, "finetune", "llm"),
                                      join(here, "finetune", "connectors")],
                  run_stage, cfg, "finetune", modality, source=source)
        log.info("%s finetune: loss %.3f -> %.3f", tag, m["first_loss"], m["loss"])
        if cfg.stages.realign.enabled:
            r = stage(f"{tag}/replay", [layout.replay_dir(modality)], lambda: ray.get(
                ray.remote(num_cpus=1)(sample_replay).remote(
                    cfg.modality(modality).train_shards, layout.replay_dir(modality),
                    cfg.stages.realign.replay_ratio, cfg.seed,
                    num_shards=cfg.cluster.num_workers)))
            log.info("%s replay: %d of %d samples", tag, r["samples"], r["source_samples"])
        if i >= 2:
            r = stage(f"{tag}/merge", [layout.merge_llm(modality)], merge_on_ray,
                      layout.stage_llm(layout.previous(modality)),
                      [layout.finetune_llm(modality)], layout.merge_llm(modality),
                      cfg.stages.merge, step=i)
            log.info("%s merge (%s, step %d): %d tensors", tag, r["strategy"], i, r["tensors"])
        if cfg.stages.realign.enabled:
            m = stage(f"{tag}/realign", [join(here, "realign")], run_stage, cfg, "realign",
                      modality, source=source)
            log.info("%s realign: loss %.3f -> %.3f", tag, m["first_loss"], m["loss"])
            connectors = {c: layout.realign_connector(modality, c)
                          for c in layout.learned(modality)}
        else:
            connectors = {c: layout.finetune_connector(c) for c in layout.learned(modality)}
        task = ray.remote(num_cpus=1, num_gpus=1 if cfg.cluster.use_gpu else 0)(_evaluate_task)
        result = stage(f"{tag}/evaluate", [os.path.dirname(layout.eval_metrics(modality))],
                       lambda: ray.get(task.remote(cfg, modality, layout.stage_llm(modality),
                                                   connectors)))
        log.info("%s evaluate: %s", tag,
                 ", ".join(f"{k} {v:.3f}" for k, v in result["scores"].items()))
    return timings
