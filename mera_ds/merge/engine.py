"""The merge engine: theta_i from theta_{i-1} and the fine-tuned LLM(s), streamed tensor by tensor.

What is merged: the inputs are LLM directories (HF layout), so every floating-point tensor in
them is an LLM tensor (embeddings, decoder layers, final norm, lm_head) and is merged; encoders and
connectors live elsewhere and never reach a merge. A non-floating tensor (an integer buffer)
cannot be averaged: it is copied from theta_{i-1} untouched.

Strategies (mera_ds.merge.strategies) are per-tensor functions computed in fp32 and stored in the
input dtype.

Checks before anything is written (each a one-line MeraError naming the tensor and the file):
every fine-tuned LLM holds exactly the tensors of theta_{i-1}, with the same shapes and dtypes.
Tied embeddings: an LLM saved with tie_word_embeddings has no lm_head.weight (or one equal to the
embeddings); merging the embeddings merges the head, so nothing more is needed. Merging a tied LLM
with an untied one is refused (the configs' tie_word_embeddings differ, or lm_head.weight is
missing on one side).

Memory: elementwise strategies (all but ties) read pieces of READ elements and merge them in
blocks of BLOCK, so a worker holds two pieces of each input (one read ahead while the other is
merged) and two of the output: 2 x (K + 2) x READ x itemsize, whatever the size of the model, of
its tensors or of the output shards (planned up front and streamed to disk, mera_ds.io.writer).
ties needs whole tensors (its top-k is over a whole delta): about (K + 3) x the largest tensor in
fp32 on top of that.

Fan-out: the output shards are the units of work. Standalone they run inline (workers=1) or in a
local process pool; in a Ray run the merge actor (mera_ds.cluster.merge_actor) hands groups of
them to Ray tasks through `map_jobs`. A shard is computed the same way wherever it runs, so the
result is identical, bit for bit.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from mera_ds import storage
from mera_ds.config import MergeConfig, parse_size
from mera_ds.errors import MeraError
from mera_ds.io.format import CONFIG_FILE, TensorSpec
from mera_ds.io.reader import Checkpoint
from mera_ds.io.writer import (ShardFileWriter, ShardPlan, copy_aux_files, index_of, plan_shards,
                               write_index)
from mera_ds.merge.strategies import BLOCK, Strategy, make_strategy

log = logging.getLogger(__name__)

# Elements of one tensor read from each input at once (a multiple of BLOCK): 4 MB of bf16.
READ = 32 * BLOCK


# --- the plan ------------------------------------------------------------------------------------

@dataclass
class MergeJob:
    """One unit of work (a group of output shards), picklable for a pool worker or a Ray task."""

    prev: Checkpoint
    finetuned: list[Checkpoint]
    strategy: Strategy
    out_dir: str
    shards: list[ShardPlan]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


@dataclass
class MergePlan:
    prev: Checkpoint
    finetuned: list[Checkpoint]
    strategy: Strategy
    shards: list[ShardPlan]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def jobs(self, out_dir: str, groups: Optional[int] = None) -> list[MergeJob]:
        """The shards in `groups` groups of about equal bytes (one shard each by default)."""
        groups = len(self.shards) if groups is None else max(1, min(groups, len(self.shards)))
        bins: list[list[ShardPlan]] = [[] for _ in range(groups)]
        sizes = [0] * groups
        for shard in sorted(self.shards, key=lambda s: -s.nbytes):
            i = sizes.index(min(sizes))
            bins[i].append(shard)
            sizes[i] += shard.nbytes
        return [MergeJob(self.prev, self.finetuned, self.strategy, out_dir, b) for b in bins if b]


def _tied(config: Optional[dict]) -> Optional[bool]:
    """tie_word_embeddings as the config states it; None where it does not say."""
    if config is None:
        return None
    text = config.get("text_config")
    source = text if isinstance(text, dict) and "tie_word_embeddings" in text else config
    value = source.get("tie_word_embeddings")
    return None if value is None else bool(value)


def _check_inputs(prev: Checkpoint, finetuned: Sequence[Checkpoint]) -> None:
    """Same tensors, shapes and dtypes everywhere, and the same embedding tying."""
    prev_tied = _tied(prev.config())
    for ft in finetuned:
        ft_tied = _tied(ft.config())
        if prev_tied is not None and ft_tied is not None and prev_tied != ft_tied:
            raise MeraError(f"{storage.join(ft.url, CONFIG_FILE)}: tie_word_embeddings is "
                            f"{ft_tied} but {prev_tied} in {storage.join(prev.url, CONFIG_FILE)}"
                            f"; cannot merge a tied LLM with an untied one")
        for name in prev.names:
            if name not in ft:
                hint = " (tied embeddings on one side only?)" if "lm_head" in name else ""
                raise MeraError(f"{ft.url}: has no tensor {name}, which "
                                f"{prev.info(name).file} has{hint}")
            a, b = prev.info(name), ft.info(name)
            if a.shape != b.shape:
                raise MeraError(f"{b.file}: tensor {name} has shape {list(b.shape)} but "
                                f"{list(a.shape)} in {a.file}")
            if a.dtype != b.dtype:
                raise MeraError(f"{b.file}: tensor {name} is {b.dtype} but {a.dtype} in "
                                f"{a.file}")
        if len(ft) != len(prev):
            extra = next(n for n in ft.names if n not in prev)
            hint = " (tied embeddings on one side only?)" if "lm_head" in extra else ""
            raise MeraError(f"{ft.info(extra).file}: has tensor {extra}, which {prev.url} "
                            f"lacks{hint}")


def plan_merge(prev: str, finetuned: Sequence[str], cfg: MergeConfig,
               step: Optional[int] = None) -> MergePlan:
    """Open the inputs (headers only), check they can be merged, and plan the output shards in
    the tensor order of `prev`."""
    if not finetuned:
        raise MeraError("merge: no fine-tuned LLM given")
    strategy = make_strategy(cfg, len(finetuned), step)
    prev_ckpt = Checkpoint(prev)
    ft_ckpts = [Checkpoint(url) for url in finetuned]
    _check_inputs(prev_ckpt, ft_ckpts)
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in prev_ckpt.infos.values()]
    return MergePlan(prev_ckpt, ft_ckpts, strategy, plan_shards(specs, parse_size(cfg.shard_size)))


# --- the work ------------------------------------------------------------------------------------

def _pieces(spec: TensorSpec, elementwise: bool) -> list[tuple[int, int]]:
    """(first element, count) of the runs of a tensor read at once: READ elements (a multiple
    of BLOCK), or the whole tensor for a strategy that needs it."""
    if spec.is_float and not elementwise:
        return [(0, spec.numel)]
    return [(start, min(READ, spec.numel - start))
            for start in range(0, spec.numel, READ)] or [(0, 0)]


class _Buffers:
    """Memory reused from piece to piece: reads, fp32 scratch blocks and outputs. New memory costs
    a page fault per 4 KB on first touch, which would cost more than the merge itself."""

    def __init__(self, n_inputs: int, itemsize: int):
        self.read = [[torch.empty(READ * itemsize, dtype=torch.uint8) for _ in range(n_inputs)]
                     for _ in range(2)]
        self.out = [torch.empty(READ * itemsize, dtype=torch.uint8) for _ in range(2)]
        self.scratch = [torch.empty(BLOCK) for _ in range(n_inputs)]


def _merge_piece(strategy: Strategy, spec: TensorSpec, start: int, raw: list[torch.Tensor],
                 bufs: _Buffers, out_buf: Optional[torch.Tensor]) -> torch.Tensor:
    """Merge one piece (flat, stored dtype) of every input -> the piece of the output."""
    if out_buf is None:  # a whole tensor, freshly read (not elementwise): no reuse possible
        fp32 = [t.float() for t in raw]
        return strategy.merge(spec.name, 0, fp32[0], fp32[1:]).to(spec.torch_dtype)
    count = raw[0].numel()
    out = out_buf[:count * spec.itemsize].view(spec.torch_dtype)
    if not spec.is_float:
        return out.copy_(raw[0])  # an integer buffer: theta_{i-1}'s, untouched
    for s in range(0, count, BLOCK):
        n = min(BLOCK, count - s)
        fp32 = [scratch[:n].copy_(t.narrow(0, s, n)) for scratch, t in zip(bufs.scratch, raw)]
        out.narrow(0, s, n).copy_(
            strategy.merge(spec.name, (start + s) // BLOCK, fp32[0], fp32[1:]))
    return out


def merge_shards(job: MergeJob, progress: Optional[Callable[[int], None]] = None) -> list[str]:
    """Compute and write the shards of `job`; returns their file names.

    Three things overlap: a thread reads the next piece of every input, this thread merges the
    current one, and a thread writes the previous result. Memory: two pieces of each input and
    two output pieces (whole tensors for a strategy that is not elementwise), whatever the size
    of the model.
    """
    with _single_threaded_torch():
        return _merge_shards(job, progress)


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Ops on BLOCK elements gain nothing from intra-op threads, and their wake-ups compete with
    the reader and writer threads (measured: 15x slower with 2 threads on 2 cores). Parallelism
    comes from running several jobs at once instead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _merge_shards(job: MergeJob, progress: Optional[Callable[[int], None]]) -> list[str]:
    strategy = job.strategy
    inputs = [job.prev, *job.finetuned]
    specs = [spec for shard in job.shards for spec in shard.tensors]
    bufs = _Buffers(len(inputs), max((s.itemsize for s in specs), default=1))
    whole = not strategy.elementwise

    def read(n: int, spec: TensorSpec, start: int, count: int) -> list[torch.Tensor]:
        sources = inputs if spec.is_float else inputs[:1]
        if whole and spec.is_float:
            return [ckpt.read(spec.name, start, count) for ckpt in sources]
        return [ckpt.read(spec.name, start, count, buf)
                for ckpt, buf in zip(sources, bufs.read[n % 2])]

    work = [(shard, spec, start, count) for shard in job.shards for spec in shard.tensors
            for start, count in _pieces(spec, strategy.elementwise)]
    writers: dict[int, ShardFileWriter] = {}

    def write(shard: ShardPlan, name: str, data: torch.Tensor, last: bool) -> None:
        writer = writers.get(id(shard))
        if writer is None:
            writer = writers[id(shard)] = ShardFileWriter(job.out_dir, shard)
        writer.write(name, data)
        if last:
            writers.pop(id(shard)).close()

    # Buffer sets alternate: piece n is read into set n % 2 while piece n - 1 (set (n - 1) % 2) is
    # merged, and merged into output n % 2 while output n - 1 is being written.
    with cf.ThreadPoolExecutor(1) as reader, cf.ThreadPoolExecutor(1) as writer_thread:
        ahead = reader.submit(read, 0, *work[0][1:]) if work else None
        written = None
        try:
            for n, (shard, spec, start, count) in enumerate(work):
                raw = ahead.result()
                if n + 1 < len(work):
                    ahead = reader.submit(read, n + 1, *work[n + 1][1:])
                out_buf = None if whole and spec.is_float else bufs.out[n % 2]
                out = _merge_piece(strategy, spec, start, raw, bufs, out_buf)
                del raw
                if written is not None:
                    written.result()
                last = n + 1 == len(work) or work[n + 1][0] is not shard
                written = writer_thread.submit(write, shard, spec.name, out, last)
                if progress is not None:
                    progress(count * spec.itemsize)
            if written is not None:
                written.result()
        finally:
            cf.wait([f for f in (ahead, written) if f is not None])
            for writer in writers.values():
                writer.abort()
            for ckpt in inputs:
                ckpt.close()
    return [shard.filename for shard in job.shards]


def _process_pool_map(workers: int) -> Callable[[list[MergeJob]], Iterable[MergeJob]]:
    """Run jobs in `workers` processes (spawned: no forked torch/thread state); yields each job
    as it finishes."""
    def run(jobs: list[MergeJob]) -> Iterable[MergeJob]:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(merge_shards, job): job for job in jobs}
            try:
                for fut in cf.as_completed(futures):
                    fut.result()
                    yield futures[fut]
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    return run


@dataclass
class MergeReport:
    out: str
    strategy: str
    step: Optional[int]
    shards: int
    tensors: int
    bytes_written: int
    bytes_read: int
    seconds: float

    @property
    def read_mb_s(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e6


def merge_llm(prev: str, finetuned: Sequence[str], out: str, cfg: MergeConfig,
              step: Optional[int] = None, workers: int = 1, overwrite: bool = False,
              map_jobs: Optional[Callable[[list[MergeJob]], Iterable[MergeJob]]] = None,
              groups: Optional[int] = None) -> MergeReport:
    """Merge the LLM directory `prev` (theta_{i-1}) with the fine-tuned LLM directories into the
    HF-layout directory `out`, committed only when whole (an existing `out` is kept unless
    `overwrite`).

    Work runs inline (workers=1), in a local process pool (workers > 1), or through `map_jobs`:
    a function that runs a list of jobs anywhere and yields each as it finishes (the Ray merge
    actor's). `groups`: how many jobs the shards are grouped into (default one per shard).
    """
    t0 = time.perf_counter()
    plan = plan_merge(prev, finetuned, cfg, step)
    log.info("merge %s: %d tensors, %.2f GB into %d shards at %s", cfg.strategy,
             len(plan.prev), plan.nbytes / 1e9, len(plan.shards), out)
    with storage.committed_dir(out, overwrite=overwrite) as tmp, \
            tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc=f"merge {cfg.strategy}",
                 mininterval=2.0) as bar:
        if map_jobs is None and workers <= 1:
            for job in plan.jobs(tmp, 1):
                merge_shards(job, progress=bar.update)
        else:
            run = map_jobs or _process_pool_map(workers)
            for job in run(plan.jobs(tmp, groups)):
                bar.update(job.nbytes)
        copy_aux_files(prev, tmp)
        weight_map, total = index_of(plan.shards)
        write_index(tmp, weight_map, total, metadata={"merge": {
            "strategy": cfg.strategy, "step": step, "prev": prev, "finetuned": list(finetuned),
            **cfg.model_dump(exclude={"strategy", "shard_size"})}})
    report = MergeReport(out, cfg.strategy, step, len(plan.shards), len(plan.prev), plan.nbytes,
                         plan.nbytes * (1 + len(finetuned)), time.perf_counter() - t0)
    log.info("merged %.2f GB in %.1f s (%.0f MB/s of input read) -> %s", plan.nbytes / 1e9,
             report.seconds, report.read_mb_s, out)
    return report
