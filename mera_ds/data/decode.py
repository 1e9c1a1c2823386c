"""Decoding a raw sample into the decoded-sample dict of docs/DATA.md: its json (modality,
instruction, answer) and its one input field, checked for the shape its kind needs.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from mera_ds.data.tar import CorruptDataError

# Tar member extension of each input field -> input_kind of the decoded sample (docs/DATA.md).
INPUT_KINDS = {"png": "image", "jpg": "image", "jpeg": "image", "video.npy": "video",
               "wav": "audio", "flac": "audio", "depth.npy": "depth", "feat.npy": "features"}


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
    """What is wrong with a decoded input of this kind, if anything (the shapes of docs/DATA.md)."""
    if kind in ("image", "video"):
        gray = 2 if kind == "image" else 3  # (H, W) or (T, H, W), or with 3 channels last
        if not (arr.ndim == gray or (arr.ndim == gray + 1 and arr.shape[-1] == 3)):
            return f"shape {arr.shape} is not a {kind} input"
        return None if arr.dtype == np.uint8 else f"dtype {arr.dtype} is not uint8"
    if arr.ndim != (1 if kind == "audio" else 2):
        return f"shape {arr.shape} is not a {kind} input"
    return None if arr.dtype.kind in "fiu" else f"dtype {arr.dtype} is not real numbers"


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample -> the decoded-sample dict of docs/DATA.md. Raises CorruptDataError naming the
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
