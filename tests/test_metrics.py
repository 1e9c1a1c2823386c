"""The metric registry: each metric against values computed by hand (bleu against sacrebleu's own
corpus_bleu), the checks they share, and TaskConfig.metric validated against the registry."""
import subprocess
import sys

import pytest
import sacrebleu

from mera_ds.config import ConfigError, parse_config
from mera_ds.metrics import (METRICS, bleu, exact_match, squad_tokens, token_f1, vqa_accuracy,
                             vqa_normalize)

from .conftest import ENV, ROOT


def test_the_registry():
    assert list(METRICS) == ["exact_match", "vqa_accuracy", "token_f1", "bleu"]
    assert METRICS["exact_match"] is exact_match and METRICS["bleu"] is bleu


@pytest.mark.parametrize("metric", list(METRICS))
def test_every_metric_checks_its_inputs(metric):
    fn = METRICS[metric]
    with pytest.raises(ValueError, match=f"{metric}: 1 predictions for 2 answers"):
        fn(["a"], ["a", "b"])
    with pytest.raises(ValueError, match=f"{metric}: no samples"):
        fn([], [])
    assert fn(("the red cube is here",), ("the red cube is here",)) == pytest.approx(1.0)
    assert 0.0 <= fn(["red cube", "x", ""], ["a red cube", "y", "z"]) <= 1.0


def test_exact_match_normalises_case_and_whitespace():
    assert exact_match(["Three", "  left\n", "sol  la", "cube"],
                       ["three", "left", "sol la", "sphere"]) == 0.75


def test_vqa_normalization_is_the_official_one():
    cases = {
        "Two": "2",                      # number words to digits
        "the cat.": "cat",               # articles; a period not before a digit
        "A Dog": "dog",                  # lower case
        "dont know": "don't know",       # contractions get their apostrophe
        "3,000": "3000",                 # a comma between digits: punctuation dropped
        "yes!": "yes",                   # punctuation in a word becomes a space
        "x-ray": "x ray",
        "red , blue": "red blue",        # punctuation next to a space is dropped
        "2.5": "2.5",                    # a period before a digit stays
        "it is: 2\tnow\n": "it is: 2 now",  # ':' is not in VQA's list
    }
    assert {text: vqa_normalize(text) for text in cases} == cases


def test_vqa_accuracy_by_hand():
    predictions = ["Two", "the cat.", "a dog", "dont know", "3,000", "yes!", "x-ray", "2.5"]
    answers = ["2", "Cat", "dog", "don't know", "3000", "yes", "xray", "25"]
    # The last two differ after normalization ("x ray" / "xray", "2.5" / "25"): 6 of 8.
    assert vqa_accuracy(predictions, answers) == 0.75


def test_token_f1_by_hand():
    assert squad_tokens("The big, red cube!") == ["big", "red", "cube"]
    # [big red cube] vs [red cube]: 2 common tokens, precision 2/3, recall 1 -> F1 0.8;
    # [red red cube] vs [red cube]: "red" counts once -> 0.8 again; no common token -> 0;
    # both empty after normalization -> 1 (SQuAD v2).
    f1s = [0.8, 0.8, 0.0, 1.0]
    assert token_f1(["the big red cube", "Red, red cube!", "sphere", "the"],
                    ["a red cube", "red cube", "cube", "a"]) == pytest.approx(sum(f1s) / 4)
    assert token_f1(["red"], [""]) == 0.0


def test_bleu_is_sacrebleus_corpus_bleu():
    predictions = ["a red cube on the left of the image", "the digit moves up slowly",
                   "a high note is played twice"]
    answers = ["a red cube on the right of the image", "the digit moves up",
               "a low note is played twice"]
    expected = sacrebleu.corpus_bleu(predictions, [answers]).score / 100
    assert 0.2 < expected < 0.9
    assert bleu(predictions, answers) == pytest.approx(expected)
    assert bleu(answers, answers) == 1.0
    assert bleu(["cube"], ["cube"]) == 0.0  # no 2-, 3- or 4-grams at all


def test_task_metric_is_checked_against_the_registry(tiny_config):
    tiny_config["modalities"][0]["task"] = {"metric": "bleu", "max_new_tokens": 32}
    assert parse_config(tiny_config).modalities[0].task.metric == "bleu"
    tiny_config["modalities"][1]["task"] = {"metric": "rouge"}
    with pytest.raises(ConfigError, match=r"modalities\[1\]\.task\.metric: 'rouge' is not a "
                                          r"metric \(one of exact_match, vqa_accuracy, "
                                          r"token_f1, bleu\)"):
        parse_config(tiny_config, "run.yaml")


def test_the_config_imports_no_metric_dependency():
    code = "import sys, mera_ds.config; assert 'sacrebleu' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, check=True)


def test_per_sample_scores_and_their_bootstrap_interval():
    from mera_ds.metrics import bootstrap_interval, sample_scores

    predictions, answers = ["a small cone", "a large cube , far", "x"], ["a small cone , near"] * 3
    per_sample = sample_scores("token_f1", predictions, answers)
    assert sum(per_sample) / 3 == pytest.approx(METRICS["token_f1"](predictions, answers))
    assert sample_scores("exact_match", ["A  b"], ["a b"]) == [1.0]
    assert sample_scores("bleu", predictions, answers) is None  # a corpus-level metric
    values = [1.0] * 70 + [0.0] * 30
    low, high = bootstrap_interval(values)
    # the binomial standard error of 0.7 on 100 samples is 0.046: about +-0.09 at 95%
    assert 0.59 < low < 0.64 and 0.76 < high < 0.81
    assert bootstrap_interval(values) == (low, high)  # seeded
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)
