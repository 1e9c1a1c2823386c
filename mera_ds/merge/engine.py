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

Memory: elementwise strategies (all but ties and pcb) read pieces of READ elements and merge them
in chunks of CHUNK, so each worker thread holds one piece of each input and one of the output:
threads x (K + 1) x READ x itemsize, whatever the size of the model, of its tensors or of the
output shards (planned up front, each piece written at its place, mera_ds.io.writer). ties needs
whole tensors (its top-k is over a whole delta): about (K + 3) x the largest tensor in fp32 per
thread on top of that.

Parallelism: within a job, `threads` workers (MergeConfig.threads; default the cores this process
may use) take pieces (the output shards in turn, each in file order), each reading, merging and
writing its own. Across jobs, the output shards are the units of work: standalone they run inline
(workers=1) or in a local process pool; in a Ray run the merge actor
(mera_ds.cluster.merge_actor) hands groups of them to Ray tasks through `map_jobs`. A piece is
computed the same way wherever and by whichever thread it runs, so the result is identical, bit
for bit.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
import threading
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
from mera_ds.io.writer import (ShardPieceWriter, ShardPlan, copy_aux_files, index_of, plan_shards,
                               write_index)
from mera_ds.merge.strategies import BLOCK, Strategy, make_strategy

log = logging.getLogger(__name__)

# Elements of one tensor merged by one call of an elementwise strategy: a whole number of dare's
# BLOCKs. Every torch operation holds Python's GIL for a moment, so the fewer per byte, the less
# the worker threads wait for each other: merging 1.7 GB of bf16 (K = 2), two threads together
# spent 1.8x one thread's time on it with 64K elements per call, 1.25x with 256K, and one thread
# 20% less. 1 MB of fp32 per input still stays in the caches through the chain of operations.
CHUNK = 4 * BLOCK
# Elements of one tensor read from each input at once (a multiple of CHUNK): 4 MB of bf16.
READ = 8 * CHUNK
# Pieces the kernel is asked to read ahead of the one being merged (posix_fadvise WILLNEED): with
# a cold page cache the disk then works while the workers compute, even with one thread.
AHEAD = 8


# --- the plan ------------------------------------------------------------------------------------

@dataclass
class MergeJob:
    """One unit of work (a group of output shards), picklable for a pool worker or a Ray task."""

    prev: Checkpoint
    finetuned: list[Checkpoint]
    strategy: Strategy
    out_dir: str
    shards: list[ShardPlan]
    threads: int = 1  # worker threads merging its pieces

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

    def jobs(self, out_dir: str, groups: Optional[int] = None, threads: int = 1) -> list[MergeJob]:
        """The shards in `groups` groups of about equal bytes (one shard each by default), each
        merged by `threads` threads."""
        groups = len(self.shards) if groups is None else max(1, min(groups, len(self.shards)))
        bins: list[list[ShardPlan]] = [[] for _ in range(groups)]
        sizes = [0] * groups
        for shard in sorted(self.shards, key=lambda s: -s.nbytes):
            i = sizes.index(min(sizes))
            bins[i].append(shard)
            sizes[i] += shard.nbytes
        return [MergeJob(self.prev, self.finetuned, self.strategy, out_dir, b, threads)
                for b in bins if b]


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
    strategy.check([s.name for s in specs])
    return MergePlan(prev_ckpt, ft_ckpts, strategy, plan_shards(specs, parse_size(cfg.shard_size)))


# --- the work ------------------------------------------------------------------------------------

def _pieces(spec: TensorSpec, elementwise: bool) -> list[tuple[int, int]]:
    """(first element, count) of the runs of a tensor read at once: READ elements (a multiple
    of CHUNK), or the whole tensor for a strategy that needs it."""
    if spec.is_float and not elementwise:
        return [(0, spec.numel)]
    return [(start, min(READ, spec.numel - start))
            for start in range(0, spec.numel, READ)] or [(0, 0)]


class _Buffers:
    """One worker's memory, reused from piece to piece: a read buffer per input, an output buffer
    and fp32 scratch chunks. New memory costs a page fault per 4 KB on first touch, which would
    cost more than the merge itself; and the buffers are cut into CHUNK views once per dtype, so
    merging a chunk makes no new tensor objects (no work for Python's garbage collector)."""

    def __init__(self, n_inputs: int, itemsize: int):
        self.read = [torch.empty(READ * itemsize, dtype=torch.uint8) for _ in range(n_inputs)]
        self.out = torch.empty(READ * itemsize, dtype=torch.uint8)
        self.scratch = [torch.empty(CHUNK) for _ in range(n_inputs)]
        self._chunks: dict[torch.dtype, tuple] = {}

    def chunks(self, dtype: torch.dtype) -> tuple[list[tuple[torch.Tensor, ...]],
                                                  tuple[torch.Tensor, ...]]:
        """The read buffers' and the output buffer's CHUNK-element views as `dtype`."""
        if dtype not in self._chunks:
            self._chunks[dtype] = ([b.view(dtype).split(CHUNK) for b in self.read],
                                   self.out.view(dtype).split(CHUNK))
        return self._chunks[dtype]


def _read_piece(inputs: list[Checkpoint], spec: TensorSpec, start: int, count: int,
                bufs: _Buffers, elementwise: bool) -> list[torch.Tensor]:
    """The piece of every input (theta_{i-1}'s alone for an integer tensor), flat, in its stored
    dtype: in the worker's buffers, or fresh whole tensors for a strategy that needs them."""
    if not spec.is_float:
        return [inputs[0].read(spec.name, start, count, bufs.read[0])]
    if not elementwise:
        return [ckpt.read(spec.name, start, count) for ckpt in inputs]
    return [ckpt.read(spec.name, start, count, buf) for ckpt, buf in zip(inputs, bufs.read)]


def _merge_piece(strategy: Strategy, spec: TensorSpec, start: int, raw: list[torch.Tensor],
                 bufs: _Buffers) -> torch.Tensor:
    """Merge one piece of every input (as `_read_piece` gives it) -> the piece of the output."""
    if not spec.is_float:
        return raw[0]  # an integer buffer: theta_{i-1}'s, untouched
    if not strategy.elementwise:
        fp32 = [t.float() for t in raw]
        return strategy.merge(spec.name, 0, fp32[0], fp32[1:]).to(spec.torch_dtype)
    count = raw[0].numel()
    ins, outs = bufs.chunks(spec.torch_dtype)
    for j in range(-(-count // CHUNK)):
        n = min(CHUNK, count - j * CHUNK)
        fp32 = [scratch.copy_(b[j]) if n == CHUNK else scratch[:n].copy_(b[j][:n])
                for scratch, b in zip(bufs.scratch, ins)]
        merged = strategy.merge(spec.name, (start + j * CHUNK) // BLOCK, fp32[0], fp32[1:])
        (outs[j] if n == CHUNK else outs[j][:n]).copy_(merged)
    return bufs.out.view(spec.torch_dtype)[:count]


class _Claims:
    """Hands out the pieces of a job in the order of `work`, one at a time to whichever worker
    asks, and asks the kernel to read AHEAD pieces beyond the last one handed out."""

    def __init__(self, work: list, inputs: list[Checkpoint]):
        self._work, self._inputs = work, inputs
        self._next, self._stopped = 0, False
        self._lock = threading.Lock()
        for n in range(min(AHEAD, len(work))):
            self._prefetch(n)

    def __call__(self) -> Optional[int]:
        with self._lock:
            if self._stopped or self._next == len(self._work):
                return None
            n, self._next = self._next, self._next + 1
        if n + AHEAD < len(self._work):
            self._prefetch(n + AHEAD)
        return n

    def stop(self) -> None:
        with self._lock:
            self._stopped = True

    def _prefetch(self, n: int) -> None:
        _, spec, start, count = self._work[n]
        for ckpt in self._inputs if spec.is_float else self._inputs[:1]:
            ckpt.prefetch(spec.name, start, count)


class _Outputs:
    """The job's output shards, each opened at its first piece and closed at its last."""

    def __init__(self, out_dir: str):
        self._dir = out_dir
        self._open: dict[str, ShardPieceWriter] = {}
        self._lock = threading.Lock()
        self._cancelled = False

    def write(self, shard: ShardPlan, name: str, start: int, data: torch.Tensor) -> None:
        with self._lock:
            if self._cancelled:
                raise MeraError(f"{self._dir}: merge cancelled")
            writer = self._open.get(shard.filename)
            if writer is None:
                writer = self._open[shard.filename] = ShardPieceWriter(self._dir, shard)
        if writer.write(name, start, data):
            with self._lock:
                del self._open[shard.filename]
            writer.close()

    def close(self) -> None:
        """Every shard is complete by now: one still open is missing pieces (close says which)."""
        for writer in self._take():
            writer.close()

    def cancel(self) -> None:
        """Refuse every piece from now on, and wake the workers waiting for their turn on a
        remote stream; files stay open until the workers are done (a closed descriptor's number
        could be reused by another file while a worker still writes to it)."""
        with self._lock:
            self._cancelled = True
            for writer in self._open.values():
                writer.cancel()

    def abort(self) -> None:
        for writer in self._take():
            writer.abort()

    def _take(self) -> list[ShardPieceWriter]:
        """The open writers, no longer held here."""
        with self._lock:
            writers, self._open = list(self._open.values()), {}
        return writers


def merge_shards(job: MergeJob, progress: Optional[Callable[[int], None]] = None) -> list[str]:
    """Compute and write the shards of `job`; returns their file names.

    `job.threads` workers each take the next piece (`_work_order`), read it from every input,
    merge it and write it at its place in its output shard, so reading, converting, merging and
    writing all run on every core; the kernel reads the inputs AHEAD pieces in advance, so the
    disk works while the workers compute, whatever their number. Each piece is computed the same
    way by whichever worker takes it: the output does not depend on the number of threads.
    Memory: threads x (K + 1) pieces (whole tensors for a strategy that is not elementwise).
    """
    with _single_threaded_torch():
        return _merge_shards(job, progress)


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Ops on CHUNK elements gain nothing from intra-op threads, and their wake-ups compete with
    the workers (measured: 15x slower with 2 intra-op threads on 2 cores). Parallelism comes
    from the workers instead, each on whole pieces. (Threads started later inherit the setting.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _work_order(shards: list[ShardPlan], elementwise: bool) -> list:
    """The pieces of `shards` as (shard, spec, start, count): each shard's in file order, the
    shards interleaved by how far into them a piece lies, so that workers taking pieces in this
    order write different files at the same time. Buffered writes to one file wait for each
    other (they hold its inode's lock while they copy into the page cache): two threads writing
    1.6 GB into one file were no faster than one."""
    keyed = []
    for k, shard in enumerate(shards):
        pos = 0
        for spec in shard.tensors:
            for start, count in _pieces(spec, elementwise):
                keyed.append(((pos + start * spec.itemsize) / max(1, shard.nbytes), k,
                              (shard, spec, start, count)))
            pos += spec.nbytes
    return [piece for _, _, piece in sorted(keyed, key=lambda x: x[:2])]


def _merge_shards(job: MergeJob, progress: Optional[Callable[[int], None]]) -> list[str]:
    inputs = [job.prev, *job.finetuned]
    elementwise = job.strategy.elementwise
    work = _work_order(job.shards, elementwise)
    itemsize = max((s.itemsize for _, s, _, _ in work), default=1)
    claim, outputs, lock = _Claims(work, inputs), _Outputs(job.out_dir), threading.Lock()

    def worker() -> None:
        bufs = _Buffers(len(inputs), itemsize)
        while (n := claim()) is not None:
            shard, spec, start, count = work[n]
            raw = _read_piece(inputs, spec, start, count, bufs, elementwise)
            outputs.write(shard, spec.name, start, _merge_piece(job.strategy, spec, start, raw,
                                                                  bufs))
            if progress is not None:
                with lock:  # tqdm's counter is not thread-safe
                    progress(count * spec.itemsize)

    threads = max(1, job.threads)
    try:
        with cf.ThreadPoolExecutor(threads, thread_name_prefix="merge") as pool:
            futures = [pool.submit(worker) for _ in range(threads)]
            try:
                for fut in cf.as_completed(futures):
                    fut.result()
            except BaseException:  # the other workers stop after their piece
                claim.stop()
                outputs.cancel()
                raise
        outputs.close()
    finally:  # the workers are done: their files can be closed
        outputs.abort()
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


def _threads(cfg: MergeConfig, workers: int, fanned_out: bool) -> int:
    """Threads per job: as configured, else this process's cores shared between `workers`
    local processes, or 1 for jobs that `map_jobs` sends elsewhere."""
    if cfg.threads is not None:
        return cfg.threads
    if fanned_out:
        return 1
    return max(1, len(os.sched_getaffinity(0)) // max(1, workers))


def merge_llm(prev: str, finetuned: Sequence[str], out: str, cfg: MergeConfig,
              step: Optional[int] = None, workers: int = 1, overwrite: bool = False,
              map_jobs: Optional[Callable[[list[MergeJob]], Iterable[MergeJob]]] = None,
              groups: Optional[int] = None) -> MergeReport:
    """Merge the LLM directory `prev` (theta_{i-1}) with the fine-tuned LLM directories into the
    HF-layout directory `out`, committed only when whole (an existing `out` is kept unless
    `overwrite`).

    Work runs inline (workers=1), in a local process pool (workers > 1), or through `map_jobs`:
    a function that runs a list of jobs anywhere and yields each as it finishes (the Ray merge
    actor's). `groups`: how many jobs the shards are grouped into (default one per shard). Each
    job runs `cfg.threads` threads; by default the cores this process may use, shared between
    the pool's workers, and 1 per job of `map_jobs` (a Ray task holds one CPU).
    """
    t0 = time.perf_counter()
    plan = plan_merge(prev, finetuned, cfg, step)
    log.info("merge %s: %d tensors, %.2f GB into %d shards at %s", cfg.strategy,
             len(plan.prev), plan.nbytes / 1e9, len(plan.shards), out)
    with storage.committed_dir(out, overwrite=overwrite) as tmp, \
            tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc=f"merge {cfg.strategy}",
                 mininterval=2.0) as bar:
        threads = _threads(cfg, workers, map_jobs is not None)
        if map_jobs is None and workers <= 1:
            for job in plan.jobs(tmp, 1, threads):
                merge_shards(job, progress=bar.update)
        else:
            run = map_jobs or _process_pool_map(workers)
            for job in run(plan.jobs(tmp, groups, threads)):
                bar.update(job.nbytes)
        copy_aux_files(prev, tmp)
        weight_map, total = index_of(plan.shards)
        write_index(tmp, weight_map, total, metadata={"merge": {
            "strategy": cfg.strategy, "step": step, "prev": prev, "finetuned": list(finetuned),
            **cfg.model_dump(exclude={"strategy", "shard_size", "threads"})}})
    report = MergeReport(out, cfg.strategy, step, len(plan.shards), len(plan.prev), plan.nbytes,
                         plan.nbytes * (1 + len(finetuned)), time.perf_counter() - t0)
    log.info("merged %.2f GB in %.1f s (%.0f MB/s of input read) -> %s", plan.nbytes / 1e9,
             report.seconds, report.read_mb_s, out)
    return report
