"""The text the MCL benchmark's base LLM is pretrained on (mera_ds.model.base): generated English-
like sentences, one per line, that use every word of the compositional tasks' instructions and
answers (mera_ds.data.synth) among other words and in other phrasings, so that the LLM knows the
words, and how they go together, before it sees any modality, as a real MLLM's LLM does.

No text can be downloaded here and none that a package ships covers the tasks' words, hence a
small grammar: templates whose slots are filled with the tasks' attribute values or filler words.
"""
from __future__ import annotations

import string
from typing import Iterator

import numpy as np

from mera_ds.data.synth import DIGITS, DIRECTIONS, NOTES, SHAPES, SIZES, SPLITS, TASK_SETS

_TASKS = TASK_SETS["compositional"]
# The attribute slots, each with its values as the tasks define them.
SLOTS: dict[str, tuple[str, ...]] = {
    "size": SIZES, "digit": DIGITS, "direction": DIRECTIONS, "note": NOTES, "shape": SHAPES,
    "position": _TASKS["image"].attributes[2], "speed": _TASKS["video"].attributes[2],
    "loudness": _TASKS["audio"].attributes[0], "octave": _TASKS["audio"].attributes[1],
    "distance": _TASKS["depth"].attributes[2],
    # filler words
    "noun": ("cat", "dog", "house", "tree", "car", "book", "river", "bird", "table", "window",
             "song", "light", "screen", "page", "room", "city", "road", "boat", "friend",
             "picture", "piano", "garden", "letter", "door"),
    "adjective": ("red", "blue", "green", "old", "new", "bright", "dark", "warm", "cold",
                  "happy", "long", "short", "round", "soft", "heavy", "clear"),
    "verb": ("saw", "found", "liked", "drew", "painted", "carried", "watched", "kept", "showed",
             "noticed", "described", "remembered"),
    "person": ("she", "he", "i", "we", "they", "the child", "my friend", "the teacher"),
    "thing": ("digit", "motion", "note", "object", "shape", "number", "sound"),
    "medium": ("image", "video", "audio", "depth map", "picture", "recording", "photo"),
}

TEMPLATES = (
    "{person} {verb} a {adjective} {noun} near the {noun} .",
    "the {adjective} {noun} was {distance} the {noun} .",
    "there was a {size} {digit} at the {position} of the page .",
    "{person} wrote a {size} {digit} at the {position} .",
    "a {size} {digit} at the {position} , and a {size} {digit} at the {position} .",
    "the number {digit} comes after {digit} and before {digit} .",
    "{person} counted {digit} {noun}s on the {noun} .",
    "a {size} digit moving {direction} , {speed} , crossed the screen .",
    "the {noun} was moving {direction} , {speed} .",
    "{person} moved the {size} {noun} {direction} , then {direction} .",
    "{person} played a {loudness} {octave} {note} on the piano .",
    "a {loudness} {octave} {note} , then a {loudness} {octave} {note} .",
    "the song starts on {note} and ends on {note} .",
    "a {size} {shape} , {distance} , stood by the {noun} .",
    "{person} {verb} a {size} {shape} that was {distance} .",
    "the {shape} was {size} and the {noun} was {adjective} .",
    "describe the {thing} in the {medium} .",
    "please describe the {adjective} {noun} in the {medium} .",
    "the {thing} in the {medium} was {size} and {adjective} .",
    "{person} {verb} the {medium} and described the {thing} .",
)


def _fill(template: str, rng: np.random.Generator) -> str:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    values = iter([SLOTS[f][rng.integers(len(SLOTS[f]))] for f in fields])
    # each slot is filled on its own: "{digit} ... {digit}" are two draws
    return "".join(text + (next(values) if field else "")
                   for text, field, _, _ in string.Formatter().parse(template))


# Dialogues in the template the benchmark's prompts use (mera_ds.model.prompt's plain one),
# whose answer restates what the user turn described: an LLM that learned to answer from its
# context is what an MLLM's connector feeds (a text-only LLM never needs to look further back
# than its sentence otherwise, and then ignores the modality tokens).
INTROS = ("here is", "the {medium} shows", "there is", "i see", "look :")
DIALOGUE = "user : {intro} {description} . {filler} {question} assistant : {description}"
DIALOGUE_SHARE = 0.4


def _dialogue(rng: np.random.Generator) -> str:
    task = list(_TASKS.values())[rng.integers(len(_TASKS))]
    description = task.answer(task.combinations[rng.integers(len(task.combinations))])
    filler = _fill(TEMPLATES[rng.integers(len(TEMPLATES))], rng) if rng.random() < 0.5 else ""
    return " ".join(DIALOGUE.format(
        intro=_fill(INTROS[rng.integers(len(INTROS))], rng), description=description,
        filler=filler, question=task.instruction).split())


def sentences(n: int, seed: int, split: str = "train") -> Iterator[str]:
    """`n` lines of a split (train, eval): sentences of templates drawn uniformly, and a share
    of dialogues; the same seed gives the same text."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 0x7E47])
    for _ in range(n):
        yield _dialogue(rng) if rng.random() < DIALOGUE_SHARE else \
            _fill(TEMPLATES[rng.integers(len(TEMPLATES))], rng)


def task_words() -> set[str]:
    """Every word of the compositional tasks' instructions and answers."""
    words = set()
    for task in _TASKS.values():
        words.update(task.instruction.split())
        for answer in task.answers:
            words.update(answer.split())
    return words
