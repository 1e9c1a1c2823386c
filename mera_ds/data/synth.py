"""The built-in dataset: one small task per modality, answerable only from the input.

Nothing is downloaded: image and video use scikit-learn's bundled handwritten digits, audio is
synthesised tones, depth is rendered shapes. Each task is learnable by a tiny model on a CPU in
minutes and generated in seconds; the same seed always gives byte-identical shards.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from mera_ds import storage
from mera_ds.data.writer import encode_sample, write_shards
from mera_ds.errors import MeraError

log = logging.getLogger("mera_ds.data")

SIZE = 32  # height and width of images, video frames and depth maps
NUM_FRAMES = 4
SAMPLE_RATE = 16000
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Task:
    instruction: str
    answers: tuple[str, ...]  # answers[label]
    input_kind: str


TASKS = {
    "image": Task("what digit is shown in the image ?",
                  ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                   "nine"), "image"),
    "video": Task("which way does the digit move in the video ?",
                  ("left", "right", "up", "down"), "video"),
    "audio": Task("which note is played in the audio ?",
                  ("do", "re", "mi", "fa", "sol", "la", "ti"), "audio"),
    "depth": Task("what shape is in the depth map ?",
                  ("sphere", "cube", "cylinder", "cone"), "depth"),
}


# --- digits (image, video) ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8) in 0..255, labels) of one split. The split is made on sklearn's
    1797 digit images before any augmentation, so eval digits are never seen in training."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    in_eval = np.arange(len(digits.target)) % 5 == 0
    keep = in_eval if split == "eval" else ~in_eval
    images = np.round(digits.images[keep] * (255 / 16)).astype(np.uint8)
    return images, digits.target[keep]


def _resized_digit(rng: np.random.Generator, split: str, label: int | None, size: int,
                   max_angle: float) -> np.ndarray:
    """A random digit of `label` (any if None) of the split, scaled to size x size, float."""
    from PIL import Image

    images, labels = _digit_pool(split)
    choices = np.flatnonzero(labels == label) if label is not None else np.arange(len(labels))
    src = Image.fromarray(images[rng.choice(choices)])
    img = src.resize((size, size), Image.BILINEAR).rotate(
        rng.uniform(-max_angle, max_angle), resample=Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) * rng.uniform(0.7, 1.0)


def _to_uint8(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(0.0, 6.0, x.shape), 0, 255).round().astype(np.uint8)


def _image(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """A digit of 22..26 px, rotated up to 6 degrees, up to 2 px off centre: uint8 (32, 32)."""
    size = int(rng.integers(22, 27))
    digit = _resized_digit(rng, split, label, size, max_angle=6)
    centre = (SIZE - size) // 2
    y, x = np.clip(centre + rng.integers(-2, 3, size=2), 0, SIZE - size)
    canvas = np.zeros((SIZE, SIZE), np.float32)
    canvas[y:y + size, x:x + size] = digit
    return _to_uint8(canvas, rng)


# (row, column) step of each answer: left, right, up, down
_MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0))


def _video(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """Any digit of 10..14 px crossing the canvas 3..4 px a frame: uint8 (4, 32, 32)."""
    size = int(rng.integers(10, 15))
    digit = _resized_digit(rng, split, None, size, max_angle=8)
    step = int(rng.integers(3, 5))
    travel = step * (NUM_FRAMES - 1)
    free = SIZE - size
    start = []
    for d in _MOVES[label]:  # the whole path stays on the canvas
        lo, hi = (0, free) if d == 0 else ((0, free - travel) if d > 0 else (travel, free))
        start.append(int(rng.integers(lo, hi + 1)))
    frames = np.zeros((NUM_FRAMES, SIZE, SIZE), np.float32)
    for t in range(NUM_FRAMES):
        y, x = (s + d * step * t for s, d in zip(start, _MOVES[label]))
        frames[t, y:y + size, x:x + size] = digit
    return _to_uint8(frames, rng)


# --- tones (audio) ------------------------------------------------------------------------------

NOTE_HZ = (261.63, 293.66, 329.63, 349.23, 392.00, 440.00, 493.88)  # C4 D4 E4 F4 G4 A4 B4


def _audio(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """1 s of the note, random amplitude and phase, 10 ms fades, light noise: float32 in [-1, 1]."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    phase = rng.uniform(0, 2 * np.pi)
    wave = rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * NOTE_HZ[label] * t + phase)
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
    wave = wave * fade + rng.normal(0.0, 0.01, t.shape)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


# --- rendered shapes (depth) --------------------------------------------------------------------

BACKGROUND_DEPTH = 5.0  # a wall behind the object
_PIXELS = (np.arange(SIZE) + 0.5) / SIZE - 0.5
_U, _V = np.meshgrid(_PIXELS, -_PIXELS)
# Pinhole camera at the origin looking along +z: one ray per pixel, with unit z so that the ray
# parameter t of a hit is its z-buffer depth.
_RAYS = np.stack([_U.ravel(), _V.ravel(), np.ones(SIZE * SIZE)], axis=1)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Any turn about the vertical axis, tilted up to ~35 degrees forward and ~17 sideways."""
    yaw, pitch, roll = rng.uniform(0, 2 * np.pi), rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.3)
    cy, sy, cp, sp, cr, sr = (np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch),
                              np.cos(roll), np.sin(roll))
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return rz @ rx @ ry


def _roots(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of a t^2 + b t + c = 0 per ray (inf where none)."""
    disc = b * b - 4 * a * c
    sq = np.sqrt(np.maximum(disc, 0))
    t1, t2 = (-b - sq) / (2 * a), (-b + sq) / (2 * a)
    return np.where(disc >= 0, t1, np.inf), np.where(disc >= 0, t2, np.inf)


def _hits(shape: str, o: np.ndarray, d: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Candidate ray parameters where rays (origin o, directions d, in the object's frame) meet
    the shape's surface: unit-free sizes, centred at the origin, axis along y."""
    ox, oy, oz = o
    dx, dy, dz = d.T
    if shape == "sphere":
        r = rng.uniform(0.4, 0.6)
        return list(_roots((d * d).sum(1), 2 * (d @ o), o @ o - r * r))
    if shape == "cube":  # slab method
        h = rng.uniform(0.3, 0.45)
        ta, tb = (-h - o) / d, (h - o) / d
        near, far = np.minimum(ta, tb).max(1), np.maximum(ta, tb).min(1)
        return [np.where(far >= near, near, np.inf)]
    h = rng.uniform(0.35, 0.55)  # half height
    if shape == "cylinder":
        r = rng.uniform(0.3, 0.45)
        side = _roots(dx * dx + dz * dz, 2 * (ox * dx + oz * dz), ox * ox + oz * oz - r * r)
        caps = [(h, r), (-h, r)]
    else:  # cone: apex at y = h, base of radius r at y = -h
        r = rng.uniform(0.4, 0.55)
        k, w = r / (2 * h), h - oy
        side = _roots(dx * dx + dz * dz - k * k * dy * dy, 2 * (ox * dx + oz * dz + k * k * w * dy),
                      ox * ox + oz * oz - k * k * w * w)
        caps = [(-h, r)]
    hits = [np.where(np.abs(oy + t * dy) <= h, t, np.inf) for t in side]
    for y, radius in caps:
        t = (y - oy) / dy
        hits.append(np.where((ox + t * dx) ** 2 + (oz + t * dz) ** 2 <= radius ** 2, t, np.inf))
    return hits


def _depth(rng: np.random.Generator, label: int, split: str) -> np.ndarray:
    """The shape 2..3 units away, slightly off centre, randomly turned: float32 (32, 32) depth."""
    z = rng.uniform(2.0, 3.0)
    centre = np.array([rng.uniform(-0.06, 0.06) * z, rng.uniform(-0.06, 0.06) * z, z])
    rot = _rotation(rng)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        hits = _hits(TASKS["depth"].answers[label], -centre @ rot, _RAYS @ rot, rng)
        # nearest hit in front of the camera and before the wall (NaN compares False: no hit)
        t = np.min([np.where((h > 0) & (h < BACKGROUND_DEPTH), h, np.inf) for h in hits], axis=0)
    depth = np.where(np.isfinite(t), t, BACKGROUND_DEPTH).reshape(SIZE, SIZE)
    return (depth + rng.normal(0.0, 0.005, depth.shape)).astype(np.float32)


_RENDER: dict[str, Callable[[np.random.Generator, int, str], np.ndarray]] = {
    "image": _image, "video": _video, "audio": _audio, "depth": _depth}


# --- shards -------------------------------------------------------------------------------------

def synth_samples(modality: str, split: str, n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """`n` raw samples of one modality and split, classes balanced (counts differ by at most one)
    and shuffled. Each (seed, modality, split) has its own random stream."""
    task = TASKS[modality]
    rng = np.random.default_rng([seed, list(TASKS).index(modality), SPLITS.index(split)])
    labels = rng.permutation(np.arange(n) % len(task.answers))
    for i, label in enumerate(labels.tolist()):
        meta = {"modality": modality, "instruction": task.instruction,
                "answer": task.answers[label], "label": label}
        yield encode_sample(f"{modality}-{split}-{i:06d}", meta, task.input_kind,
                            _RENDER[modality](rng, label, split),
                            SAMPLE_RATE if modality == "audio" else None)


def synth_dataset(out: str, seed: int = 0, train_per_modality: int = 2000,
                  eval_per_modality: int = 200, samples_per_shard: int = 500
                  ) -> dict[str, dict[str, str]]:
    """Write the built-in dataset to OUT/<modality>/{train,eval}-NNNNNN.tar (a local path or an
    s3:// prefix); return {modality: {"train": pattern, "eval": pattern}}."""
    for name, value in (("train_per_modality", train_per_modality),
                        ("eval_per_modality", eval_per_modality),
                        ("samples_per_shard", samples_per_shard)):
        if value < 1:
            raise MeraError(f"{name} must be >= 1, got {value}")
    patterns: dict[str, dict[str, str]] = {}
    for modality in TASKS:
        patterns[modality] = {}
        for split, n in zip(SPLITS, (train_per_modality, eval_per_modality)):
            start = time.perf_counter()
            patterns[modality][split] = write_shards(
                synth_samples(modality, split, n, seed), storage.join(out, modality, split),
                samples_per_shard)
            log.info("%s %s: %d samples in %d shard(s), %.1f s", modality, split, n,
                     math.ceil(n / samples_per_shard), time.perf_counter() - start)
    return patterns
