"""The Ray executor of the plan (what `mera run` uses): training steps as Ray Train jobs, the merge
on the merge actor, replay and evaluate as Ray tasks running the in-process step
(mera_ds.run.local.run_step). Same steps, artifacts and manifest as the in-process executor."""
from __future__ import annotations

import logging
import os
from typing import Optional

from mera_ds.config import RunConfig
from mera_ds.errors import MeraError
from mera_ds.run.plan import MergeSpec, Step
from mera_ds.train.recipe import JobSpec

log = logging.getLogger("mera_ds.cluster")


class RayExecutor:
    """Runs steps on the Ray cluster of cluster.ray_address (RAY_ADDRESS, or a local instance),
    connecting at the first step it runs (a resumed run may have none left)."""

    def __init__(self, checkpoint_every: Optional[int] = None):
        self.checkpoint_every = checkpoint_every
        self.connected = False

    def __call__(self, cfg: RunConfig, step: Step):
        from mera_ds.cluster.connect import connect

        if not self.connected:
            import ray

            from mera_ds.run.preflight import check_nodes

            # Enough CPUs for the training workers even on a small machine.
            connect(cfg.cluster.ray_address,
                    num_cpus=max(os.cpu_count() or 1, cfg.cluster.num_workers))
            check_nodes(cfg, sum(1 for n in ray.nodes() if n["Alive"]))
            self.connected = True
        try:
            return self._run(cfg, step)
        except Exception as e:  # Ray wraps a worker's error in its traceback: one line of it
            raise MeraError(f"{step.name} failed on the cluster: {_last_line(e)}") from e

    def _run(self, cfg: RunConfig, step: Step):
        import ray

        spec = step.spec
        if isinstance(spec, JobSpec):
            from mera_ds.cluster.train_job import train_on_ray

            return train_on_ray(cfg, spec, self.checkpoint_every)
        if isinstance(spec, MergeSpec):
            from mera_ds.cluster.merge_actor import merge_on_ray

            return merge_on_ray(spec.prev, spec.finetuned, spec.out, cfg.stages.merge,
                                step=spec.step)
        from mera_ds.run.local import run_step

        gpus = 1 if cfg.cluster.use_gpu and step.phase == "evaluate" else 0
        return ray.get(ray.remote(num_cpus=1, num_gpus=gpus)(run_step).remote(cfg, step))


def _last_line(e: BaseException) -> str:
    """The message of the error at the root of `e`: a Ray task's error keeps the task's own
    exception in `cause`, Ray Train chains it as __cause__; either prints as a traceback whose
    last line is the message."""
    cause = getattr(e, "cause", None) or e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
