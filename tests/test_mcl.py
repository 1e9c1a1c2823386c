"""`mera bench mcl`: every method over two modalities in one process, steps shared between
methods computed once, the merge of the right inputs, resume, and the summary over runs."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mera_ds.run.mcl import METHODS, summarize

from .conftest import default_config
from .test_merge import state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def bench(*args):
    return subprocess.run([sys.executable, "-m", "mera_ds", "bench", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def mcl_run(builtin_shards, tmp_path_factory):
    """One benchmark over audio then video with a few steps per job."""
    tmp = tmp_path_factory.mktemp("mcl")
    cfg = default_config(builtin_shards, tmp / "out")
    st = cfg["stages"]
    st["finetune"].update(steps=4, batch_size=4, micro_batch_size=2)
    st["realign"].update(steps=3, batch_size=4, micro_batch_size=2)
    st["eval"].update(max_samples=8, batch_size=8)
    cfg["data"] = {"shuffle_buffer": 16}
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp / "out"
    args = ["mcl", "--config", str(path), "--order", "audio,video", "--seed", "3",
            "--out", str(out)]
    proc = bench(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"args": args, "out": out, "stdout": proc.stdout,
            "result": json.loads((out / "mcl.json").read_text()),
            "manifest": json.loads((out / "manifest.json").read_text())}


def test_every_method_gets_its_matrix_and_brg(mcl_run):
    result = mcl_run["result"]
    assert result["order"] == ["audio", "video"] and result["seed"] == 3
    assert sorted(result["methods"]) == sorted(METHODS)
    for name, r in result["methods"].items():
        P = r["P"]
        assert len(P) == 2 and P[0][1] is None and all(0 <= v <= 1 for v in P[1])
        brg = None if P[0][0] == 0 else P[1][0] / P[0][0] * 100
        assert r["brg"] == pytest.approx(brg) if brg is not None else r["brg"] is None
        assert r["final_average"] == pytest.approx(sum(P[1]) / 2)
        # every score and the BRG with a 95% bootstrap interval around it
        for row, row_ci in zip(P, r["P_ci"]):
            for v, ci in zip(row, row_ci):
                assert (ci is None) if v is None else ci[0] <= v <= ci[1]
        assert r["brg_ci"] is None if r["brg"] is None else \
            r["brg_ci"][0] <= r["brg"] + 1e-9 and r["brg"] - 1e-9 <= r["brg_ci"][1]
        assert r["seconds"] > 0
        assert name in mcl_run["stdout"]
    assert "wall time" in mcl_run["stdout"]
    assert (mcl_run["out"] / "mcl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shared_steps_run_once_and_merge_uses_the_merge_chain(mcl_run):
    steps = mcl_run["manifest"]["steps"]
    finetunes = sorted(s for s in steps if s.endswith("/finetune"))
    # Stage 1 is one finetune for every method; at stage 2 seq and merge both start from
    # theta_1 (one finetune), replay trains on its own mix, ewc and lwf with their regularizers
    # (ewc's weighed by the Fisher of theta_1, beside it).
    assert finetunes == ["first/01-audio/finetune", "replay/02-video/finetune",
                         "seq-ewc/02-video/finetune", "seq-lwf/02-video/finetune",
                         "seq/02-video/finetune"]
    assert sorted(s for s in steps if s.endswith("/fisher")) == ["first/01-audio/fisher"]
    # No method realigns at stage 1 (nothing was merged): one stage-1 evaluate for all.
    assert sorted(s for s in steps if "realign" in s) == [
        "merge/02-video/realign-1", "merge/02-video/realign-10", "seq/02-video/realign-10"]
    assert sorted(s for s in steps if s.startswith("first/") and "evaluate" in s) == [
        "first/01-audio/evaluate"]
    # theta_2 = theta_1 + (theta_ft_2 - theta_1) / 2, theta_1 being the shared stage-1 finetune.
    chains = mcl_run["out"] / "chains"
    prev = state(chains / "first/01-audio/finetune/llm")
    ft = state(chains / "seq/02-video/finetune/llm")
    merged = state(chains / "merge/02-video/merge/llm")
    assert set(merged) == set(prev)
    for name, t in merged.items():
        torch.testing.assert_close(t, prev[name] + (ft[name] - prev[name]) / 2)
    assert not torch.equal(ft["model.embed_tokens.weight"], prev["model.embed_tokens.weight"])
    # replay-10 trains every learned connector on its mix; the others only the new one.
    assert sorted(os.listdir(chains / "replay/02-video/finetune/connectors")) == [
        "audio.safetensors", "video.safetensors"]
    assert os.listdir(chains / "seq/02-video/finetune/connectors") == ["video.safetensors"]
    replay = mcl_run["manifest"]["steps"]["01-audio/replay-10"]["result"]
    assert replay["samples"] == round(0.1 * replay["source_samples"])


def test_rerun_needs_resume_and_resume_recomputes_nothing(mcl_run):
    proc = bench(*mcl_run["args"])
    assert proc.returncode == 2 and "a run is already there" in proc.stderr
    before = {s: e["finished"] for s, e in mcl_run["manifest"]["steps"].items()}
    proc = bench(*mcl_run["args"], "--resume", "--matrix")
    assert proc.returncode == 0, proc.stderr
    steps = json.loads((mcl_run["out"] / "manifest.json").read_text())["steps"]
    assert {s: e["finished"] for s, e in steps.items()} == before
    again = json.loads((mcl_run["out"] / "mcl.json").read_text())
    assert {n: r["P"] for n, r in again["methods"].items()} == \
        {n: r["P"] for n, r in mcl_run["result"]["methods"].items()}
    assert "performance matrix P" in proc.stdout
    # Resuming with fewer methods reuses their steps; a run report refuses the directory.
    proc = bench(*mcl_run["args"], "--resume", "--methods", "mera-10")
    assert proc.returncode == 0, proc.stderr
    assert "merge/02-video/realign-10: done earlier, skipped" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mera_ds", "report", str(mcl_run["out"])],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "a benchmark directory" in proc.stderr


def test_bad_order_is_one_line_naming_the_modality(tmp_path):
    proc = bench("mcl", "--order", "audio,smell", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mera: error: --order: modality 'smell' is not in the config "
        "(image, video, audio, depth)"]
    assert not (tmp_path / "x").exists()


def test_summary_gives_means_with_confidence_intervals_and_paired_differences():
    """Three runs: BRG 40, 50, 60 (mean 50, sd 10, t(0.975, 2) = 4.303: 50 +- 24.8); final
    averages 0.5, 0.6, 0.7 against mera-10's 0.4, 0.6, 0.5 (differences 10, 0, 20 points)."""
    runs = [{"order": ["a", "b"], "seed": s, "methods": {
        "seq-ft": {"brg": brg, "final_average": avg},
        "mera-10": {"brg": 99.0, "final_average": ref}}}
        for s, (brg, avg, ref) in enumerate([(40.0, 0.5, 0.4), (50.0, 0.6, 0.6),
                                            (60.0, 0.7, 0.5)])]
    table = summarize(runs)
    assert "3 runs: a,b/s0, a,b/s1, a,b/s2" in table
    assert ("| seq-ft | 50.0 [25.2, 74.8] | 40.0..60.0 | 0.600 [0.352, 0.848] | "
            "+10.0 [-14.8, +34.8] |") in table
    assert "| mera-10 | 99.0 [99.0, 99.0] | 99.0..99.0 |" in table


def test_summary_of_something_else_is_one_line(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("{}")
    proc = bench("mcl-summary", str(path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mera: error: {path}: not a result of `mera bench mcl` (no order, seed and methods)"]
