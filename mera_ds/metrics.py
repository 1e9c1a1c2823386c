"""The task metrics: a registry of name -> function (predictions, answers) -> score in [0, 1],
one reference answer per sample; those that are a mean over samples also give each sample's
score, for confidence intervals. `TaskConfig.metric` names one; evaluation and `mera export`
take them from here.

This module imports only the standard library at the top (the config validates metric names
against METRICS); a metric's own dependencies (sacrebleu) are imported when it runs.
"""
from __future__ import annotations

import functools
import re
import string
from collections import Counter
from typing import Callable, Optional, Sequence

Metric = Callable[[Sequence[str], Sequence[str]], float]
SampleScore = Callable[[str, str], float]

METRICS: dict[str, Metric] = {}
# The metrics that are a mean over samples, by name: each sample's score (what a bootstrap
# confidence interval resamples).
SAMPLE_SCORES: dict[str, SampleScore] = {}


def _checked(name: str, fn: Callable[[list[str], list[str]], float]) -> Metric:
    """`fn` behind the checks every metric needs: one prediction per answer, at least one
    sample."""
    @functools.wraps(fn)
    def metric(predictions: Sequence[str], answers: Sequence[str]) -> float:
        if len(predictions) != len(answers):
            raise ValueError(f"{name}: {len(predictions)} predictions for {len(answers)} "
                             f"answers")
        if not answers:
            raise ValueError(f"{name}: no samples")
        return fn(list(predictions), list(answers))

    return metric


def _registered(fn: Callable[[list[str], list[str]], float]) -> Metric:
    """Register a corpus-level metric under its name."""
    METRICS[fn.__name__] = _checked(fn.__name__, fn)
    return METRICS[fn.__name__]


def _per_sample(fn: SampleScore) -> Metric:
    """Register a metric that is the mean of `fn(prediction, answer)` over the samples."""
    def mean(predictions: list[str], answers: list[str]) -> float:
        return sum(map(fn, predictions, answers)) / len(answers)

    SAMPLE_SCORES[fn.__name__] = fn
    METRICS[fn.__name__] = functools.wraps(fn)(_checked(fn.__name__, mean))
    return METRICS[fn.__name__]


def sample_scores(metric: str, predictions: Sequence[str], answers: Sequence[str]
                  ) -> Optional[list[float]]:
    """Each sample's score under `metric`, or None for a corpus-level metric (bleu)."""
    fn = SAMPLE_SCORES.get(metric)
    return None if fn is None else [fn(p, a) for p, a in zip(predictions, answers)]


def bootstrap_interval(values: Sequence[float], seed: int = 0, resamples: int = 1000,
                       level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap confidence interval of the mean of `values`."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _words(text: str) -> str:
    return " ".join(text.lower().split())


@_per_sample
def exact_match(prediction: str, answer: str) -> float:
    """Share of predictions equal to their answer, ignoring case and whitespace runs."""
    return float(_words(prediction) == _words(answer))


# The answer normalization of the official VQA evaluation (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py), its tables as they are there.
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!"]
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD = re.compile(r"\.(?!\d)")  # the official (?!<=\d)(\.)(?!\d): its first group is a no-op
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've"}


def vqa_normalize(text: str) -> str:
    """An answer as the official VQA evaluation compares it: punctuation dropped (or made a
    space where it joins two words), periods not before a digit dropped, lower case, number
    words as digits, articles dropped, contractions given their apostrophe."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        if p + " " in text or " " + p in text or _VQA_DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


@_per_sample
def vqa_accuracy(prediction: str, answer: str) -> float:
    """Share of predictions equal to their answer after the VQA normalization. With one reference
    answer per sample this is VQA's accuracy min(1, matches / 3) taken as a plain match: the
    official formula needs the ten human answers of VQA v2."""
    return float(vqa_normalize(prediction) == vqa_normalize(answer))


_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_tokens(text: str) -> list[str]:
    """SQuAD's normalize_answer, split: lower case, ASCII punctuation and articles dropped."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return _SQUAD_ARTICLES.sub(" ", text).split()


@_per_sample
def token_f1(prediction: str, answer: str) -> float:
    """SQuAD's token F1 (the harmonic mean of token precision and recall after its
    normalization), averaged over the samples: partial credit for longer answers."""
    pred, gold = squad_tokens(prediction), squad_tokens(answer)
    if not pred or not gold:  # SQuAD v2: an empty answer is matched only by an empty one
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


@_registered
def bleu(predictions: list[str], answers: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenization, case-sensitive, up to 4-grams, exp smoothing)
    / 100 (at most 1: a perfect corpus gives 100 + rounding): for caption-like answers; a corpus
    of one-word answers has no 2-grams and scores 0."""
    import sacrebleu

    return min(1.0, sacrebleu.corpus_bleu(predictions, [answers]).score / 100)
