"""The Ray executor of the plan (what `mera run` uses): training steps as Ray Train jobs, the merge
on the merge actor, replay and evaluate as Ray tasks running the in-process step
(mera_ds.run.local.run_step). Same steps, artifacts and manifest as the in-process executor.

Unless -v, each process of a step writes its output to the step's log file
(RUN/logs/<step>/rank-<r>.log) and relays its progress and warnings to this driver's console
(mera_ds.run.console) through a relay actor (cluster.connect.Relay)."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Optional

from mera_ds.config import RunConfig
from mera_ds.errors import MeraError
from mera_ds.run import console
from mera_ds.run.layout import RunLayout
from mera_ds.run.plan import MergeSpec, Step, merge_config
from mera_ds.train.recipe import JobSpec

log = logging.getLogger("mera_ds.cluster")


class RayExecutor:
    """Runs steps on the Ray cluster of cluster.ray_address (RAY_ADDRESS, or a local instance),
    connecting at the first step it runs (a resumed run may have none left). Several steps may
    run at once, each called from its own thread (run.local.execute): Ray queues those the
    cluster has no resources for yet."""

    def __init__(self, checkpoint_every: Optional[int] = None):
        self.checkpoint_every = checkpoint_every
        self.connected = False
        self.connecting = threading.Lock()
        self.relay = None  # a quiet console's: the steps' progress and warnings come through it

    def __call__(self, cfg: RunConfig, step: Step):
        from mera_ds.cluster.connect import relaying

        self.prepare(cfg)
        logs = RunLayout.of(cfg) if self.relay else None
        try:
            with relaying(self.relay, console.deliver) if self.relay else contextlib.nullcontext():
                return self._run(cfg, step, logs)
        except Exception as e:  # Ray wraps a worker's error in its traceback: one line of it
            from mera_ds.cluster.train_job import WorkerFailure

            rank = e.rank if isinstance(e, WorkerFailure) else 0
            see = f" (see {logs.step_log(step.name, rank)})" if logs else ""
            raise MeraError(f"{step.name} failed on the cluster: {_last_line(e)}{see}") from e

    def prepare(self, cfg: RunConfig) -> None:
        """Connect (once). Called from the thread that outlives the steps: a local Ray instance's
        processes are started with a parent-death signal, which Linux sends when the *thread*
        that started them ends (a step's thread would take Ray down with it)."""
        import ray

        from mera_ds.cluster.connect import connect, start_relay
        from mera_ds.run.preflight import check_nodes

        with self.connecting:
            if self.connected:
                return
            # Enough CPUs for the largest training job even on a small machine.
            connect(cfg.cluster.ray_address, num_cpus=max(os.cpu_count() or 1, cfg.max_workers),
                    quiet=console.quiet())
            check_nodes(cfg, sum(1 for n in ray.nodes() if n["Alive"]))
            if console.quiet():
                self.relay = start_relay()
            self.connected = True

    def _run(self, cfg: RunConfig, step: Step, logs: Optional[RunLayout]):
        """Run the step; `logs`: the layout of its log files (None: output on the console)."""
        import ray

        from mera_ds.cluster.connect import send

        spec = step.spec
        if isinstance(spec, JobSpec):
            from mera_ds.cluster.train_job import train_on_ray

            return train_on_ray(cfg, spec, self.checkpoint_every, self.relay, logs)
        # The other steps run in one process.
        path = logs.step_log(step.name) if logs else None
        forward = functools.partial(send, self.relay, "record", step.name, 0, path) if logs \
            else None
        if isinstance(spec, MergeSpec):
            from mera_ds.cluster.merge_actor import merge_on_ray

            return merge_on_ray(spec.prev, spec.finetuned, spec.out, merge_config(cfg, spec),
                                step=spec.step, log=path, forward=forward)
        gpus = 1 if cfg.cluster.use_gpu and step.phase == "evaluate" else 0
        return ray.get(ray.remote(num_cpus=1, num_gpus=gpus)(_run_step).remote(
            cfg, step, path, forward))


def _run_step(cfg: RunConfig, step: Step, log: Optional[str], forward) -> dict:
    """A Ray task: the in-process step, its output into its log file."""
    from mera_ds.run.console import captured
    from mera_ds.run.local import run_step

    with captured(log, forward):
        return run_step(cfg, step)


def _last_line(e: BaseException) -> str:
    """The message of the error at the root of `e`: a Ray task's error keeps the task's own
    exception in `cause`, Ray Train chains it as __cause__; either prints as a traceback whose
    last line is the message."""
    cause = getattr(e, "cause", None) or e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
