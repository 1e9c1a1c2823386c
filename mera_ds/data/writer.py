"""Writing WebDataset shards: byte-reproducible tars that readers only ever see whole.

A sample is a dict {"__key__": str, <extension>: bytes, ...}; `encode_sample` builds one from a
decoded input (the inverse of `shards.decode_sample`), `write_shards` packs samples into
PREFIX-000000.tar, PREFIX-000001.tar, ... on a local path or an s3:// prefix.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import uuid
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds

from mera_ds import storage
from mera_ds.errors import MeraError

log = logging.getLogger("mera_ds.data")

# The tar member extension of each input kind (the standard WebDataset ones; see docs/DATA.md).
INPUT_EXTENSIONS = {"image": "png", "video": "video.npy", "audio": "wav", "depth": "depth.npy",
                    "features": "feat.npy"}


def shard_url(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_pattern(prefix: str, num_shards: int) -> str:
    """The brace pattern naming shards 0..num_shards-1 written under `prefix`."""
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def encode_input(kind: str, array: np.ndarray, sample_rate: int | None = None) -> tuple[str, bytes]:
    """(extension, bytes) of one input; deterministic, so the same array gives the same bytes."""
    buf = io.BytesIO()
    if kind == "image":
        from PIL import Image

        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    elif kind == "audio":
        import soundfile

        soundfile.write(buf, np.asarray(array, dtype=np.float32), sample_rate, format="WAV",
                        subtype="PCM_16")
    elif kind in ("video", "depth", "features"):
        np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    else:
        raise MeraError(f"unknown input kind {kind!r} (one of {', '.join(INPUT_EXTENSIONS)})")
    return INPUT_EXTENSIONS[kind], buf.getvalue()


def encode_sample(key: str, meta: dict[str, Any], kind: str, array: np.ndarray,
                  sample_rate: int | None = None) -> dict[str, Any]:
    """A raw sample: `meta` (modality, instruction, answer, label) as json plus one input field."""
    ext, data = encode_input(kind, array, sample_rate)
    return {"__key__": key, "json": json.dumps(meta, sort_keys=True).encode(), ext: data}


@contextlib.contextmanager
def shard_file(url: str) -> Iterator[Any]:
    """A file to write one shard into. Locally it is written under a temporary name and renamed on
    success; an S3 object only appears when its upload completes on close. Either way a reader
    never finds half a shard."""
    if storage.is_remote(url):
        with storage.open_url(url, "wb") as f:
            yield f
        return
    path = url.removeprefix("file://")
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with storage.open_url(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tar_writer(f) -> wds.TarWriter:
    """A tar writer on an open file whose bytes depend on the samples alone: members in sorted
    order with a fixed mtime, owner and mode (webdataset stamps the current time unless told)."""
    return wds.TarWriter(f, encoder=False, mtime=0, user="mera", group="mera")


def write_shards(samples: Iterable[dict[str, Any]], prefix: str, samples_per_shard: int) -> str:
    """Write raw samples to PREFIX-NNNNNN.tar, `samples_per_shard` per shard; return the pattern.
    The same samples always give the same bytes (`tar_writer`)."""
    if samples_per_shard < 1:
        raise MeraError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    it = iter(samples)
    num_shards = 0
    pending = next(it, None)
    while pending is not None:
        url = shard_url(prefix, num_shards)
        with shard_file(url) as f, tar_writer(f) as tar:
            for sample in itertools.chain([pending], itertools.islice(it, samples_per_shard - 1)):
                tar.write(sample)
        pending = next(it, None)
        log.debug("wrote %s", url)
        num_shards += 1
    if num_shards == 0:
        raise MeraError(f"{prefix}: no samples to write")
    return shard_pattern(prefix, num_shards)
