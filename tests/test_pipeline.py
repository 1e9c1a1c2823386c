"""The driver: a full MERA run over two modalities on a local Ray instance, killed in the middle
and resumed (finished steps are not recomputed and the result is complete); the same plan run in
one process without Ray; single steps run with `mera stage`."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from mera_ds.config import parse_config
from mera_ds.errors import MeraError
from mera_ds.run.layout import RunLayout
from mera_ds.run.manifest import Manifest

from .conftest import ENV, ROOT


def test_killed_run_resumes_without_redoing_finished_steps(resumed_run):
    layout, first, out = resumed_run["layout"], resumed_run["first"], resumed_run["out"]
    for name in first:
        assert f"{name}: done earlier, skipped" in out
    assert resumed_run["stage1"] and all(
        os.path.getmtime(p) == t for p, t in resumed_run["stage1"].items())
    final = json.loads(open(layout.manifest).read())["steps"]
    # no realign at stage 1: nothing was merged there
    assert set(final) == {f"{stage}/{phase}" for stage in ("01-image", "02-video")
                          for phase in ("replay", "finetune", "evaluate")} | {
                              "02-video/merge", "02-video/realign"}
    assert final["01-image/finetune"] == first["01-image/finetune"]
    metrics = json.loads(open(layout.eval_metrics("video")).read())
    assert set(metrics["scores"]) == {"image", "video"}
    assert "BRG after 2 evaluated stages:" in out
    assert os.path.exists(os.path.join(layout.merge_llm("video"), "config.json"))
    # The realign of stage 2 trained both connectors from the mixed replay.
    assert all(os.path.exists(layout.realign_connector("video", m)) for m in ("image", "video"))

    # Once complete, a changed config is refused, naming the field; so is a run without resume.
    cfg = json.loads(json.dumps(resumed_run["cfg"]))
    cfg["stages"]["finetune"]["steps"] = 9
    with pytest.raises(MeraError, match=r"stages\.finetune\.steps was 8, is 9"):
        Manifest.open(layout, parse_config(cfg), "mera", resume=True)
    with pytest.raises(MeraError, match="add --resume"):
        Manifest.open(layout, parse_config(cfg), "mera", resume=False)


def test_a_setting_newer_than_the_run_at_its_default_resumes(tiny_config):
    """A run recorded by a mera-ds without some setting resumes when the setting is at its
    default (what the run computed then), and is refused when it is not."""
    cfg = parse_config(tiny_config)
    layout = RunLayout.of(cfg)
    Manifest.open(layout, cfg, "mera", resume=False)
    recorded = json.loads(open(layout.manifest).read())
    del recorded["config"]["stages.merge.ada_lr"]
    open(layout.manifest, "w").write(json.dumps(recorded))
    Manifest.open(layout, cfg, "mera", resume=True)
    tiny_config["stages"]["merge"]["ada_lr"] = 0.5
    with pytest.raises(MeraError, match=r"stages\.merge\.ada_lr was None, is 0\.5"):
        Manifest.open(layout, parse_config(tiny_config), "mera", resume=True)


def artifacts(run_dir) -> set:
    """The files a run leaves, by relative path (TensorBoard event names hold host and time;
    the logs, one per rank, differ by executor)."""
    skip = tuple(os.path.join(run_dir, d) for d in ("report", "logs"))
    return {os.path.relpath(os.path.join(d, n), run_dir) for d, _, names in os.walk(run_dir)
            for n in names if "tfevents" not in n and not d.startswith(skip)}


def test_local_executor_runs_the_same_plan_as_ray(resumed_run):
    """`mera run --executor local` (one process, no Ray) leaves the artifacts and manifest the
    Ray run leaves, and its report; `mera stage` then finds its steps done."""
    path, tmp = resumed_run["path"], resumed_run["tmp"]
    local = tmp / "local"
    proc = subprocess.run([sys.executable, "-m", "mera_ds", "run", str(path), "--run",
                           str(local), "--executor", "local"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "BRG after 2 evaluated stages:" in proc.stdout
    ray_dir = resumed_run["layout"].run_dir
    assert artifacts(local) == artifacts(ray_dir)
    manifests = {"local": json.loads((local / "manifest.json").read_text()),
                 "ray": json.loads(open(os.path.join(ray_dir, "manifest.json")).read())}
    assert set(manifests["local"]["steps"]) == set(manifests["ray"]["steps"])
    assert manifests["local"]["order"] == ["image", "video"]
    # A training step records the same metrics under both, the final ones (where its ranks
    # ran, the last loss), though Ray Train itself keeps only those reported with a checkpoint.
    for name, step in manifests["ray"]["steps"].items():
        if name.endswith(("/finetune", "/realign")):
            ray_result, local_result = step["result"], manifests["local"]["steps"][name]["result"]
            assert set(ray_result) == set(local_result), name
            assert ray_result["phase"] == name.split("/")[1]
            assert ray_result["addresses"] == "127.0.0.1 127.0.0.1"
            assert local_result["addresses"] == "127.0.0.1"

    proc = subprocess.run([sys.executable, "-m", "mera_ds", "stage", "evaluate", "--config",
                           str(path), "--modality", "video", "--run", str(local),
                           "--executor", "local"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "02-video/evaluate: done earlier, skipped" in proc.stderr
    assert json.loads(proc.stdout) == manifests["local"]["steps"]["02-video/evaluate"]["result"]

    # Any step runs alone without Ray, into a new run, and is recorded there.
    fresh = tmp / "fresh"
    proc = subprocess.run([sys.executable, "-m", "mera_ds", "stage", "replay", "--config",
                           str(path), "--modality", "image", "--run", str(fresh), "--executor",
                           "local"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = json.loads((fresh / "manifest.json").read_text())["steps"]
    assert list(steps) == ["01-image/replay"]
    assert sorted(os.listdir(fresh / "replay" / "image")) == [
        "replay-000000.tar", "replay-000001.tar", "replay.json"]


def test_a_failing_step_on_ray_is_one_line(resumed_run, tmp_path):
    """A step that fails inside a Ray task ends the command with its own message, not the task's
    traceback; the run keeps nothing of it. (A corrupt shard: one that is missing is found by the
    preflight, before any task.)"""
    cfg = json.loads(json.dumps(resumed_run["cfg"]))
    for k in range(2):
        (tmp_path / f"cut-{k:06d}.tar").write_bytes(b"\0" * 10 + b"not a tar" * 100)
    cfg["modalities"][0]["train_shards"] = str(tmp_path / "cut-{000000..000001}.tar")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "mera_ds", "stage", "replay", "--config",
                           str(path), "--modality", "image", "--run", str(tmp_path / "run")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mera: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"mera: error: 01-image/replay failed on the cluster: {tmp_path}/cut-00000"), errors
    assert "corrupt shard" in errors[0]
    assert not (tmp_path / "run" / "replay" / "image").exists()
