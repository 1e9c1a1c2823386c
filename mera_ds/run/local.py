"""The in-process executor: every step of the plan in this process. What `mera bench mcl` runs,
`mera run --executor local` (a laptop, a single-GPU box) and `mera stage` without Ray; under the
`deepspeed` launcher or `torchrun`, every rank runs a training step together.

`run_step` is also what the Ray executor's tasks call for the steps it does not distribute, so a
step's artifacts are the same whichever executor ran it.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Optional

from tqdm import tqdm

from mera_ds.config import RunConfig
from mera_ds.errors import MeraError
from mera_ds.run import console
from mera_ds.run.layout import RunLayout
from mera_ds.run.manifest import Manifest
from mera_ds.run.plan import BaseSpec, EvalSpec, MergeSpec, ReplaySpec, Step, merge_config
from mera_ds.train.recipe import JobSpec

# How an executor runs one step: (config, step) -> its result (a dict, recorded in the manifest).
Executor = Callable[[RunConfig, Step], dict]


def execute(cfg: RunConfig, steps: list[Step], manifest: Manifest, executor: Executor,
            concurrent: bool = False) -> None:
    """Run the steps through `executor`, skipping those the manifest records; their results are
    in manifest.steps. Each ends in one line on the console (run.console). In the plan's order,
    one at a time; or (`concurrent`, an executor that may be called from several threads at
    once) each as soon as the steps it depends on are done (run.schedule), each in a thread of
    its own, the executor's `prepare(cfg)` (if it has one) called first in this thread. Once a
    step fails no other starts; those running finish (and are recorded, for --resume) before
    its error is raised."""
    console.open_log(RunLayout.of(cfg).driver_log)
    todo = []
    for step in steps:
        if step.name in manifest.steps:
            result = manifest.run(step.name, step.outputs, executor, cfg, step)
            console.tell(f"{step.name}: done earlier, skipped ({summary(result)})")
        else:
            todo.append(step)
    if not concurrent:
        for step in todo:
            _run(cfg, step, manifest, executor)
        return
    from mera_ds.run.schedule import Schedule

    if todo and hasattr(executor, "prepare"):
        executor.prepare(cfg)  # in this thread, before the steps' threads (RayExecutor.prepare)
    schedule = Schedule(steps, manifest.steps)
    ended: queue.SimpleQueue = queue.SimpleQueue()
    running: set[str] = set()
    error = None

    def run(step: Step) -> None:
        try:
            _run(cfg, step, manifest, executor)
            ended.put((step.name, None))
        except BaseException as e:  # noqa: BLE001 - handed to the thread that raises it
            ended.put((step.name, e))

    while True:
        for step in schedule.ready() if error is None else ():
            running.add(step.name)
            # Daemon threads: an interrupted driver exits without waiting on its steps.
            threading.Thread(target=run, args=(step,), name=f"mera {step.name}",
                             daemon=True).start()
        if not running:
            break
        name, e = ended.get()
        running.discard(name)
        if e is None:
            schedule.finish(name)
        elif error is None:
            error = e
            if running:
                console.tell(f"{name} failed; no step starts now, waiting for "
                             f"{', '.join(sorted(running))} to end (--resume goes on from "
                             f"there)")
    if error is not None:
        raise error


def _run(cfg: RunConfig, step: Step, manifest: Manifest, executor: Executor) -> None:
    with console.step(step.name):
        result = manifest.run(step.name, step.outputs, executor, cfg, step)
    seconds = tqdm.format_interval(manifest.timings[step.name])
    console.tell(f"{step.name}: {summary(result)} in {seconds}")


def summary(result: dict) -> str:
    """What a step produced, in a few words (its line on the console)."""
    if "first_loss" in result:
        return f"loss {result['first_loss']:.3f} -> {result['loss']:.3f}"
    if "batches" in result:
        return f"Fisher over {result['batches']} batches, loss {result['loss']:.3f}"
    if "scores" in result:
        return ", ".join(f"{k} {v:.3f}" for k, v in result["scores"].items())
    if "source_samples" in result:
        return f"{result['samples']} of {result['source_samples']} samples"
    if "tensors" in result:
        return f"{result['tensors']} tensors merged ({result['strategy']}, step {result['step']})"
    return "done"


def run_step(cfg: RunConfig, step: Step, checkpoint_every: Optional[int] = None):
    """Run one step of the plan here; returns its result (a dict or a dataclass).
    `checkpoint_every`: training steps between resume checkpoints (default a quarter of the
    job; 0: none, a job killed midway starts over). Its output goes to its log file when the
    console is quiet (run.console)."""
    rank = int(os.environ.get("RANK", "0"))
    with console.own_output(RunLayout.of(cfg).step_log(step.name, rank)):
        return _run_step(cfg, step, checkpoint_every)


def _run_step(cfg: RunConfig, step: Step, checkpoint_every: Optional[int]):
    spec = step.spec
    if isinstance(spec, JobSpec):
        return train(cfg, spec, checkpoint_every)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise MeraError(f"{step.name}: a {step.phase} step runs in one process, not under a "
                        f"launcher with {os.environ['WORLD_SIZE']} ranks")
    if isinstance(spec, BaseSpec):
        from mera_ds.model.llm import write_llm

        return write_llm(cfg.llm, spec.out, cfg.stages.merge.shard_size)
    if isinstance(spec, ReplaySpec):
        from mera_ds.data.replay import sample_replay

        return sample_replay(spec.source, spec.out, spec.ratio, spec.seed,
                             num_shards=spec.num_shards)
    if isinstance(spec, MergeSpec):
        from mera_ds.merge.engine import merge_llm

        return merge_llm(spec.prev, list(spec.finetuned), spec.out, merge_config(cfg, spec),
                         step=spec.step)
    if isinstance(spec, EvalSpec):
        return evaluate(cfg, step.modality, spec)
    raise TypeError(f"{step.name}: no way to run a {type(spec).__name__}")


def train(cfg: RunConfig, spec: JobSpec, checkpoint_every: Optional[int] = None) -> dict:
    """A training job with this process as one rank (of a launcher's, or alone), resuming from
    the state a failed attempt left in spec.state (a local or shared directory; with an s3://
    run directory a killed job starts over: Ray keeps resume state there). The state is removed
    once the artifacts are written."""
    import torch.distributed as dist

    from mera_ds.storage import is_remote, remove
    from mera_ds.train.recipe import run_job
    from mera_ds.train.runtime import DirCheckpointer

    if checkpoint_every == 0 or is_remote(spec.state):
        return run_job(cfg, spec, progress=console.progress())
    metrics = run_job(cfg, spec, DirCheckpointer(spec.state), checkpoint_every,
                      progress=console.progress())
    if dist.get_rank() == 0:
        remove(spec.state)
    return metrics


def evaluate(cfg: RunConfig, modality: str, spec: EvalSpec) -> dict:
    """Score the learned modalities and store the result at spec.out."""
    import torch

    from mera_ds.evaluate import evaluate as score
    from mera_ds.storage import write_json

    device = "cuda" if cfg.cluster.use_gpu and torch.cuda.is_available() else "cpu"
    result = score(cfg, modality, llm_dir=spec.llm, connectors=spec.connectors, device=device)
    write_json(spec.out, result)
    return result
