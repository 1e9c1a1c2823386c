"""The driver: a full MERA run over two modalities on a local Ray instance, killed in the middle
and resumed (finished steps are not recomputed and the result is complete); the same plan run in
one process without Ray; single steps run with `mera stage`."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from mera_ds.config import parse_config
from mera_ds.errors import MeraError
from mera_ds.run.layout import RunLayout
from mera_ds.run.manifest import Manifest

from .conftest import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def two_modalities(cfg: dict) -> dict:
    cfg["modalities"] = cfg["modalities"][:2]
    st = cfg["stages"]
    st["finetune"].update(steps=8, warmup_steps=1)
    # One sample per rank and step: the ranks' realign batches often hold different modalities.
    st["realign"].update(steps=6, batch_size=2, micro_batch_size=1)
    st["eval"].update(max_samples=16, batch_size=16)
    return cfg


def mera_run(path, *extra):
    return subprocess.Popen([sys.executable, "-m", "mera_ds", "run", str(path), *extra],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


@pytest.fixture(scope="module")
def resumed_run(builtin_shards, tmp_path_factory):
    """A two-modality run on a local Ray, its driver killed during stage 2's finetune, then
    resumed to the end."""
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = two_modalities(default_config(builtin_shards, tmp / "ray"))
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    layout = RunLayout.of(parse_config(cfg))

    # Kill the driver, and the local Ray it started, once stage 2's finetune is under way.
    proc, lines = mera_run(path), []
    for line in proc.stdout:
        lines.append(line)
        if "02-video/finetune step" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    time.sleep(2)
    first = json.loads(open(layout.manifest).read())["steps"]
    assert "01-image/evaluate" in first and "02-video/finetune" not in first, "".join(lines)
    stage1 = {p: os.path.getmtime(p) for p in
              [os.path.join(layout.finetune_llm("image"), "config.json"),
               layout.realign_connector("image", "image"), layout.eval_metrics("image")]}

    proc = mera_run(path, "--resume")
    out = proc.stdout.read()
    assert proc.wait() == 0, out[-4000:]
    return {"cfg": cfg, "path": path, "layout": layout, "first": first, "stage1": stage1,
            "out": out, "tmp": tmp}


def test_killed_run_resumes_without_redoing_finished_steps(resumed_run):
    layout, first, out = resumed_run["layout"], resumed_run["first"], resumed_run["out"]
    for name in first:
        assert f"{name}: done earlier, skipped" in out
    assert all(os.path.getmtime(p) == t for p, t in resumed_run["stage1"].items())
    final = json.loads(open(layout.manifest).read())["steps"]
    assert set(final) == set(first) | {"02-video/finetune", "02-video/replay", "02-video/merge",
                                       "02-video/realign", "02-video/evaluate"}
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


def artifacts(run_dir) -> set:
    """The files a run leaves, by relative path (TensorBoard event names hold host and time)."""
    return {os.path.relpath(os.path.join(d, n), run_dir) for d, _, names in os.walk(run_dir)
            for n in names if "tfevents" not in n and not d.startswith(os.path.join(run_dir,
                                                                                    "report"))}


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
    assert list(manifests["local"]["steps"]) == list(manifests["ray"]["steps"])
    assert manifests["local"]["order"] == ["image", "video"]

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
    traceback; the run keeps nothing of it."""
    cfg = json.loads(json.dumps(resumed_run["cfg"]))
    cfg["modalities"][0]["train_shards"] = str(tmp_path / "gone-{000000..000001}.tar")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "mera_ds", "stage", "replay", "--config",
                           str(path), "--modality", "image", "--run", str(tmp_path / "run")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mera: error:")]
    assert errors == [f"mera: error: 01-image/replay failed on the cluster: "
                      f"{tmp_path}/gone-000000.tar: no such shard"], proc.stderr[-4000:]
    assert not (tmp_path / "run" / "replay" / "image").exists()
