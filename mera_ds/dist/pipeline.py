"""The pipeline driver: walks the modalities in order and runs each one's stages on Ray:
(align), finetune, replay sampling, merge (from the second modality on), realign, evaluate.

Each finished stage is recorded in RUN/manifest.json (mera_ds.manifest), so `--resume` skips
what is recorded and re-runs the rest.
"""
from __future__ import annotations

import logging
import os

from mera_ds.config import RunConfig
from mera_ds.layout import RunLayout
from mera_ds.manifest import Manifest
from mera_ds.storage import join

log = logging.getLogger("mera_ds.pipeline")

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
    stage = manifest.run

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
    return manifest.timings
