"""The built-in datasets: one small task per modality, answerable only from the input, in two
task sets (TASK_SETS):

- `classify` (the embedded default's): a one-word answer out of 4-10 per modality;
- `compositional` (the MCL benchmark's): open-ended answers that combine 2-3 attributes
  ("a small seven at the top left", "a small digit moving left , fast", "a loud high do",
  "a large cone , near"), with words shared across modalities (small, large, left, right, the
  digits); every fifth combination of attribute values is held out of training and appears
  only in eval, so neither a finetune nor a replay set covers the answer space.

Nothing is downloaded: image and video use scikit-learn's bundled handwritten digits, audio is
synthesised tones, depth is rendered shapes. Each task is learnable by a tiny model on a CPU in
minutes and generated in seconds; the same seed always gives byte-identical shards.
"""
from __future__ import annotations

import functools
import itertools
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


def _digit_on_canvas(rng: np.random.Generator, split: str, digit: int, size: int,
                     corner: tuple[int, int], jitter: int) -> np.ndarray:
    """The digit, size x size, rotated up to 6 degrees, its top left corner at `corner` moved up
    to `jitter` px and kept on the canvas: uint8 (32, 32)."""
    img = _resized_digit(rng, split, digit, size, max_angle=6)
    y, x = np.clip(np.asarray(corner) + rng.integers(-jitter, jitter + 1, size=2), 0, SIZE - size)
    canvas = np.zeros((SIZE, SIZE), np.float32)
    canvas[y:y + size, x:x + size] = img
    return _to_uint8(canvas, rng)


def _image(rng: np.random.Generator, c: tuple[int, ...], split: str) -> np.ndarray:
    """classify: the digit, 22..26 px, up to 2 px off centre."""
    size = int(rng.integers(22, 27))
    centre = (SIZE - size) // 2
    return _digit_on_canvas(rng, split, c[0], size, (centre, centre), jitter=2)


def _placed_image(rng: np.random.Generator, c: tuple[int, ...], split: str) -> np.ndarray:
    """compositional (size, digit, position): a small (9..11 px) or large (15..16 px) digit in
    the middle of a quadrant (top left, top right, bottom left, bottom right), up to 1 px off."""
    size_, digit, position = c
    size = int(rng.integers(*((9, 12), (15, 17))[size_]))
    row, col = divmod(position, 2)
    half = SIZE // 2
    corner = (row * half + half // 2 - size // 2, col * half + half // 2 - size // 2)
    return _digit_on_canvas(rng, split, digit, size, corner, jitter=1)


# (row, column) step of each answer: left, right, up, down
_MOVES = ((0, -1), (0, 1), (-1, 0), (1, 0))


def _moving_digit(rng: np.random.Generator, split: str, direction: int,
                  sizes: tuple[int, int], steps: tuple[int, int]) -> np.ndarray:
    """Any digit of a size in [sizes) crossing the canvas in `direction`, a step in [steps) px a
    frame: uint8 (4, 32, 32)."""
    size = int(rng.integers(*sizes))
    digit = _resized_digit(rng, split, None, size, max_angle=8)
    step = int(rng.integers(*steps))
    travel = step * (NUM_FRAMES - 1)
    free = SIZE - size
    start = []
    for d in _MOVES[direction]:  # the whole path stays on the canvas
        lo, hi = (0, free) if d == 0 else ((0, free - travel) if d > 0 else (travel, free))
        start.append(int(rng.integers(lo, hi + 1)))
    frames = np.zeros((NUM_FRAMES, SIZE, SIZE), np.float32)
    for t in range(NUM_FRAMES):
        y, x = (s + d * step * t for s, d in zip(start, _MOVES[direction]))
        frames[t, y:y + size, x:x + size] = digit
    return _to_uint8(frames, rng)


def _video(rng: np.random.Generator, c: tuple[int, ...], split: str) -> np.ndarray:
    """classify: a digit of 10..14 px moving 3..4 px a frame."""
    return _moving_digit(rng, split, c[0], (10, 15), (3, 5))


def _sized_video(rng: np.random.Generator, c: tuple[int, ...], split: str) -> np.ndarray:
    """compositional (size, direction, speed): a small (7..9 px) or large (13..15 px) digit,
    slow (1..2 px a frame) or fast (4..5)."""
    size, direction, speed = c
    return _moving_digit(rng, split, direction, ((7, 10), (13, 16))[size], ((1, 3), (4, 6))[speed])


# --- tones (audio) ------------------------------------------------------------------------------

NOTE_HZ = (261.63, 293.66, 329.63, 349.23, 392.00, 440.00, 493.88)  # C4 D4 E4 F4 G4 A4 B4


def _tone(rng: np.random.Generator, hz: float, amplitudes: tuple[float, float]) -> np.ndarray:
    """1 s at `hz`, random amplitude in `amplitudes` and phase, 10 ms fades, light noise:
    float32 in [-1, 1]."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    phase = rng.uniform(0, 2 * np.pi)
    wave = rng.uniform(*amplitudes) * np.sin(2 * np.pi * hz * t + phase)
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
    wave = wave * fade + rng.normal(0.0, 0.01, t.shape)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _audio(rng: np.random.Generator, c: tuple[int, ...], split: str) -> np.ndarray:
    """classify: the note, amplitude 0.2..0.8."""
    return _tone(rng, NOTE_HZ[c[0]], (0.2, 0.8))


def _loud_audio(rng: np.random.Generator, c: tuple[int, ...], split: str) -> np.ndarray:
    """compositional (loudness, octave, note): quiet (0.05..0.15) or loud (0.5..0.9), in the
    4th octave (low) or the 5th (high)."""
    loudness, octave, note = c
    return _tone(rng, NOTE_HZ[note] * (1, 2)[octave], ((0.05, 0.15), (0.5, 0.9))[loudness])


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


SHAPES = ("sphere", "cube", "cylinder", "cone")


def _rendered_depth(rng: np.random.Generator, shape: int, scale: float,
                    distances: tuple[float, float]) -> np.ndarray:
    """The shape, `scale` times its unit size, at a distance in `distances`, slightly off
    centre, randomly turned: float32 (32, 32) depth."""
    z = rng.uniform(*distances)
    centre = np.array([rng.uniform(-0.06, 0.06) * z, rng.uniform(-0.06, 0.06) * z, z])
    rot = _rotation(rng)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # Rays in the object's frame divided by the scale meet the unit shape at the same ray
        # parameters as the undivided rays meet the scaled shape: depths stay true.
        hits = _hits(SHAPES[shape], -centre @ rot / scale, _RAYS @ rot / scale, rng)
        # nearest hit in front of the camera and before the wall (NaN compares False: no hit)
        t = np.min([np.where((h > 0) & (h < BACKGROUND_DEPTH), h, np.inf) for h in hits], axis=0)
    depth = np.where(np.isfinite(t), t, BACKGROUND_DEPTH).reshape(SIZE, SIZE)
    return (depth + rng.normal(0.0, 0.005, depth.shape)).astype(np.float32)


def _depth(rng: np.random.Generator, c: tuple[int, ...], split: str) -> np.ndarray:
    """classify: the shape at unit size, 2..3 units away."""
    return _rendered_depth(rng, c[0], 1.0, (2.0, 3.0))


def _sized_depth(rng: np.random.Generator, c: tuple[int, ...], split: str) -> np.ndarray:
    """compositional (size, shape, distance): 0.6 (small) or 1.0 (large) times its unit size,
    1.6..2.1 units away (near) or 2.9..3.5 (far)."""
    size, shape, distance = c
    return _rendered_depth(rng, shape, (0.6, 1.0)[size], ((1.6, 2.1), (2.9, 3.5))[distance])


# --- the task sets ------------------------------------------------------------------------------

Render = Callable[[np.random.Generator, tuple[int, ...], str], np.ndarray]


@dataclass(frozen=True)
class Task:
    """A modality's task: the instruction, and an answer that fills `template` with one value of
    each attribute; `render(rng, the values' indices, split)` draws an input that shows them."""
    instruction: str
    attributes: tuple[tuple[str, ...], ...]
    template: str
    render: Render
    held_out: int = 0  # every held_out-th combination of values (product order) is eval only

    @property
    def combinations(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(len(v)) for v in self.attributes)))

    def answer(self, combination: tuple[int, ...]) -> str:
        return self.template.format(*(v[i] for v, i in zip(self.attributes, combination)))

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(self.answer(c) for c in self.combinations)

    def is_held_out(self, index: int) -> bool:
        return bool(self.held_out) and index % self.held_out == 0

    def split_combinations(self, split: str) -> list[int]:
        """Indices of the combinations a split draws from: eval all, train the others."""
        return [k for k in range(len(self.combinations))
                if split == "eval" or not self.is_held_out(k)]


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS = ("left", "right", "up", "down")
NOTES = ("do", "re", "mi", "fa", "sol", "la", "ti")
SIZES = ("small", "large")

TASK_SETS: dict[str, dict[str, Task]] = {
    "classify": {
        "image": Task("what digit is shown in the image ?", (DIGITS,), "{0}", _image),
        "video": Task("which way does the digit move in the video ?", (DIRECTIONS,), "{0}",
                      _video),
        "audio": Task("which note is played in the audio ?", (NOTES,), "{0}", _audio),
        "depth": Task("what shape is in the depth map ?", (SHAPES,), "{0}", _depth),
    },
    "compositional": {
        "image": Task("describe the digit in the image .",
                      (SIZES, DIGITS, ("top left", "top right", "bottom left", "bottom right")),
                      "a {0} {1} at the {2}", _placed_image, held_out=5),
        "video": Task("describe the motion in the video .",
                      (SIZES, DIRECTIONS, ("slow", "fast")), "a {0} digit moving {1} , {2}",
                      _sized_video, held_out=5),
        "audio": Task("describe the note in the audio .",
                      (("quiet", "loud"), ("low", "high"), NOTES), "a {0} {1} {2}", _loud_audio,
                      held_out=5),
        "depth": Task("describe the object in the depth map .",
                      (SIZES, SHAPES, ("near", "far")), "a {0} {1} , {2}", _sized_depth,
                      held_out=5),
    },
}
TASKS = TASK_SETS["classify"]  # the embedded default's


# --- shards -------------------------------------------------------------------------------------

def synth_samples(modality: str, split: str, n: int, seed: int = 0,
                  tasks: str = "classify") -> Iterator[dict[str, Any]]:
    """`n` raw samples of one modality and split of a task set, the split's combinations of
    attribute values balanced (counts differ by at most one) and shuffled. Each (seed, task set,
    modality, split) has its own random stream."""
    task_set = _task_set(tasks)
    task = task_set[modality]
    set_id = list(TASK_SETS).index(tasks)
    # classify keeps the stream it always had, so its shards stay byte-identical
    rng = np.random.default_rng([seed, list(task_set).index(modality), SPLITS.index(split)]
                                + ([set_id] if set_id else []))
    pool = task.split_combinations(split)
    picks = rng.permutation(np.arange(n) % len(pool))
    for i, pick in enumerate(picks.tolist()):
        label = pool[pick]
        combination = task.combinations[label]
        meta = {"modality": modality, "instruction": task.instruction,
                "answer": task.answer(combination), "label": label}
        if task.held_out:
            meta["held_out"] = task.is_held_out(label)
        yield encode_sample(f"{modality}-{split}-{i:06d}", meta, modality,
                            task.render(rng, combination, split),
                            SAMPLE_RATE if modality == "audio" else None)


def _task_set(name: str) -> dict[str, Task]:
    if name not in TASK_SETS:
        raise MeraError(f"task set {name!r} is not one of {', '.join(TASK_SETS)}")
    return TASK_SETS[name]


def synth_dataset(out: str, seed: int = 0, train_per_modality: int = 2000,
                  eval_per_modality: int = 200, samples_per_shard: int = 500,
                  tasks: str = "classify") -> dict[str, dict[str, str]]:
    """Write a built-in dataset (a task set of TASK_SETS) to OUT/<modality>/{train,eval}-NNNNNN.tar
    (a local path or an s3:// prefix); return {modality: {"train": pattern, "eval": pattern}}."""
    for name, value in (("train_per_modality", train_per_modality),
                        ("eval_per_modality", eval_per_modality),
                        ("samples_per_shard", samples_per_shard)):
        if value < 1:
            raise MeraError(f"{name} must be >= 1, got {value}")
    patterns: dict[str, dict[str, str]] = {}
    for modality in _task_set(tasks):
        patterns[modality] = {}
        for split, n in zip(SPLITS, (train_per_modality, eval_per_modality)):
            start = time.perf_counter()
            patterns[modality][split] = write_shards(
                synth_samples(modality, split, n, seed, tasks), storage.join(out, modality, split),
                samples_per_shard)
            log.info("%s %s: %d samples in %d shard(s), %.1f s", modality, split, n,
                     math.ceil(n / samples_per_shard), time.perf_counter() - start)
    return patterns
