"""The report of a run: the performance matrix P, per-stage averages, the Backward Relative Gain
and the loss curves, read back from what the steps left under RUN (local or s3://).

`build_report` only reads: the modality order from RUN/manifest.json, and through the run's
layout the scores from each stage's eval/metrics.json and the losses from the TensorBoard logs of
its training steps. A stage without metrics.json (a run still going, or one that stopped) is
listed as not evaluated; P and BRG are over the evaluated stages. `write_report` renders
RUN/report/: report.md, report.json, performance_matrix.png and loss_curves.png.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from mera_ds.errors import MeraError
from mera_ds.run import manifest
from mera_ds.run.layout import RunLayout
from mera_ds.run.plan import TRAINING_PHASES
from mera_ds.storage import (accessing, exists, is_remote, join, read_json, url_to_fs,
                             write_bytes)

BRG_FORMULA = "BRG = mean over i < T of P[T][i] / P[i][i] * 100"


def build_report(run_dir: str) -> dict:
    """The numbers of a run's report (what report.json holds):

    {"run_dir", "stages": [{"stage": "01-image", "modality", "evaluated": bool}, ...],
     "order": [modality of each evaluated stage], "P": [[score or None]], "averages": [mean of
     each P row's learned scores], "brg": float or None, "brg_terms": [[modality, P[T][i],
     P[i][i]]], "samples"/"examples": {modality: ...} of the last evaluated stage,
     "losses": {"01-image-finetune": [[step, loss], ...]}}"""
    from mera_ds.evaluate import backward_relative_gain, performance_matrix

    layout = run_layout(run_dir)
    rows, listed = [], []
    for modality in layout.order:
        url = layout.eval_metrics(modality)
        evaluated = exists(url)
        listed.append({"stage": layout.stage_name(modality), "modality": modality,
                       "evaluated": evaluated})
        if not evaluated:
            continue
        row = read_json(url)
        if not isinstance(row, dict) or not isinstance(row.get("scores"), dict):
            raise MeraError(f"{url}: no 'scores' object")
        for m, score in row["scores"].items():
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise MeraError(f"{url}: score of {m!r} is not a number ({score!r})")
        if row.get("modality") != modality:
            raise MeraError(f"{url}: modality {row.get('modality')!r}, its stage is "
                            f"{layout.stage_name(modality)}")
        rows.append(row)

    order, P = performance_matrix(rows) if rows else ([], [])
    averages = [_mean([v for v in row if v is not None]) for row in P]
    brg = backward_relative_gain(P, order) if P else None
    T = len(order) - 1
    last = rows[-1] if rows else {}
    return {
        "run_dir": layout.run_dir,
        "stages": listed,
        "order": order,
        "P": P,
        "averages": averages,
        "brg": brg,
        "brg_formula": BRG_FORMULA,
        "brg_terms": [[order[i], P[T][i], P[i][i]] for i in range(T) if P[i][i] != 0],
        "samples": last.get("samples", {}),
        "examples": last.get("examples", {}),
        "losses": _losses(layout),
    }


def run_layout(run_dir: str) -> RunLayout:
    """The layout of the run in `run_dir`, from its manifest."""
    from mera_ds.config import storage_url

    try:
        run_dir = storage_url(run_dir, "run directory").rstrip("/")
    except ValueError as e:
        raise MeraError(f"{run_dir}: {e}") from None
    fs, root = url_to_fs(run_dir)
    with accessing(run_dir):
        if not fs.isdir(root):
            raise MeraError(f"{run_dir}: no such run directory")
    layout = RunLayout(run_dir, ())
    if not exists(layout.manifest):
        raise MeraError(f"{run_dir}: no manifest.json; not a run directory")
    recorded = manifest.read(layout.manifest)
    if recorded.about["method"] != "mera":
        raise MeraError(f"{run_dir}: a benchmark directory; its results are in "
                        f"{layout.mcl_results}")
    return RunLayout(run_dir, tuple(recorded.about["order"]))


def write_report(run_dir: str, report: dict | None = None) -> str:
    """Write the report (`build_report(run_dir)` unless given) to RUN/report/; returns the URL of
    report.md.

    Rendered in a local temporary directory, then each file written whole (atomically on a local
    disk, one PUT on S3), so a reader never sees half a file."""
    report = report or build_report(run_dir)
    out = RunLayout(report["run_dir"], ()).report_dir
    tmp = tempfile.mkdtemp(prefix="mera-report-")
    try:
        files = {"report.json": json.dumps(report, indent=2).encode(),
                 "report.md": format_markdown(report).encode()}
        _plot_matrix(report, os.path.join(tmp, "performance_matrix.png"))
        _plot_losses(report, os.path.join(tmp, "loss_curves.png"))
        for name in ("performance_matrix.png", "loss_curves.png"):
            with open(os.path.join(tmp, name), "rb") as f:
                files[name] = f.read()
        for name, data in files.items():
            write_bytes(join(out, name), data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return join(out, "report.md")


# --- text ---------------------------------------------------------------------------------------

def format_matrix(order: list[str], P: list[list[float | None]],
                  ci: Optional[list[list[Optional[list[float]]]]] = None) -> str:
    """P as a plain text table: a row per stage (after it), a column per modality; with `ci`
    (each score's 95% interval, or None) every score as "score ±half-width"."""
    def cell(v, interval):
        if v is None:
            return ""
        return f"{v:.3f}" + (f" ±{(interval[1] - interval[0]) / 2:.3f}" if interval else "")

    ci = ci or [[None] * len(order) for _ in P]
    width = max([9 if not any(map(any, ci)) else 16, *(len(m) + 2 for m in order)])
    lines = ["performance matrix P (row: after stage, column: modality)",
             f"{'':<10}" + "".join(f"{m:>{width}}" for m in order)]
    for k, (row, row_ci) in enumerate(zip(P, ci)):
        lines.append(f"{order[k]:<10}" + "".join(f"{cell(v, c):>{width}}"
                                                 for v, c in zip(row, row_ci)))
    return "\n".join(lines)


def format_text(report: dict) -> str:
    """What `mera report` prints: P, the per-stage averages, BRG, and stages not evaluated."""
    order = report["order"]
    parts = [format_matrix(order, report["P"]) if order else "no stage evaluated yet"]
    if order:
        parts.append("average over learned modalities after each stage\n" + "\n".join(
            f"{k + 1:>2} {m:<10}{avg:9.3f}" for k, (m, avg) in
            enumerate(zip(order, report["averages"]))))
    parts.append(_brg_line(report))
    missing = [s["stage"] for s in report["stages"] if not s["evaluated"]]
    if missing:
        parts.append("not evaluated (no eval/metrics.json): " + ", ".join(missing))
    return "\n\n".join(parts)


def _brg_line(report: dict) -> str:
    n = len(report["order"])
    value = "n/a" if report["brg"] is None else f"{report['brg']:.2f}%"
    return f"BRG after {n} evaluated stage{'s' if n != 1 else ''}: {value}"


def format_markdown(report: dict) -> str:
    order, P = report["order"], report["P"]
    md = [f"# MERA run report: `{report['run_dir']}`", ""]
    md += ["## Stages", "", "| stage | modality | evaluated |", "|---|---|---|"]
    md += [f"| {s['stage']} | {s['modality']} | {'yes' if s['evaluated'] else 'not evaluated'} |"
           for s in report["stages"]]
    md += ["", "## Performance matrix P", ""]
    if not order:
        md += ["No stage has been evaluated yet.", ""]
    else:
        md += ["Row: after stage k; column: modality; cell: its score (the task's metric). "
               "The last column is the mean over the modalities learned so far.", "",
               "| after stage | " + " | ".join(order) + " | average |",
               "|---|" + "---:|" * (len(order) + 1)]
        for k, (row, avg) in enumerate(zip(P, report["averages"])):
            cells = " | ".join("" if v is None else f"{v:.3f}" for v in row)
            md.append(f"| {k + 1}: {order[k]} | {cells} | {avg:.3f} |")
        md += ["", "![performance matrix](performance_matrix.png)", ""]
    md += ["## Backward Relative Gain", "", f"`{BRG_FORMULA}`, with T the last evaluated stage.",
           ""]
    if report["brg_terms"]:
        terms = ", ".join(f"{m}: {last:.3f} / {own:.3f}" for m, last, own in report["brg_terms"])
        md.append(f"Terms P[T][i] / P[i][i]: {terms}.")
        md.append("")
    md += [f"**{_brg_line(report)}**", ""]
    if report["examples"]:
        md += [f"## Examples after stage {len(order)} ({order[-1]})", "",
               "| modality | samples | key | prediction | answer | correct |",
               "|---|---:|---|---|---|---|"]
        for m, triples in report["examples"].items():
            n = report["samples"].get(m, "")
            for key, prediction, answer in triples:
                ok = " ".join(prediction.lower().split()) == " ".join(answer.lower().split())
                md.append(f"| {m} | {n} | {key} | {_cell(prediction)} | {_cell(answer)} | "
                          f"{'yes' if ok else 'no'} |")
        md.append("")
    md += ["## Loss curves", ""]
    md += (["![loss curves](loss_curves.png)", ""] if report["losses"]
           else ["No TensorBoard loss logs found.", ""])
    return "\n".join(md)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


# --- reading ------------------------------------------------------------------------------------

def _losses(layout: RunLayout) -> dict[str, list[list[float]]]:
    """{TensorBoard directory name: [[step, loss], ...]} of every training step that logged,
    in run order. A resumed job has several event files; a step logged twice keeps the latest."""
    boards = [layout.tensorboard(m, phase) for m in layout.order for phase in TRAINING_PHASES]
    fs, _ = url_to_fs(layout.run_dir)
    remote = is_remote(layout.run_dir)
    curves = {}
    with tempfile.TemporaryDirectory(prefix="mera-tb-") as tmp:
        for board in boards:
            path = url_to_fs(board)[1]
            if not fs.isdir(path):
                continue
            job = board.rsplit("/", 1)[-1]
            points: dict[int, tuple[float, float]] = {}  # step -> (wall time, loss)
            events = sorted(p for p in fs.find(path) if "tfevents" in p.rsplit("/", 1)[-1])
            for i, event_file in enumerate(events):
                local = event_file
                if remote:
                    local = os.path.join(tmp, f"{job}-{i}.tfevents")
                    fs.get(event_file, local)
                for event in _scalars(local, "loss"):
                    if event.step not in points or event.wall_time >= points[event.step][0]:
                        points[event.step] = (event.wall_time, event.value)
            if points:
                curves[job] = [[step, points[step][1]] for step in sorted(points)]
    return curves


def _scalars(path: str, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path, size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --- plots --------------------------------------------------------------------------------------

def _plot_matrix(report: dict, path: str) -> None:
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    order, P = report["order"], report["P"]
    n = max(len(order), 1)
    fig = Figure(figsize=(1.4 * n + 2.6, 1.0 * n + 1.8), dpi=120)
    ax = fig.add_subplot()
    if not order:
        ax.text(0.5, 0.5, "no stage evaluated yet", ha="center", va="center")
        ax.set_axis_off()
    else:
        data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row]
                                              for row in P], dtype=float))
        top = max(1.0, float(data.max()))  # scores are in [0, 1] for the built-in metric
        image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=top)
        for k, row in enumerate(P):
            for i, v in enumerate(row):
                if v is not None:
                    ax.text(i, k, f"{v:.3f}", ha="center", va="center", fontsize=11,
                            color="black" if v > 0.6 * top else "white")
        ax.set_xticks(range(len(order)), order)
        ax.set_yticks(range(len(order)), [f"{k + 1}: {m}" for k, m in enumerate(order)])
        ax.set_xlabel("modality")
        ax.set_ylabel("after stage")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(f"performance matrix P\n{_brg_line(report)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _plot_losses(report: dict, path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), dpi=120)
    ax = fig.add_subplot()
    offset = 0
    for job, points in report["losses"].items():
        # Jobs one after another on a common axis, so the curve reads as the run's timeline.
        steps = [offset + s for s, _ in points]
        ax.plot(steps, [v for _, v in points], label=job, linewidth=1.2)
        ax.axvline(offset, color="0.85", linewidth=0.8, zorder=0)
        offset = steps[-1] + 1
    if report["losses"]:
        ax.set_xlabel("step (jobs in run order)")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8, loc="upper right", ncol=2 if len(report["losses"]) > 6 else 1)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no TensorBoard loss logs", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("training loss per training step (job)")
    fig.tight_layout()
    fig.savefig(path)
