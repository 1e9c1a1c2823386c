"""`launch/submit.py`: a small MERA run submitted with `ray job submit` to a local Ray cluster
started with `ray start --head --node-ip-address 127.0.0.1`."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from mera_ds.config import parse_config
from mera_ds.run.layout import RunLayout
from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def test_runtime_env_passes_variables_without_overwriting_the_users():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from submit import runtime_env

    env = runtime_env('{"env_vars": {"HF_HOME": "/mine"}}', ["MERA_EXPORT_BUCKET=32MB"],
                      {"HF_HOME": "/theirs", "AWS_REGION": "eu", "HOME": "/root",
                       "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s",
                       "AWS_SESSION_TOKEN": "t", "HF_TOKEN": "hf"})
    # Secrets never travel in the runtime_env (Ray logs it) nor on the command line.
    assert env["env_vars"] == {"HF_HOME": "/mine", "MERA_EXPORT_BUCKET": "32MB",
                               "AWS_REGION": "eu"}
    assert env["working_dir"] == ROOT and ".venv" in env["excludes"]
    with pytest.raises(SystemExit, match="HF_TOKEN: a secret is not passed on the command line"):
        runtime_env(None, ["HF_TOKEN=hf"], {})
    with pytest.raises(SystemExit, match="AWS_SECRET_ACCESS_KEY is a secret"):
        runtime_env('{"env_vars": {"AWS_SECRET_ACCESS_KEY": "s"}}', [], {})


def test_ray_workers_get_no_secret_in_their_runtime_env():
    from mera_ds.cluster.connect import WORKER_ENV, is_secret

    assert not [k for k in WORKER_ENV if is_secret(k)]
    assert is_secret("AWS_SECRET_ACCESS_KEY") and is_secret("hf_token")
    assert not is_secret("AWS_ENDPOINT_URL")


def test_ray_job_submit_runs_a_small_run(tiny_config, tmp_path):
    cfg = tiny_config
    cfg["modalities"] = cfg["modalities"][:1]
    cfg["stages"]["finetune"].update(steps=4, warmup_steps=1)
    cfg["stages"]["realign"].update(steps=2)
    cfg["stages"]["eval"].update(max_samples=8)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # A one-node cluster on loopback (Ray would otherwise advertise the host's address), with
    # token auth off: nothing outside this machine can reach it.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": BIN + os.pathsep + os.environ["PATH"], "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    dashboard = free_port()
    start = subprocess.run(
        [os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
         "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--num-cpus", "3", "--include-dashboard", "true",
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "launch", "submit.py"), str(path),
             "--address", f"http://127.0.0.1:{dashboard}", "--env", "MERA_EXPORT_BUCKET=16MB"],
            env=env, capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], env=env,
                       capture_output=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    layout = RunLayout.of(parse_config(cfg))
    steps = json.loads(open(layout.manifest).read())["steps"]
    assert set(steps) == {"01-image/finetune", "01-image/replay", "01-image/realign",
                          "01-image/evaluate"}
    assert "BRG after 1 evaluated stage" in out
    assert os.path.exists(os.path.join(layout.report_dir, "report.md"))
