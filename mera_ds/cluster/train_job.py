"""A training step as a Ray Train TorchTrainer job: one worker per GPU (gloo on CPU, nccl on
GPU), ranks and addresses from Ray, resume state in Ray checkpoints under the run directory, and
a job whose worker died restarted from its checkpoint (bad input is not retried). The workers
run the same recipe as the other launchers (mera_ds.train.recipe.run_job) on the step's
JobSpec; each writes its output to its rank's log file of the step, and rank 0 relays its
progress to the driver's console, when the driver gives them (cluster.executor)."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from typing import Optional

from mera_ds.config import RunConfig
from mera_ds.errors import retryable
from mera_ds.run.layout import RunLayout
from mera_ds.storage import is_remote, join, read_json, remove, url_to_fs, write_json
from mera_ds.train.recipe import JobSpec
from mera_ds.train.runtime import restore_state

log = logging.getLogger("mera_ds.cluster")


class WorkerFailure(Exception):
    """A job that failed on a worker: its error (as __cause__) and its rank, whose log file says
    more."""

    def __init__(self, rank: int, error: BaseException):
        super().__init__(f"rank {rank}: {error}")
        self.rank = rank


class RayCheckpointer:
    """DeepSpeed checkpoints reported to Ray Train: every rank writes its partition to a private
    directory and Ray merges them into one checkpoint in persistent storage."""

    def restore(self, engine) -> int:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0
        with ckpt.as_directory() as d:
            return restore_state(engine, d)

    def save(self, engine, step: int, metrics: dict) -> None:
        import ray.train

        d = tempfile.mkdtemp(prefix="mera-ckpt-")
        try:
            engine.save_checkpoint(d, tag=f"step{step}", client_state={"step": step})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)


def _worker(config: dict) -> None:
    import ray.train

    from mera_ds.cluster.connect import send
    from mera_ds.run.console import captured

    cfg: RunConfig = config["cfg"]
    if not cfg.cluster.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from mera_ds.train.recipe import run_job

    spec, relay, logs = config["spec"], config["relay"], config["logs"]
    rank = ray.train.get_context().get_world_rank()
    path = logs.step_log(spec.name, rank) if logs else None
    forward = functools.partial(send, relay, "record", spec.name, rank, path) if relay else None
    progress = functools.partial(send, relay, "update", spec.name) if relay else None
    every = config["checkpoint_every"]  # 0: no resume checkpoints, a restart starts over
    with captured(path, forward):
        metrics = run_job(cfg, spec, RayCheckpointer() if every != 0 else None, every,
                          progress=progress)
    # Ray Train keeps only the metrics of reports that carry a checkpoint: the final ones go
    # next to the job's resume state, where train_on_ray reads them.
    if rank == 0:
        write_json(_final_metrics(spec), metrics)


def train_on_ray(cfg: RunConfig, spec: JobSpec, checkpoint_every: Optional[int] = None,
                 relay=None, logs: Optional[RunLayout] = None) -> dict:
    """Run one training job on the connected Ray cluster; return rank 0's final metrics.

    A failed attempt is restarted from its latest checkpoint, up to cluster.max_failures times,
    unless a worker failed on bad input (a MeraError other than RankFailure), which would only
    fail again. The restarts are driven from here: Ray Train's own retry retries everything.
    A job that fails raises WorkerFailure naming the rank. `relay` (cluster.connect.Relay) takes
    rank 0's progress and every rank's warnings to the driver; with `logs`, each rank's output
    goes to its log file of the step.
    """
    from ray.train import FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c, workers = cfg.cluster, cfg.workers(spec.phase)
    attempts = c.max_failures + 1
    log.info("%s: %d Ray Train workers", spec.name, workers)
    for attempt in range(1, attempts + 1):
        # Same name and storage path each time: Ray Train resumes from the run's checkpoints.
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg, "spec": spec, "checkpoint_every": checkpoint_every,
                               "relay": relay, "logs": logs},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=c.use_gpu,
                                         resources_per_worker={"CPU": 1},
                                         placement_strategy=c.placement_strategy),
            torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo",
                                     timeout_s=c.timeout_s),
            run_config=RayRunConfig(name="ray", **_storage(spec.state),
                                    failure_config=FailureConfig(max_failures=0)),
        )
        try:
            trainer.fit()
            break
        except Exception as e:
            failures = sorted(getattr(e, "worker_failures", {}).items())
            bad_input = next(((r, f) for r, f in failures if not retryable(f)), None)
            if bad_input is not None:
                raise WorkerFailure(*bad_input) from bad_input[1]
            if attempt == attempts:
                if failures:
                    raise WorkerFailure(*failures[0]) from failures[0][1]
                raise
            log.warning("%s: attempt %d of %d failed (%s); restarting from its latest "
                        "checkpoint", spec.name, attempt, attempts,
                        _summary([f for _, f in failures] or [e]))
    metrics = read_json(_final_metrics(spec))
    remove(spec.state)  # resume state is no artifact
    return metrics


def _final_metrics(spec: JobSpec) -> str:
    return join(spec.state, "final-metrics.json")


def _storage(url: str) -> dict:
    """Ray Train's storage of the resume state. On S3 through our own filesystem: Ray's default
    (pyarrow's S3) ignores the fsspec endpoint and its retry settings."""
    if not is_remote(url):
        return {"storage_path": os.path.abspath(url)}
    import pyarrow.fs

    fs, path = url_to_fs(url)
    return {"storage_path": path,
            "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


def _summary(failures: list) -> str:
    return "; ".join(f"{type(f).__name__}: {(str(f).strip().splitlines() or [''])[0][:200]}"
                     for f in failures)
