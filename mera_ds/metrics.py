"""The task metrics: a registry of name -> function (predictions, answers) -> score in [0, 1],
one reference answer per sample. `TaskConfig.metric` names one; evaluation and `mera export`
take them from here.

This module imports only the standard library at the top (the config validates metric names
against METRICS); a metric's own dependencies (sacrebleu) are imported when it runs.
"""
from __future__ import annotations

import functools
import re
import string
from collections import Counter
from typing import Callable, Sequence

Metric = Callable[[Sequence[str], Sequence[str]], float]

METRICS: dict[str, Metric] = {}


def _registered(fn: Callable[[list[str], list[str]], float]) -> Metric:
    """Register `fn` under its name, behind the checks every metric needs: one prediction per
    answer, and at least one sample."""
    @functools.wraps(fn)
    def metric(predictions: Sequence[str], answers: Sequence[str]) -> float:
        if len(predictions) != len(answers):
            raise ValueError(f"{fn.__name__}: {len(predictions)} predictions for {len(answers)} "
                             f"answers")
        if not answers:
            raise ValueError(f"{fn.__name__}: no samples")
        return fn(list(predictions), list(answers))

    METRICS[fn.__name__] = metric
    return metric


def _words(text: str) -> str:
    return " ".join(text.lower().split())


@_registered
def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions equal to their answer, ignoring case and whitespace runs."""
    return sum(_words(p) == _words(a) for p, a in zip(predictions, answers)) / len(answers)


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


@_registered
def vqa_accuracy(predictions: list[str], answers: list[str]) -> float:
    """Share of predictions equal to their answer after the VQA normalization. With one reference
    answer per sample this is VQA's accuracy min(1, matches / 3) taken as a plain match: the
    official formula needs the ten human answers of VQA v2."""
    return sum(vqa_normalize(p) == vqa_normalize(a)
               for p, a in zip(predictions, answers)) / len(answers)


_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_tokens(text: str) -> list[str]:
    """SQuAD's normalize_answer, split: lower case, ASCII punctuation and articles dropped."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return _SQUAD_ARTICLES.sub(" ", text).split()


def _f1(prediction: str, answer: str) -> float:
    pred, gold = squad_tokens(prediction), squad_tokens(answer)
    if not pred or not gold:  # SQuAD v2: an empty answer is matched only by an empty one
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


@_registered
def token_f1(predictions: list[str], answers: list[str]) -> float:
    """SQuAD's token F1 (the harmonic mean of token precision and recall after its
    normalization), averaged over the samples: partial credit for longer answers."""
    return sum(_f1(p, a) for p, a in zip(predictions, answers)) / len(answers)


@_registered
def bleu(predictions: list[str], answers: list[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenization, case-sensitive, up to 4-grams, exp smoothing)
    / 100 (at most 1: a perfect corpus gives 100 + rounding): for caption-like answers; a corpus
    of one-word answers has no 2-grams and scores 0."""
    import sacrebleu

    return min(1.0, sacrebleu.corpus_bleu(predictions, [answers]).score / 100)
