"""The driver: a full MERA run over two modalities on a local Ray instance, killed in the middle
and resumed; finished stages are not recomputed and the result is complete."""
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


def test_killed_run_resumes_without_redoing_finished_stages(tiny_config, tmp_path):
    cfg = two_modalities(tiny_config)
    path = tmp_path / "run.yaml"
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
    for name in first:
        assert f"{name}: done earlier, skipped" in out
    assert all(os.path.getmtime(p) == t for p, t in stage1.items())  # not recomputed
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

    # Once complete, a resume does nothing; a changed config is refused, naming the field.
    cfg["stages"]["finetune"]["steps"] = 9
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(MeraError, match=r"stages\.finetune\.steps was 8, is 9"):
        Manifest.open(layout, parse_config(cfg), "mera", resume=True)
    with pytest.raises(MeraError, match="add --resume"):
        Manifest.open(layout, parse_config(cfg), "mera", resume=False)
