"""Decoding a raw sample into the decoded-sample dict of docs/DATA.md: its json (modality, and a
conversation: `messages`, or one turn as `instruction` and `answer`) and its one input field,
checked for the shape its kind needs.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from mera_ds.data.media import decode_audio
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
        return decode_audio(data)  # mono: the audio encoders take one channel
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


ROLES = ("user", "assistant")


def _messages(meta: dict, where: str) -> list[dict[str, str]]:
    """The sample's conversation: `messages` (user and assistant turns, alternating, from a user
    turn to an assistant one), or the one turn of `instruction` and `answer`."""
    if "messages" not in meta:
        for field in ("instruction", "answer"):
            if not isinstance(meta.get(field), str):
                raise CorruptDataError(f"{where}: json has no 'messages' and no string {field!r}")
        return [{"role": "user", "content": meta["instruction"]},
                {"role": "assistant", "content": meta["answer"]}]
    messages = meta["messages"]
    if not isinstance(messages, list) or len(messages) < 2 or len(messages) % 2:
        raise CorruptDataError(f"{where}: json 'messages' is not a list of user and assistant "
                               f"turns (an even number, at least 2)")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") == ROLES[i % 2]
                and isinstance(m.get("content"), str)):
            raise CorruptDataError(f"{where}: json 'messages[{i}]' is not "
                                   f"{{\"role\": \"{ROLES[i % 2]}\", \"content\": string}}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


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
    if not isinstance(meta.get("modality"), str):
        raise CorruptDataError(f"{where}: json has no string 'modality'")
    messages = _messages(meta, where)
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
              "messages": messages, "instruction": messages[0]["content"],
              "answer": messages[-1]["content"], "input_kind": kind, "input": arr}
    if rate is not None:
        sample["sample_rate"] = rate
    if "held_out" in meta:  # the built-in compositional tasks: its answer is in no training sample
        sample["held_out"] = bool(meta["held_out"])
    return sample
