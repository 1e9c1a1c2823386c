"""The merge actor: runs a merge step on a Ray cluster, its output shards fanned out to tasks.

The actor plans the merge and commits the output (mera_ds.merge.engine.merge_llm); each group of
output shards is merged and written by a Ray task (one CPU each), so a large LLM is merged by as
many processes as the cluster gives. Every shard is computed by the same code as in a local run,
so the output is identical.

Where files are: a local path names a directory on one node only, so when any input or the
output is a local path, the actor and its tasks are pinned to the node that called `merge_on_ray`;
with s3:// inputs and output the tasks run wherever the cluster has CPUs.

Given a log file, the actor writes its output there (mera_ds.run.console.captured); its tasks'
output goes where Ray puts it (the driver's log under `mera run`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Optional, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mera_ds import storage
from mera_ds.config import MergeConfig
from mera_ds.merge.engine import MergeJob, MergeReport, merge_llm, merge_shards
from mera_ds.run.console import captured

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def _merge_shards_task(job: MergeJob) -> list[str]:
    return merge_shards(job)


def _ray_map(task_options: dict):
    """A `map_jobs` for merge_llm: one Ray task per job; yields each job as its task finishes.
    If one fails, the others are cancelled and awaited before the error goes up, so nothing
    writes into the output directory after it has been cleaned up."""
    def run(jobs: list[MergeJob]) -> Iterable[MergeJob]:
        refs = {_merge_shards_task.options(**task_options).remote(job): job for job in jobs}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready[0])  # raises the task's error
                yield refs[ready[0]]
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            ray.wait(pending, num_returns=len(pending), timeout=60)
            raise
    return run


@ray.remote(num_cpus=0)  # it coordinates; the tasks hold the CPUs
class MergeActor:
    """Merges LLM directories on the cluster. `merge` takes the arguments of merge_llm (the
    config as a dict) and those of merge_on_ray, and returns the MergeReport as a dict."""

    def merge(self, prev: str, finetuned: Sequence[str], out: str, cfg: dict,
              step: Optional[int] = None, groups: Optional[int] = None,
              overwrite: bool = False, node_id: Optional[str] = None,
              log: Optional[str] = None, forward=None) -> dict:
        options = {}
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        # A restarted actor (its process died) merges again from scratch. An `out` there now is
        # the dead attempt's (the first attempt refused an existing one): replaced. Locally its
        # temporary is removed by committed_dir; on S3, where it is written in place, this
        # writes the new one whole before removing it.
        overwrite = overwrite or ray.get_runtime_context().was_current_actor_reconstructed
        with captured(log, forward):
            report = merge_llm(prev, finetuned, out, MergeConfig(**cfg), step=step,
                               overwrite=overwrite, map_jobs=_ray_map(options), groups=groups)
        return dataclasses.asdict(report)


def merge_on_ray(prev: str, finetuned: Sequence[str], out: str, cfg: MergeConfig,
                 step: Optional[int] = None, groups: Optional[int] = None,
                 overwrite: bool = False, log: Optional[str] = None,
                 forward=None) -> MergeReport:
    """Run one merge through a MergeActor on the connected Ray cluster (ray.init first).

    `groups`: how many Ray tasks the output shards are split into (default: one per shard).
    `log`: a file for the actor's output; `forward(level, message)`: where its warnings go.
    """
    node_id = None
    if not all(storage.is_remote(u) for u in (prev, *finetuned, out)):
        node_id = ray.get_runtime_context().get_node_id()
    options = {} if node_id is None else {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
    # A merge whose actor process dies is run again on a restarted actor (the tasks it had
    # started are killed with it by Ray); ray.kill below leaves no restart behind.
    actor = MergeActor.options(max_restarts=1, max_task_retries=1, **options).remote()
    try:
        report = ray.get(actor.merge.remote(prev, list(finetuned), out, cfg.model_dump(), step,
                                            groups, overwrite, node_id, log, forward))
    finally:
        ray.kill(actor)
    return MergeReport(**report)
