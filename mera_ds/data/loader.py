"""The training and evaluation loaders over WebDataset shards (local or s3://).

Each rank reads its own shards (explicit node splitter), each DataLoader worker its part of those;
training streams resample shards forever and are cut into a fixed number of batches per rank, so
every rank takes the same number of steps however the shards differ in size. webdataset composes
the pipeline (shuffling, batching, epochs); shards are read by mera_ds.data.tar and decoded by
mera_ds.data.decode. Every bad shard or sample either stops with a one-line MeraError naming the
shard URL and the sample key, or (on_corrupt="skip") is dropped, counted and logged.
"""
from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import random
from typing import Any, Callable, Iterator

import torch.utils.data
import webdataset as wds

from mera_ds.data.decode import decode_sample
from mera_ds.data.tar import (CorruptDataError, expand_shards, opened_ahead, rank_shards,
                              raw_samples)
from mera_ds.errors import MeraError

log = logging.getLogger("mera_ds.data")

ON_CORRUPT = ("error", "skip")


class SkipCounter:
    """How many corrupt samples and shards a stream skipped.

    The counts live in shared memory so that skips in forked DataLoader workers count too.
    """

    def __init__(self):
        self._counts = multiprocessing.get_context("fork").Array("q", 2)

    @property
    def samples(self) -> int:
        return self._counts[0]

    @property
    def shards(self) -> int:
        return self._counts[1]

    def skip(self, err: CorruptDataError) -> None:
        with self._counts.get_lock():
            self._counts[0 if err.kind == "sample" else 1] += 1
        log.warning("skipped corrupt %s (%d samples, %d shards skipped so far): %s",
                    err.kind, self.samples, self.shards, err)


def _check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ON_CORRUPT:
        raise MeraError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _rng(*parts: Any) -> random.Random:
    # A string seed is hashed with sha512 by `random`, so it is the same in every process and run
    # (unlike hash() of a tuple, which PYTHONHASHSEED changes).
    return random.Random("/".join(map(str, parts)))


class SampleStream(torch.utils.data.IterableDataset):
    """Decoded samples of one rank's shards (see `sample_stream`). `skipped` counts what
    on_corrupt="skip" dropped; `set_epoch` reshuffles."""

    def __init__(self, pattern: str, *, rank: int = 0, world_size: int = 1,
                 resampled: bool = False, shuffle_buffer: int = 0, seed: int | str = 0,
                 on_corrupt: str = "error", skipped: SkipCounter | None = None):
        super().__init__()
        _check_on_corrupt(on_corrupt)
        self.pattern = pattern
        self.shards = rank_shards(pattern, expand_shards(pattern), rank, world_size)
        self.rank, self.resampled, self.seed = rank, resampled, seed
        self.shuffle_buffer, self.on_corrupt = shuffle_buffer, on_corrupt
        self.skipped = skipped or SkipCounter()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_order(self, rng: random.Random) -> Iterator[str]:
        worker, num_workers = _worker()
        if self.resampled:  # every worker draws from all of this rank's shards, forever
            while True:
                yield rng.choice(self.shards)
        else:
            yield from self.shards[worker::num_workers]

    def _samples(self, rng: random.Random) -> Iterator[dict[str, Any]]:
        failed: set[str] = set()  # shards read since the last good sample without giving one
        for url, opener in opened_ahead(self._shard_order(rng)):
            good = False
            try:
                for raw in raw_samples(url, opener):
                    try:
                        sample = decode_sample(raw)
                    except CorruptDataError as e:
                        if self.on_corrupt == "error":
                            raise
                        self.skipped.skip(e)
                        continue
                    good = True
                    failed.clear()
                    yield sample
            except CorruptDataError as e:  # the shard cannot be read on: skip the rest of it
                if self.on_corrupt == "error":
                    raise
                self.skipped.skip(e)
            if not good:
                failed.add(url)
                if self.resampled and len(failed) == len(self.shards):
                    # Resampling would otherwise spin forever on shards that give nothing.
                    raise MeraError(f"{self.pattern}: no readable sample in the "
                                    f"{len(self.shards)} shard(s) of rank {self.rank}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, _ = _worker()
        rng = _rng(self.seed, self.rank, worker, self.epoch)
        samples = self._samples(rng)
        if self.shuffle_buffer > 1:
            shuffle_rng = _rng("shuffle", self.seed, self.rank, worker, self.epoch)
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                  rng=shuffle_rng)(samples)
        return samples


class MixedStream(torch.utils.data.IterableDataset):
    """An endless, seeded random mix of resampled streams (see `mixed_stream`)."""

    def __init__(self, streams: list[SampleStream], weights: list[float], seed: int,
                 skipped: SkipCounter):
        super().__init__()
        self.streams, self.weights, self.seed, self.skipped = streams, weights, seed, skipped
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in self.streams:
            s.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # webdataset's RandomMix draws from the global `random` module; this one is seeded.
        rng = _rng("mix", self.seed, self.streams[0].rank, _worker()[0], self.epoch)
        sources = [iter(s) for s in self.streams]
        while True:
            (source,) = rng.choices(sources, weights=self.weights)
            yield next(source)


def sample_stream(pattern: str, *, rank: int = 0, world_size: int = 1, resampled: bool = False,
                  shuffle_buffer: int = 0, seed: int = 0, on_corrupt: str = "error"
                  ) -> SampleStream:
    """An IterableDataset of decoded samples from this rank's shards of `pattern`.

    Shards are split by rank (disjoint, every rank needs one) and then by DataLoader worker.
    resampled=False reads them once, in order (shuffled only by `shuffle_buffer`);
    resampled=True draws shards with replacement, endlessly, seeded by (seed, rank, worker, epoch).
    """
    return SampleStream(pattern, rank=rank, world_size=world_size, resampled=resampled,
                        shuffle_buffer=shuffle_buffer, seed=seed, on_corrupt=on_corrupt)


def mixed_stream(patterns: list[str], weights: list[float] | None = None, *, rank: int = 0,
                 world_size: int = 1, shuffle_buffer: int = 0, seed: int = 0,
                 on_corrupt: str = "error") -> MixedStream:
    """An endless stream drawing each sample from pattern i with probability weights[i]
    (default: equal), e.g. the replay mix of the learned modalities. Each pattern is resampled
    from this rank's shards of it."""
    if not patterns:
        raise MeraError("mixed_stream needs at least one shard pattern")
    weights = [1.0] * len(patterns) if weights is None else list(weights)
    if len(weights) != len(patterns) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MeraError(f"mix weights {weights} do not fit {len(patterns)} pattern(s): one "
                        "non-negative weight each, not all zero")
    skipped = SkipCounter()
    streams = [SampleStream(p, rank=rank, world_size=world_size, resampled=True,
                            shuffle_buffer=shuffle_buffer, seed=f"{seed}/{i}",  # its own
                            on_corrupt=on_corrupt, skipped=skipped)
               for i, p in enumerate(patterns)]
    return MixedStream(streams, weights, seed, skipped)


def read_samples(pattern: str, limit: int | None = None, *, on_corrupt: str = "error"
                 ) -> Iterator[dict[str, Any]]:
    """The decoded samples of `pattern` in shard order, each once (at most `limit`): for
    evaluation and replay sampling."""
    return itertools.islice(sample_stream(pattern, on_corrupt=on_corrupt), limit)


class _Failure:
    """A MeraError met while making a batch, passed on as the batch. Raised through a DataLoader
    worker, torch would wrap it in the worker's traceback (no longer one line) and then wait
    seconds for its workers to stop."""

    def __init__(self, error: MeraError):
        self.error = error


def _failures_as_batches(batches: Iterator[Any]) -> Iterator[Any]:
    try:
        yield from batches
    except MeraError as e:
        yield _Failure(e)


def _as_is(batch: Any) -> Any:
    """The batch as collate_fn made it (DataLoader would turn numpy arrays into tensors)."""
    return batch


class ShardLoader:
    """Exactly `num_steps` batches per iteration, on every rank (see `make_loader`), less the
    first `skip` of them: a resumed job reads again, and drops, the batches it had taken, so
    that it trains on what an uninterrupted one would have."""

    def __init__(self, stream: SampleStream | MixedStream, *, batch_size: int,
                 collate_fn: Callable[[list[dict]], Any], num_steps: int, num_workers: int,
                 skip: int = 0):
        if batch_size < 1 or num_steps < 0 or num_workers < 0 or not 0 <= skip <= num_steps:
            raise MeraError(f"bad loader settings: batch_size={batch_size}, "
                            f"num_steps={num_steps}, num_workers={num_workers}, skip={skip}")
        self.stream, self.num_steps, self.num_workers = stream, num_steps, num_workers
        self.skip = skip
        self.skipped = stream.skipped
        self.epoch = 0
        # Batches are made in the workers; each worker's endless stream is cut into its share
        # of the epoch (with_epoch), and the loader takes exactly num_steps of them.
        pipeline = wds.DataPipeline(
            stream, wds.batched(batch_size, collation_fn=collate_fn, partial=False),
            _failures_as_batches)
        pipeline = pipeline.with_epoch(
            nbatches=max(1, math.ceil(num_steps / max(1, num_workers))))
        # Workers are forked, yet no S3 client crosses the fork: a worker opens its shards through
        # fsspec, which drops its cached filesystem instances and its event loop in a child
        # process, so each worker builds its own s3fs client and aiohttp session. Forking (not
        # spawning) shares the skip counter and pickles nothing: collate_fn may hold a model.
        self.loader = torch.utils.data.DataLoader(
            pipeline, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
            multiprocessing_context="fork" if num_workers else None)

    def __len__(self) -> int:
        return self.num_steps - self.skip

    def __iter__(self) -> Iterator[Any]:
        if len(self) == 0:  # e.g. a job resumed after its last step
            return
        self.stream.set_epoch(self.epoch)
        self.epoch += 1
        for batch in itertools.islice(self.loader, self.skip, self.num_steps):
            if isinstance(batch, _Failure):
                raise batch.error from None
            yield batch


def make_loader(pattern: str, *, batch_size: int, collate_fn: Callable[[list[dict]], Any],
                num_steps: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                num_workers: int = 0, on_corrupt: str = "error", shuffle_buffer: int = 0,
                skip: int = 0) -> ShardLoader:
    """A training loader: `num_steps` batches of `batch_size` samples, collated by `collate_fn`,
    from this rank's shards of `pattern`, resampled so that every rank takes the same number of
    steps; the first `skip` are dropped (a resumed job)."""
    stream = sample_stream(pattern, rank=rank, world_size=world_size, resampled=True,
                           shuffle_buffer=shuffle_buffer, seed=seed, on_corrupt=on_corrupt)
    return ShardLoader(stream, batch_size=batch_size, collate_fn=collate_fn,
                       num_steps=num_steps, num_workers=num_workers, skip=skip)


def make_mixed_loader(patterns: list[str], weights: list[float] | None = None, *,
                      batch_size: int, collate_fn: Callable[[list[dict]], Any], num_steps: int,
                      rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0,
                      on_corrupt: str = "error", shuffle_buffer: int = 0, skip: int = 0
                      ) -> ShardLoader:
    """`make_loader` over a mix of patterns (the replay mix): each sample comes from pattern i
    with probability weights[i] (default: equal); see `mixed_stream`."""
    stream = mixed_stream(patterns, weights, rank=rank, world_size=world_size,
                          shuffle_buffer=shuffle_buffer, seed=seed, on_corrupt=on_corrupt)
    return ShardLoader(stream, batch_size=batch_size, collate_fn=collate_fn,
                       num_steps=num_steps, num_workers=num_workers, skip=skip)
