"""The pipeline driver: walks the modalities in order and runs each one's stages on Ray.

Built so far: (align), finetune (Ray Train jobs) and merge (the merge actor). Replay sampling,
realign, evaluation, the run manifest and `--resume` are not built yet; the driver says so
rather than pretending to run them.
"""
from __future__ import annotations

import logging
import time

from mera_ds.config import RunConfig
from mera_ds.errors import MeraError
from mera_ds.layout import RunLayout
from mera_ds.storage import exists, join

log = logging.getLogger("mera_ds.pipeline")

NOT_BUILT = ("replay", "realign", "evaluate")


def run_pipeline(cfg: RunConfig, source: str = "<config>") -> dict:
    """Run every built stage of every modality; return {stage name: seconds}."""
    from mera_ds.dist.cluster import connect
    from mera_ds.dist.merge_actor import merge_on_ray
    from mera_ds.dist.train_job import run_stage

    layout = RunLayout.of(cfg)
    if exists(join(layout.run_dir, "stages")):
        raise MeraError(f"{layout.run_dir}: this run already has stages; resuming a run is not "
                        f"built yet, so choose another run_dir or remove this one")
    connect(cfg.cluster.ray_address)
    timings = {}
    for modality in layout.order:
        i = layout.index(modality)
        stages = (["align"] if cfg.stages.align.enabled else []) + ["finetune"]
        for stage in stages:
            t0 = time.time()
            metrics = run_stage(cfg, stage, modality, source=source)
            timings[f"{i:02d}-{modality}/{stage}"] = time.time() - t0
            log.info("stage %02d %s %s: loss %.3f -> %.3f in %.0f s", i, modality, stage,
                     metrics.get("first_loss", float("nan")), metrics.get("loss", float("nan")),
                     timings[f"{i:02d}-{modality}/{stage}"])
        if i >= 2:
            t0 = time.time()
            report = merge_on_ray(layout.stage_llm(layout.previous(modality)),
                                  [layout.finetune_llm(modality)], layout.merge_llm(modality),
                                  cfg.stages.merge, step=i)
            timings[f"{i:02d}-{modality}/merge"] = time.time() - t0
            log.info("stage %02d %s merge (%s, step %d): %d tensors in %.1f s", i, modality,
                     report.strategy, i, report.tensors, report.seconds)
    log.warning("not built yet, so not run: %s. The run holds finetuned and merged LLMs and "
                "connectors, but no realigned connectors, performance matrix or BRG.",
                ", ".join(NOT_BUILT))
    return timings
