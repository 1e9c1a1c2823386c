"""evaluate: every learned modality on (theta_i, realigned connectors) -> row i of the performance
matrix P, and the Backward Relative Gain (BRG) over the rows.

`evaluate` is a function (config, input artifacts) -> result dict; it writes nothing (the plan's
evaluate step stores the result as the stage's eval/metrics.json). Single process: greedy
generation on one device; the tiny model on CPU takes seconds.

Each task is scored by the metric that its ModalityConfig.task.metric names in the registry
mera_ds.metrics.METRICS.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Optional, Sequence

import torch

from mera_ds.config import RunConfig
from mera_ds.data.loader import read_samples
from mera_ds.errors import MeraError
from mera_ds.metrics import METRICS, bootstrap_interval, sample_scores
from mera_ds.model.connectors import load_connector
from mera_ds.model.llm import build_llm
from mera_ds.model.mllm import Collator, build_mllm

log = logging.getLogger("mera_ds.evaluate")

NUM_EXAMPLES = 3  # (key, prediction, answer) triples kept per modality for the report


def evaluate(cfg: RunConfig, modality: str, *, llm_dir: str, connectors: dict[str, str],
             device: str = "cpu") -> dict:
    """Score every modality learned up to stage `modality` with the LLM of `llm_dir` (theta_i)
    and the connector files in `connectors` ({learned modality: file}, exactly the learned ones).

    Returns {"modality": modality, "scores": {m: score}, "samples": {m: n},
    "examples": {m: [[key, prediction, answer], ...first 3]}, "ci": {m: [low, high]},
    "sample_scores": {m: [score of each sample]} (both where the metric is a mean over samples),
    "extra_scores": {m: {metric: score}}, "held_out_scores": {m: score over the samples whose
    answer no training sample has}, and with stages.eval.text "perplexity"}."""
    order = [m.name for m in cfg.modalities]
    if modality not in order:
        raise MeraError(f"evaluate: modality {modality!r} is not in the config "
                        f"({', '.join(order)})")
    learned = order[:order.index(modality) + 1]
    if set(connectors) != set(learned):
        raise MeraError(f"evaluate {modality}: connectors given for {sorted(connectors)}, the "
                        f"stage has learned {learned}")
    llm, tokenizer = build_llm(cfg.llm, path=llm_dir)
    mllm = build_mllm(cfg, learned, llm=llm, tokenizer=tokenizer)
    for name in learned:
        load_connector(mllm.connectors[name], connectors[name])
    mllm.to(device).eval()
    collate = Collator(mllm, train=False)
    result = {"modality": modality, "scores": {}, "samples": {}, "examples": {}, "ci": {},
              "sample_scores": {}, "extra_scores": {}, "held_out_scores": {}}
    for name in learned:
        m = cfg.modality(name)
        start = time.perf_counter()
        keys, predictions, answers, held_out = _predict(mllm, collate, m, cfg.stages.eval)
        _score(result, name, m.task, predictions, answers, held_out)
        result["samples"][name] = len(answers)
        result["examples"][name] = [list(t) for t in
                                    zip(keys, predictions, answers)][:NUM_EXAMPLES]
        log.info("eval %s/%s: %s = %.4f on %d samples (%.1f s)", modality, name, m.task.metric,
                 result["scores"][name], len(answers), time.perf_counter() - start)
    if cfg.stages.eval.text:
        result["perplexity"] = text_perplexity(mllm.llm, tokenizer, cfg.stages.eval.text)
        log.info("eval %s: perplexity %.3f on %s", modality, result["perplexity"],
                 cfg.stages.eval.text)
    return result


def _score(result: dict, name: str, task, predictions: list[str], answers: list[str],
           held_out: list[bool]) -> None:
    """Modality `name`'s scores into `result`: the task's metric (the performance matrix's),
    with each sample's score and a 95% bootstrap interval where the metric is a mean over
    samples; its extra metrics; the metric over the samples whose answer was held out of
    training, if any."""
    result["scores"][name] = METRICS[task.metric](predictions, answers)
    per_sample = sample_scores(task.metric, predictions, answers)
    if per_sample is not None:
        result["sample_scores"][name] = [round(x, 6) for x in per_sample]
        result["ci"][name] = list(bootstrap_interval(per_sample))
    result["extra_scores"][name] = {x: METRICS[x](predictions, answers)
                                    for x in task.extra_metrics}
    if any(held_out):
        kept = [(p, a) for p, a, h in zip(predictions, answers, held_out) if h]
        result["held_out_scores"][name] = METRICS[task.metric](*map(list, zip(*kept)))


def text_perplexity(llm, tokenizer, url: str) -> float:
    """The LLM's perplexity on a text file (one document per line), in rows of base.LENGTH
    tokens, as the base's own is measured."""
    from mera_ds.model.base import LENGTH, perplexity, token_rows
    from mera_ds.storage import open_url

    with open_url(url, "rb") as f:
        lines = [line for line in f.read().decode().splitlines() if line.strip()]
    rows = token_rows(tokenizer, lines, LENGTH)
    if not len(rows):
        raise MeraError(f"{url}: stages.eval.text has fewer than {LENGTH} tokens")
    return perplexity(llm, rows)


def _predict(mllm, collate, m, settings) -> tuple[list[str], list[str], list[str], list[bool]]:
    """(keys, predictions, answers, held out of training) over modality m's eval samples, in
    batches."""
    keys, predictions, answers, held_out = [], [], [], []
    samples = iter(read_samples(m.eval_shards, limit=settings.max_samples))
    while batch := list(itertools.islice(samples, settings.batch_size)):
        predictions.extend(generate(mllm, collate, batch, m.task.max_new_tokens))
        answers.extend(s["answer"] for s in batch)
        keys.extend(s["__key__"] for s in batch)
        held_out.extend(s.get("held_out", False) for s in batch)
        log.info("eval %s: %d samples", m.name, len(answers))
    if not answers:
        raise MeraError(f"{m.eval_shards}: no eval samples for modality {m.name}")
    return keys, predictions, answers, held_out


def generate(mllm, collate: Collator, samples: list[dict], max_new_tokens: int) -> list[str]:
    """The greedy answers to decoded samples, in their order: what evaluation scores and
    `mera predict` prints, so both give the same answer to the same sample."""
    batch = collate(samples)
    with torch.inference_mode():
        return mllm.generate(batch, max_new_tokens=max_new_tokens)


def performance_matrix(rows: list[dict]) -> tuple[list[str], list[list[float | None]]]:
    """(order, P) from the `evaluate` results of stages 1..T in stage order: order[k] is the
    modality of stage k+1, P[k][i] the score of modality order[i] after that stage (None where
    it was not learned yet)."""
    order = [row["modality"] for row in rows]
    if len(set(order)) != len(order):
        raise MeraError(f"performance matrix: a modality appears twice in {order}")
    P = []
    for k, row in enumerate(rows):
        missing = [m for m in order[:k + 1] if m not in row["scores"]]
        if missing:
            raise MeraError(f"eval of stage {k + 1} ({row['modality']}): no score for learned "
                            f"modality {missing[0]}")
        P.append([row["scores"][m] if i <= k else None for i, m in enumerate(order)])
    return order, P


def backward_relative_gain(P: list[list[float | None]], order: Sequence[str]) -> float | None:
    """BRG after the last stage T (the paper's definition):
    mean over i < T of P[T][i] / P[i][i] * 100.

    None with a single stage (nothing learned before). A modality with P[i][i] == 0 (it never
    learned its task, so no gain relative to it is defined) is left out of the mean with a
    warning; if that leaves none, the BRG is None."""
    if len(P) != len(order) or any(len(row) != len(order) for row in P):
        raise MeraError(f"performance matrix: expected {len(order)} x {len(order)}")
    T = len(order) - 1
    if T < 1:
        return None
    ratios = []
    for i in range(T):
        if P[i][i] == 0:
            log.warning("BRG: %s scored 0 after its own stage; left out of the mean", order[i])
            continue
        ratios.append(P[T][i] / P[i][i] * 100)
    return sum(ratios) / len(ratios) if ratios else None


def brg_interval(rows: list[dict], seed: int = 0, resamples: int = 1000
                 ) -> Optional[tuple[float, float]]:
    """The 95% bootstrap interval of the BRG from the `evaluate` results of stages 1..T: each
    earlier modality's eval samples resampled once per draw, for both its own-stage and its
    final score (the same samples, paired). None where a score has no per-sample values (a
    corpus-level metric) or there is one stage."""
    import numpy as np

    order = [row["modality"] for row in rows]
    if len(order) < 2 or not all(m in row.get("sample_scores", {})
                                 for k, row in enumerate(rows) for m in order[:k + 1]):
        return None
    rng = np.random.default_rng(seed)
    brg = np.zeros(resamples)
    used = 0
    for i, m in enumerate(order[:-1]):
        own = np.asarray(rows[i]["sample_scores"][m])
        final = np.asarray(rows[-1]["sample_scores"][m])
        if own.mean() == 0:  # left out of the BRG, as backward_relative_gain does
            continue
        idx = rng.integers(0, len(own), size=(resamples, len(own)))
        brg += final[idx].mean(axis=1) / np.maximum(own[idx].mean(axis=1), 1e-12) * 100
        used += 1
    if not used:
        return None
    low, high = np.percentile(brg / used, [2.5, 97.5])
    return float(low), float(high)
