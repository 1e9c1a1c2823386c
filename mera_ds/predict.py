"""Asking an exported model (mera_ds.bundle) about inputs: a file per question, or a JSONL file of
questions. Each input is read by its modality's encoder `input_kind` into the array a decoded
shard sample holds, and answered as evaluation answers (mera_ds.evaluate.generate).

Inputs: an image, audio or video file (mera_ds.data.media: audio resampled to the encoder's rate,
video sampled to its num_frames), a .npy array for depth maps (H, W) and features (N, D), or a
sample of a shard, `SHARD.tar#KEY`, decoded as training and evaluation decode it.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mera_ds.data import media
from mera_ds.errors import MeraError
from mera_ds.storage import open_url

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class Question:
    modality: str
    input: str                       # a file, or SHARD.tar#KEY
    prompt: str
    where: str = ""                  # a JSONL line, "FILE:N", named in errors
    given: Optional[dict] = None     # that line's object, written back with the answer

    @property
    def key(self) -> str:
        """The sample key: the line's "id", else where the question is."""
        given = self.given or {}
        return str(given["id"]) if "id" in given else self.where or self.input


def read_input(path: str, encoder) -> dict:
    """{"input_kind", "input"[, "sample_rate"]} of the file or shard sample at `path`, as the
    encoder takes it."""
    shard, _, key = path.rpartition("#")
    if shard.endswith(SHARD_SUFFIXES):
        return _shard_input(shard, key)
    kind = encoder.input_kind
    if kind == "image":
        return {"input_kind": kind, "input": media.read_image(path)}
    if kind == "audio":
        rate = encoder.features.sampling_rate
        return {"input_kind": kind, "input": media.read_audio(path, rate), "sample_rate": rate}
    if kind == "video":
        return {"input_kind": kind, "input": media.read_video(path, encoder.num_frames)}
    return {"input_kind": kind, "input": _read_npy(path, 2)}  # depth (H, W), features (N, D)


def _shard_input(shard: str, key: str) -> dict:
    from mera_ds.data.loader import read_samples

    for sample in read_samples(shard):
        if sample["__key__"] == key:
            return {k: sample[k] for k in ("input_kind", "input", "sample_rate") if k in sample}
    raise MeraError(f"{shard}: no sample with key {key!r}")


def _read_npy(path: str, ndim: int) -> np.ndarray:
    try:
        with open_url(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise MeraError(f"{path}: no such file") from None
    if not data.startswith(b"\x93NUMPY"):
        raise MeraError(f"{path}: not a .npy file")
    try:
        x = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickle an input
    except (ValueError, OSError, EOFError) as e:
        raise MeraError(f"{path}: not a .npy array ({e})") from None
    if x.ndim != ndim or x.dtype.kind not in "fiu":
        raise MeraError(f"{path}: a {x.dtype} array of shape {x.shape}, expected {ndim} "
                        f"dimensions of real numbers")
    return x.astype(np.float32, copy=False)


def sample(mllm, question: Question) -> dict:
    """The decoded sample of a question, as the collator takes it (docs/DATA.md): a one-turn
    conversation ending with the user turn, so the whole of it is the prompt."""
    try:
        read = read_input(question.input, mllm.encoders[question.modality])
    except MeraError as e:
        raise MeraError(f"{question.where}: {e}" if question.where else str(e)) from None
    return {"__key__": question.key, "modality": question.modality, **read,
            "messages": [{"role": "user", "content": question.prompt}],
            "instruction": question.prompt, "answer": ""}


def answer(mllm, bundle, questions: list[Question], max_new_tokens: Optional[int] = None,
           batch_size: int = 8) -> list[str]:
    """The answers to the questions, in their order. A batch holds one modality: its
    task.max_new_tokens (unless `max_new_tokens` is given) bounds the answers."""
    from mera_ds.evaluate import generate
    from mera_ds.model.mllm import Collator

    for q in questions:
        if q.modality not in mllm.encoders:
            raise MeraError(f"{q.where + ': ' if q.where else ''}modality {q.modality!r} is not "
                            f"in this model (it has {', '.join(mllm.encoders)})")
    collate = Collator(mllm, train=False)
    answers = [""] * len(questions)
    for m in bundle.modalities:
        todo = [i for i, q in enumerate(questions) if q.modality == m.name]
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            samples = [sample(mllm, questions[i]) for i in batch]
            texts = generate(mllm, collate, samples, max_new_tokens or m.task.max_new_tokens)
            for i, text in zip(batch, texts):
                answers[i] = text
    return answers


def read_questions(url: str) -> list[Question]:
    """The questions of a JSONL file: one object a line, {"modality", "input", "prompt"[, "id"]};
    blank lines skipped. Errors name the line."""
    try:
        with open_url(url, "r") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise MeraError(f"{url}: no such file") from None
    except UnicodeDecodeError:
        raise MeraError(f"{url}: not a JSONL file (not UTF-8 text)") from None
    questions = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{url}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MeraError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise MeraError(f"{where}: not a JSON object")
        for field in ("modality", "input", "prompt"):
            if not isinstance(obj.get(field), str):
                raise MeraError(f"{where}: no string {field!r}")
        extra = sorted(set(obj) - {"modality", "input", "prompt", "id"})
        if extra:
            raise MeraError(f"{where}: unknown field {extra[0]!r}")
        questions.append(Question(obj["modality"], obj["input"], obj["prompt"], where, obj))
    if not questions:
        raise MeraError(f"{url}: no questions")
    return questions


def answers_jsonl(questions: list[Question], answers: list[str]) -> str:
    """One line per question: its line as it was given, plus "answer"."""
    return "".join(json.dumps({**(q.given or {}), "answer": a}) + "\n"
                   for q, a in zip(questions, answers))
