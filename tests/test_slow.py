"""What the embedded default promises, end to end (slow: `make test-slow`): a full MERA run of
the four built-in modalities, in one process, learns every task and keeps the old ones."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from mera_ds.data.synth import synth_dataset

from .conftest import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANCE = {"image": 0.10, "video": 0.25, "audio": 1 / 7, "depth": 0.25}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_embedded_default_learns_every_modality_and_keeps_them(tmp_path):
    shards = synth_dataset(str(tmp_path / "shards"), seed=0)  # the built-in sizes
    cfg = default_config(shards, tmp_path / "run")
    cfg["data"] = {}
    path = tmp_path / "default.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "mera_ds", "run", str(path), "--executor",
                           "local"], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    P, order = report["P"], report["order"]
    assert order == ["image", "video", "audio", "depth"]
    for i, m in enumerate(order):  # each task learned in its own stage, far above chance
        assert P[i][i] >= CHANCE[m] + 0.3, (m, P)
    assert report["brg"] >= 90, P
