"""Reading WebDataset shards from local paths and s3:// URLs into decoded samples.

Each rank reads its own shards (explicit node splitter), each DataLoader worker its part of those;
training streams resample shards forever and are cut into a fixed number of batches per rank, so
every rank takes the same number of steps however the shards differ in size.

webdataset composes the pipeline (batching, epochs); the tar reading and decoding are ours because
webdataset's tar iterator ends quietly at a bad header and its errors lose the shard and sample
names. Every bad shard or sample either stops with a one-line MeraError naming the shard URL and
the sample key, or (on_corrupt="skip") is dropped, counted and logged.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import multiprocessing
import random
import re
import tarfile
import zlib
from typing import Any, Callable, Iterator, Sequence

import braceexpand
import numpy as np
import torch.utils.data
import webdataset as wds

from mera_ds import storage
from mera_ds.errors import MeraError

log = logging.getLogger("mera_ds.data")

# Tar member extension of each input field -> input_kind of the decoded sample (COMMON.md).
INPUT_KINDS = {"png": "image", "jpg": "image", "jpeg": "image", "video.npy": "video",
               "wav": "audio", "flac": "audio", "depth.npy": "depth", "feat.npy": "features"}
ON_CORRUPT = ("error", "skip")


class CorruptDataError(MeraError):
    """A shard or sample that cannot be read; `kind` is "shard" or "sample"."""

    def __init__(self, message: str, kind: str = "sample"):
        super().__init__(message)
        self.kind = kind


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


def expand_shards(pattern: str) -> list[str]:
    """The shard URLs of a brace pattern ("dir/train-{000000..000003}.tar"); parts with glob
    wildcards are listed from storage. Fails if nothing matches."""
    if not pattern or not pattern.strip():
        raise MeraError("empty shard pattern")
    try:
        parts = list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise MeraError(f"{pattern}: unbalanced braces in shard pattern") from None
    urls = []
    for part in parts:
        if not glob.has_magic(part):
            urls.append(part)
            continue
        fs, path = storage.url_to_fs(part)
        scheme = part.split("://", 1)[0] + "://" if storage.is_remote(part) else ""
        urls.extend(scheme + p for p in sorted(fs.glob(path)))
    if not urls:
        raise MeraError(f"{pattern}: no shards matched")
    return urls


def rank_shards(pattern: str, urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards of one rank: disjoint across ranks, together all of them."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise MeraError(f"bad rank {rank} for world size {world_size}")
    if len(urls) < world_size:
        raise MeraError(f"{pattern}: {len(urls)} shard(s) for {world_size} ranks; every rank "
                        "needs a shard of its own (write more, smaller shards)")
    return list(urls[rank::world_size])


def _base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """("dir/key", "video.npy") from "dir/key.video.npy": the key ends at the first dot."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly at a missing, short or garbled header, so a truncated shard
    would just look shorter; only a real end-of-archive block ends it here."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"{e} at byte {tf.offset} (truncated or not a tar)") from None


def raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """The undecoded samples of one shard: {"__key__", "__url__", <extension>: bytes, ...}.

    Raises CorruptDataError (kind "shard") naming the shard and the sample being read when the tar
    is truncated or malformed; a missing shard is a plain MeraError.
    """
    key = None
    current: dict[str, Any] | None = None
    try:
        with storage.open_url(url, "rb") as f, \
                tarfile.open(fileobj=f, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, ext = _base_plus_ext(member.name)
                if prefix is None or prefix.rsplit("/", 1)[-1].startswith("__"):
                    continue  # not a sample member (webdataset's __meta__ convention)
                key = prefix
                if current is not None and current["__key__"] != prefix:
                    yield current  # complete: hand it on before reading further
                    current = None
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                data = tar.extractfile(member).read()
                if ext in current:
                    raise CorruptDataError(f"{url}: sample {prefix!r}: duplicate member {ext!r}",
                                           kind="shard")
                current[ext] = data
    except FileNotFoundError:
        raise MeraError(f"{url}: no such shard") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        where = f"at sample {key!r}" if key else "before its first sample"
        raise CorruptDataError(f"{url}: corrupt or unreadable shard {where}: {e}",
                               kind="shard") from None
    if current is not None:
        yield current


def _decode_field(ext: str, data: bytes) -> tuple[np.ndarray, int | None]:
    if ext in ("png", "jpg", "jpeg"):
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB" if img.mode in ("RGBA", "P", "CMYK", "YCbCr") else "L")
            return np.asarray(img, dtype=np.uint8), None
    if ext in ("wav", "flac"):
        import soundfile

        audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return audio.mean(axis=1), int(rate)  # mono: the audio encoders take one channel
    arr = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle data from a shard
    return arr, None


def _input_error(kind: str, arr: np.ndarray) -> str | None:
    """What is wrong with a decoded input of this kind, if anything (the shapes of COMMON.md)."""
    if kind in ("image", "video"):
        gray = 2 if kind == "image" else 3  # (H, W) or (T, H, W), or with 3 channels last
        if not (arr.ndim == gray or (arr.ndim == gray + 1 and arr.shape[-1] == 3)):
            return f"shape {arr.shape} is not a {kind} input"
        return None if arr.dtype == np.uint8 else f"dtype {arr.dtype} is not uint8"
    if arr.ndim != (1 if kind == "audio" else 2):
        return f"shape {arr.shape} is not a {kind} input"
    return None if arr.dtype.kind in "fiu" else f"dtype {arr.dtype} is not real numbers"


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample -> the decoded-sample dict of COMMON.md. Raises CorruptDataError naming the
    shard and the key."""
    url, key = raw.get("__url__", "?"), raw["__key__"]
    where = f"{url}: sample {key!r}"
    if "json" not in raw:
        raise CorruptDataError(f"{where}: no json member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{where}: json does not parse ({e})") from None
    if not isinstance(meta, dict):
        raise CorruptDataError(f"{where}: json is not an object")
    for field in ("modality", "instruction", "answer"):
        if not isinstance(meta.get(field), str):
            raise CorruptDataError(f"{where}: json has no string {field!r}")
    inputs = [ext for ext in raw if ext in INPUT_KINDS]
    if len(inputs) != 1:
        raise CorruptDataError(f"{where}: needs exactly one input member "
                               f"({', '.join(INPUT_KINDS)}), has {inputs or 'none'}")
    ext = inputs[0]
    kind = INPUT_KINDS[ext]
    try:
        arr, rate = _decode_field(ext, raw[ext])
    except Exception as e:  # PIL, soundfile and numpy each raise their own types
        msg = str(e).replace("\n", " ")
        raise CorruptDataError(f"{where}: {ext} does not decode ({type(e).__name__}: {msg})") \
            from None
    problem = _input_error(kind, arr)
    if problem:
        raise CorruptDataError(f"{where}: {ext}: {problem}")
    if kind not in ("image", "video"):
        arr = arr.astype(np.float32, copy=False)
    sample = {"__key__": key, "__url__": url, "modality": meta["modality"],
              "instruction": meta["instruction"], "answer": meta["answer"],
              "input_kind": kind, "input": arr}
    if rate is not None:
        sample["sample_rate"] = rate
    return sample


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
        for url in self._shard_order(rng):
            good = False
            try:
                for raw in raw_samples(url):
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
    """Exactly `num_steps` batches per iteration, on every rank (see `make_loader`)."""

    def __init__(self, stream: SampleStream | MixedStream, *, batch_size: int,
                 collate_fn: Callable[[list[dict]], Any], num_steps: int, num_workers: int):
        if batch_size < 1 or num_steps < 0 or num_workers < 0:
            raise MeraError(f"bad loader settings: batch_size={batch_size}, "
                            f"num_steps={num_steps}, num_workers={num_workers}")
        self.stream, self.num_steps, self.num_workers = stream, num_steps, num_workers
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
        return self.num_steps

    def __iter__(self) -> Iterator[Any]:
        if self.num_steps == 0:  # e.g. a job resumed after its last step
            return
        self.stream.set_epoch(self.epoch)
        self.epoch += 1
        for batch in itertools.islice(self.loader, self.num_steps):
            if isinstance(batch, _Failure):
                raise batch.error from None
            yield batch


def make_loader(pattern: str, *, batch_size: int, collate_fn: Callable[[list[dict]], Any],
                num_steps: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                num_workers: int = 0, on_corrupt: str = "error", shuffle_buffer: int = 0
                ) -> ShardLoader:
    """A training loader: `num_steps` batches of `batch_size` samples, collated by `collate_fn`,
    from this rank's shards of `pattern`, resampled so that every rank takes the same number of
    steps."""
    stream = sample_stream(pattern, rank=rank, world_size=world_size, resampled=True,
                           shuffle_buffer=shuffle_buffer, seed=seed, on_corrupt=on_corrupt)
    return ShardLoader(stream, batch_size=batch_size, collate_fn=collate_fn,
                       num_steps=num_steps, num_workers=num_workers)


def make_mixed_loader(patterns: list[str], weights: list[float] | None = None, *,
                      batch_size: int, collate_fn: Callable[[list[dict]], Any], num_steps: int,
                      rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 0,
                      on_corrupt: str = "error", shuffle_buffer: int = 0) -> ShardLoader:
    """`make_loader` over a mix of patterns (the replay mix): each sample comes from pattern i
    with probability weights[i] (default: equal); see `mixed_stream`."""
    stream = mixed_stream(patterns, weights, rank=rank, world_size=world_size,
                          shuffle_buffer=shuffle_buffer, seed=seed, on_corrupt=on_corrupt)
    return ShardLoader(stream, batch_size=batch_size, collate_fn=collate_fn,
                       num_steps=num_steps, num_workers=num_workers)
