"""A training stage as a Ray Train TorchTrainer job: one worker per GPU (gloo on CPU, nccl on
GPU), ranks and addresses from Ray, resume state in Ray checkpoints under the run directory, and
FailureConfig restarting a job whose worker died."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

from mera_ds.config import RunConfig, parse_config
from mera_ds.errors import MeraError
from mera_ds.layout import RunLayout
from mera_ds.storage import is_remote

log = logging.getLogger("mera_ds.dist")

# The stages that run as training jobs: name -> "module:function" building their JobSpec.
SPECS = {
    "align": "mera_ds.stages.align:align_spec",
    "finetune": "mera_ds.stages.finetune:finetune_spec",
    "realign": "mera_ds.stages.realign:realign_spec",
}


class RayCheckpointer:
    """DeepSpeed checkpoints reported to Ray Train: every rank writes its partition to a private
    directory and Ray merges them into one checkpoint in persistent storage."""

    def restore(self, engine) -> int:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d)
        return int(client["step"])

    def save(self, engine, step: int, metrics: dict) -> None:
        import ray.train

        d = tempfile.mkdtemp(prefix="mera-ckpt-")
        try:
            engine.save_checkpoint(d, tag=f"step{step}", client_state={"step": step})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _worker(config: dict) -> None:
    import importlib

    import ray.train

    if not config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mera_ds.stages.train import run_job

    cfg = parse_config(config["cfg"], config["source"])
    module, fn = SPECS[config["stage"]].split(":")
    spec = getattr(importlib.import_module(module), fn)(cfg, config["modality"])
    metrics = run_job(cfg, spec, RayCheckpointer(), config.get("checkpoint_every"))
    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})


def run_stage(cfg: RunConfig, stage: str, modality: str, *, source: str = "<config>",
              checkpoint_every: int | None = None) -> dict:
    """Run one training stage of a run on the Ray cluster; return rank 0's final metrics."""
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mera_ds.dist.cluster import connect

    if stage not in SPECS:
        raise MeraError(f"stage {stage!r} is not a training stage ({', '.join(SPECS)})")
    cfg.modality(modality)  # names the modality at fault before any worker starts
    c = cfg.cluster
    connect(c.ray_address, num_cpus=max(os.cpu_count() or 1, c.num_workers))
    layout = RunLayout.of(cfg)
    storage = layout.train_state(modality, stage)
    if not is_remote(storage):
        storage = os.path.abspath(storage)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "source": source, "stage": stage,
                           "modality": modality, "use_gpu": c.use_gpu,
                           "checkpoint_every": checkpoint_every},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo", timeout_s=c.timeout_s),
        run_config=RayRunConfig(name="ray", storage_path=storage,
                                failure_config=FailureConfig(max_failures=c.max_failures)),
    )
    log.info("stage %s/%s: %d Ray Train workers", stage, modality, c.num_workers)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's error; show its first line, not a traceback
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
        raise MeraError(f"stage {stage}/{modality} failed on the cluster: {first}") from e
    if not is_remote(storage):
        shutil.rmtree(storage, ignore_errors=True)  # resume state is no artifact
    return dict(result.metrics or {})
