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
from typing import Sequence

import torch

from mera_ds.config import RunConfig
from mera_ds.data.loader import read_samples
from mera_ds.errors import MeraError
from mera_ds.metrics import METRICS
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
    "examples": {m: [[key, prediction, answer], ...first 3]}}."""
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
    result = {"modality": modality, "scores": {}, "samples": {}, "examples": {}}
    for name in learned:
        m = cfg.modality(name)
        start = time.perf_counter()
        keys, predictions, answers = _predict(mllm, collate, m, cfg.stages.eval)
        score = METRICS[m.task.metric](predictions, answers)  # the config checked the name
        result["scores"][name] = score
        result["samples"][name] = len(answers)
        result["examples"][name] = [list(t) for t in
                                    zip(keys, predictions, answers)][:NUM_EXAMPLES]
        log.info("eval %s/%s: %s = %.4f on %d samples (%.1f s)", modality, name, m.task.metric,
                 score, len(answers), time.perf_counter() - start)
    return result


def _predict(mllm, collate, m, settings) -> tuple[list[str], list[str], list[str]]:
    """(keys, predictions, answers) over modality m's eval samples, in batches."""
    keys, predictions, answers = [], [], []
    samples = iter(read_samples(m.eval_shards, limit=settings.max_samples))
    while batch := list(itertools.islice(samples, settings.batch_size)):
        predictions.extend(generate(mllm, collate, batch, m.task.max_new_tokens))
        answers.extend(s["answer"] for s in batch)
        keys.extend(s["__key__"] for s in batch)
        log.info("eval %s: %d samples", m.name, len(answers))
    if not answers:
        raise MeraError(f"{m.eval_shards}: no eval samples for modality {m.name}")
    return keys, predictions, answers


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
