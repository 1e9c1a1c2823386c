"""`launch/submit.py`: a small MERA run submitted with `ray job submit` to a local Ray cluster
started with `ray start --head --node-ip-address 127.0.0.1`."""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid

import pytest
import yaml

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


class CommandLines:
    """Samples every process's command line while a block runs (what `ps` shows anyone)."""

    def __init__(self):
        self.seen, self._stop = set(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.2):
            for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
                try:
                    with open(cmdline, "rb") as f:
                        self.seen.add(f.read())
                except OSError:
                    pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def files_holding(root, marker: bytes) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    if marker in f.read():
                        hits.append(path)
            except OSError:  # sockets, files gone meanwhile
                pass
    return hits


def test_ray_job_submit_runs_a_small_run_without_leaking_secrets(tiny_config, s3_bucket):
    """Two stages (finetune, merge, realign, evaluate) submitted with launch/submit.py, the run
    directory on S3. The S3 secret key is a marker: the cluster's nodes have it in their
    environment, and it must appear in no command line, no file of Ray's temp directory (its
    logs, the jobs' runtime_envs) and nothing in the run directory."""
    import s3fs

    marker = f"secret-marker-{uuid.uuid4().hex}"
    cfg = tiny_config
    cfg["modalities"] = cfg["modalities"][:2]
    cfg["run_dir"] = f"{s3_bucket}/runs/submitted"
    cfg["stages"]["finetune"].update(steps=4, warmup_steps=1)
    cfg["stages"]["realign"].update(steps=2)
    cfg["stages"]["eval"].update(max_samples=8)
    path = os.path.join(tempfile.mkdtemp(prefix="mera-submit-"), "run.yaml")
    with open(path, "w") as f:
        f.write(yaml.safe_dump(cfg))
    # A one-node cluster on loopback (Ray would otherwise advertise the host's address), with
    # token auth off: nothing outside this machine can reach it.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": BIN + os.pathsep + os.environ["PATH"], "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "AWS_SECRET_ACCESS_KEY": marker}
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    dashboard = free_port()
    with CommandLines() as ps:
        start = subprocess.run(
            [os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
             "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard), "--num-cpus", "3", "--include-dashboard",
             "true", "--disable-usage-stats", "--temp-dir", temp_dir],
            env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stderr[-3000:]
        try:
            proc = subprocess.run(
                [sys.executable, os.path.join(ROOT, "launch", "submit.py"), path,
                 "--address", f"http://127.0.0.1:{dashboard}", "--env",
                 "MERA_EXPORT_BUCKET=16MB"], env=env, capture_output=True, text=True,
                timeout=900)
        finally:
            subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], env=env,
                           capture_output=True, timeout=120)
    try:
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "succeeded" in out
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        run = cfg["run_dir"].removeprefix("s3://")
        steps = json.loads(fs.cat(f"{run}/manifest.json"))["steps"]
        assert {"02-video/merge", "02-video/realign", "02-video/evaluate"} <= set(steps)
        assert "BRG after 2 evaluated stages" in out
        assert fs.exists(f"{run}/report/report.md")
        assert [p for p in fs.find(run) if marker.encode() in fs.cat(p)] == []
        assert files_holding(temp_dir, marker.encode()) == []
        assert [c for c in ps.seen if marker.encode() in c] == []
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
