"""The MCL benchmark (`mera bench mcl`): MERA against the baselines of modality-incremental
continual learning, on one config, one training order and one seed, in one process.

Methods (the same model, data and hyperparameters for all: the config's), each a variant of the
plan (mera_ds.run.plan.Method):
- seq-ft: finetune on each modality in turn (the lower bound);
- seq-ft+realign: seq-ft, with the realign step (10% replay) after each finetune;
- merge-only: MERA without realign;
- replay-10: 10% replay of the earlier modalities mixed into each finetune, all learned
  connectors trained with the LLM;
- ewc, lwf: seq-ft with a replay-free regularizer toward the previous stage's LLM in each
  finetune from the second on (stages.finetune.ewc_*, lwf_*): ewc, Elastic Weight Consolidation's
  penalty weighed by the summed Fisher of the earlier stages, which a fisher step estimates after
  each finetune (mera_ds.train.ewc); lwf, Learning without Forgetting's distillation from that
  LLM, frozen, on the new data (mera_ds.model.lwf);
- mera-1, mera-10: finetune, merge, realign on 1% / 10% replay;
- mera-avg, mera-ties, mera-dare, mera-pcb (only when asked for, with --methods): mera-10 with
  each merge combining the task vectors of every stage so far against theta_0 with that strategy
  of mera_ds.merge.strategies (mera-avg: mera over them, the running average again; mera-dare:
  the average of the dropped and rescaled task vectors, lam / i; mera-ada: per-tensor, per-stage
  coefficients fitted on the replay mix by the realign, from 1/i, mera_ds.model.ada).

The methods' plans are laid over one directory, where steps that compute the same thing have the
same name (stage 1 for all, ewc's Fisher of it apart; stage 2's finetune for seq and merge, both
from theta_1; each chain's finetunes and merges for the methods on it): the in-process executor
runs each once and records it in OUT/manifest.json, so `--resume` continues an interrupted
benchmark.
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Optional

from mera_ds.config import RunConfig, TrainingSettings
from mera_ds.errors import MeraError
from mera_ds.run.layout import RunLayout
from mera_ds.run.manifest import Manifest
from mera_ds.run.plan import Method, plan
from mera_ds.storage import write_bytes

log = logging.getLogger("mera_ds.mcl")

METHODS = {
    "seq-ft": Method("seq"),
    "seq-ft+realign": Method("seq", 0.1),
    "merge-only": Method("merge"),
    "replay-10": Method("replay"),
    "ewc": Method("seq", regularizer="ewc"),
    "lwf": Method("seq", regularizer="lwf"),
    "mera-1": Method("merge", 0.01),
    "mera-10": Method("merge", 0.1),
}
# Merges across stages: run when named in --methods.
ACROSS = {"mera-avg": "mera", "mera-ties": "ties", "mera-dare": "dare", "mera-pcb": "pcb",
          "mera-ada": "ada"}
EVERY_METHOD = {**METHODS, **{n: Method("merge", 0.1, across=s) for n, s in ACROSS.items()}}


def bench_config(cfg: RunConfig, order: Optional[list[str]], seed: Optional[int],
                 out: str) -> RunConfig:
    """The benchmark's config: `cfg` with its modalities in `order`, `seed`, `out` as run
    directory, and one worker (one process) taking each batch whole: gradient accumulation over
    micro-batches only saves memory, which the tiny models do not need, and halves the speed."""
    from mera_ds.config import absolute

    modalities = cfg.modalities
    if order:
        known = [m.name for m in cfg.modalities]
        unknown = [m for m in order if m not in known]
        if unknown:
            raise MeraError(f"--order: modality {unknown[0]!r} is not in the config "
                            f"({', '.join(known)})")
        if len(set(order)) != len(order):
            raise MeraError(f"--order: a modality appears twice in {','.join(order)}")
        modalities = [cfg.modality(m) for m in order]
    if len(modalities) < 2:
        raise MeraError("--order: the benchmark needs at least two modalities")
    whole = {name: s.model_copy(update={"micro_batch_size": s.batch_size})
             for name, s in cfg.stages if isinstance(s, TrainingSettings)}
    return cfg.model_copy(update={
        "modalities": modalities, "run_dir": absolute(out),
        "seed": cfg.seed if seed is None else seed,
        "stages": cfg.stages.model_copy(update=whole),
        "cluster": cfg.cluster.model_copy(update={"num_workers": 1})})


def without_checkpoints(cfg: RunConfig, step) -> dict:
    """The benchmark resumes step by step: its short jobs save no resume checkpoints."""
    from mera_ds.run.local import run_step

    return run_step(cfg, step, checkpoint_every=0)


def run_mcl(cfg: RunConfig, methods: Optional[list[str]] = None, resume: bool = False) -> dict:
    """Run the methods (default: all) over the config's modalities, in order; return
    {"order", "seed", "methods": {name: {"P", "brg", "final_average", "seconds"}}, "seconds"}.
    A method's `seconds`: what its steps took (shared ones included), as if it ran alone; the
    top-level `seconds`: this call's wall time, shared steps counted once."""
    from mera_ds.run.local import execute
    from mera_ds.run.preflight import preflight

    names = methods or list(METHODS)
    unknown = [n for n in names if n not in EVERY_METHOD]
    if unknown:
        raise MeraError(f"--methods: {unknown[0]!r} is not one of {', '.join(EVERY_METHOD)}")
    layout = RunLayout.of(cfg)
    # Every method pre-aligns each new connector (with its LLM frozen) when the config does.
    plans = {n: plan(cfg, dataclasses.replace(EVERY_METHOD[n], align=cfg.stages.align.enabled),
                     layout, chained=True) for n in names}
    preflight(cfg, [s for steps in plans.values() for s in steps], ranks=1)
    manifest = Manifest.open(layout, cfg, "mcl", resume)
    t0 = time.time()
    # Stage by stage, every method's steps of the stage: a step shared with a method before it
    # is recorded by then and skipped.
    for modality in layout.order:
        for n in names:
            execute(cfg, [s for s in plans[n] if s.modality == modality], manifest,
                    without_checkpoints)
        log.info("stage %s done, %.0f s so far", layout.stage_name(modality), time.time() - t0)

    out = {"order": list(layout.order), "seed": cfg.seed, "methods": {},
           "seconds": time.time() - t0}
    for n in names:
        rows = [manifest.steps[s.name]["result"] for s in plans[n] if s.phase == "evaluate"]
        out["methods"][n] = {**method_scores(rows), "seconds": sum(
            manifest.steps[s.name]["seconds"] for s in plans[n])}
    return out


def method_scores(rows: list[dict]) -> dict:
    """What the benchmark reports of a method, from its `evaluate` results of stages 1..T: the
    performance matrix P and each score's 95% interval (P_ci, None where the metric has no
    per-sample scores), the BRG and its interval, the final average, and where evaluation gives
    them the final extra metrics and held-out-answer scores ({modality: {metric: score}},
    {modality: score}) and the text perplexity after each stage."""
    from mera_ds.evaluate import backward_relative_gain, brg_interval, performance_matrix

    order, P = performance_matrix(rows)
    last = rows[-1]
    scores = {"P": P,
              "P_ci": [[row.get("ci", {}).get(m) if k <= i else None for k, m in enumerate(order)]
                       for i, row in enumerate(rows)],
              "brg": backward_relative_gain(P, order), "brg_ci": brg_interval(rows),
              "final_average": sum(P[-1]) / len(P[-1])}
    if last.get("extra_scores"):
        scores["final_extra"] = last["extra_scores"]
    if last.get("held_out_scores"):
        scores["final_held_out"] = last["held_out_scores"]
    if "perplexity" in last:
        scores["perplexity"] = [row["perplexity"] for row in rows]
    return scores


def held_out_average(scores: dict) -> float:
    """A method's final average over the modalities' held-out-answer scores."""
    return statistics.mean(scores["final_held_out"].values())


# --- output -------------------------------------------------------------------------------------

def format_table(result: dict, matrix: bool = False) -> str:
    from mera_ds.run.report import format_matrix

    lines = [f"MCL benchmark: order {','.join(result['order'])}, seed {result['seed']}",
             f"{'method':<16}{'BRG % [95% CI]':>22}{'final avg':>11}{'held out':>10}"
             f"{'ppl':>7}{'seconds':>9}"]
    for n, r in result["methods"].items():
        brg = "n/a" if r["brg"] is None else f"{r['brg']:.1f}"
        if r.get("brg_ci"):
            brg += " [{:.1f}, {:.1f}]".format(*r["brg_ci"])
        held = f"{held_out_average(r):.3f}" if r.get("final_held_out") else "-"
        ppl = f"{r['perplexity'][-1]:.2f}" if r.get("perplexity") else "-"
        lines.append(f"{n:<16}{brg:>22}{r['final_average']:>11.3f}{held:>10}{ppl:>7}"
                     f"{r['seconds']:>9.0f}")
    lines.append(f"wall time {result['seconds']:.0f} s (shared steps run once); held out: the "
                 f"final average over eval samples whose answer no training sample has")
    if matrix:
        for n, r in result["methods"].items():
            lines += ["", n, format_matrix(result["order"], r["P"], r.get("P_ci"))]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """BRG and the final average per method, as a bar chart (PNG at `path`, local or s3://)."""
    import io

    from matplotlib.figure import Figure

    names = list(result["methods"])
    brg = [result["methods"][n]["brg"] or 0.0 for n in names]
    avg = [100 * result["methods"][n]["final_average"] for n in names]
    fig = Figure(figsize=(8, 4), dpi=120)
    ax = fig.add_subplot()
    x = range(len(names))
    ax.bar([k - 0.2 for k in x], brg, width=0.4, label="BRG %")
    ax.bar([k + 0.2 for k in x], avg, width=0.4, label="final average x 100")
    ax.axhline(100, color="0.5", linewidth=0.8)
    ax.set_xticks(list(x), names, rotation=20)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"MCL benchmark: {','.join(result['order'])}, seed {result['seed']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())


def summarize(results: list[dict], reference: str = "mera-10") -> str:
    """Per method over runs (orders x seeds), as a Markdown table: the mean of BRG and of the
    final average with 95% confidence intervals (Student's t over the runs), BRG's range, and
    the final average's difference from `reference`'s in the same runs (paired), where both ran."""
    found = {n for r in results for n in r["methods"]}  # JSON keeps no order: EVERY_METHOD's
    names = [n for n in EVERY_METHOD if n in found] + sorted(found - set(EVERY_METHOD))
    runs = ", ".join(f"{','.join(r['order'])}/s{r['seed']}" for r in results)
    paired = reference in found
    # Where the runs' evaluation gives them: the final score on held-out answers, and the text
    # perplexity after the last stage.
    held = all(m.get("final_held_out") for r in results for m in r["methods"].values())
    ppl = all(m.get("perplexity") for r in results for m in r["methods"].values())
    lines = [f"{len(results)} runs: {runs}; 95% confidence intervals (t over the runs)", "",
             "| method | BRG % mean [95% CI] | BRG min..max | final avg mean [95% CI] |" +
             (f" final avg - {reference}'s, points [95% CI] |" if paired else "") +
             (" final held-out avg |" if held else "") + (" final ppl |" if ppl else ""),
             "|---|---|---|---|" + "---|" * (paired + held + ppl)]
    for n in names:
        ran = [r["methods"] for r in results if n in r["methods"]]
        brg = [m[n]["brg"] for m in ran if m[n]["brg"] is not None]
        avg = [m[n]["final_average"] for m in ran]
        row = (f"| {n} | {_interval(brg, '.1f')} | {min(brg):.1f}..{max(brg):.1f} | "
               f"{_interval(avg, '.3f')} |")
        if paired:
            diff = [100 * (m[n]["final_average"] - m[reference]["final_average"])
                    for m in ran if reference in m]
            row += f" {_interval(diff, '+.1f')} |"
        if held:
            row += " " + _interval([held_out_average(m[n]) for m in ran], ".3f") + " |"
        if ppl:
            row += " " + _interval([m[n]["perplexity"][-1] for m in ran], ".3f") + " |"
        lines.append(row)
    return "\n".join(lines)


def _interval(values: list[float], fmt: str) -> str:
    """"mean [low, high]": the 95% confidence interval of the mean, Student's t (one value:
    no interval)."""
    from scipy import stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:{fmt}}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:{fmt}} [{mean - half:{fmt}}, {mean + half:{fmt}}]"
