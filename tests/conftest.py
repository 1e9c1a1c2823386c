"""Shared fixtures: a real S3-protocol server (moto) on 127.0.0.1, as s3fs's own tests do."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from unittest import mock

import pytest
import yaml

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What session fixtures put in the environment: kept for every later test, also when the fixture
# was first made inside a test (`request.getfixturevalue`), under that test's own_environment.
SESSION_ENV: dict = {}


@pytest.fixture(autouse=True)
def own_environment():
    """Each test gets the environment back as it found it: a job run in the test process sets
    RANK, WORLD_SIZE and the like (init_distributed, as one process), and a subprocess started
    by a later test with those and no MASTER_ADDR would look for MPI."""
    with mock.patch.dict(os.environ, SESSION_ENV):
        yield


def mera_env(**extra) -> dict:
    """The environment of the tests' `mera` subprocesses: this one's as it is now (fixtures set
    S3 endpoints and keys), CPU, one thread."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
            **extra}


ENV = mera_env()


def file_digests(root) -> dict:
    """{relative path: sha256} of every file under root: to check nothing was changed."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on loopback. Sets the env (for subprocesses: Ray workers, launcher
    ranks) and fsspec's config (for this process) so plain s3:// URLs reach it."""
    import fsspec
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
    SESSION_ENV.update(env)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    yield endpoint
    server.stop()
    for k in env:
        SESSION_ENV.pop(k)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if old_conf is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = old_conf


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket: returns its s3:// URL."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    name = f"test-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    yield f"s3://{name}"
    fs.rm(name, recursive=True)


@pytest.fixture(scope="module")
def one_thread():
    """A module that runs models in this process keeps to one thread: other test files run
    beside it on a small machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def builtin_shards(tmp_path_factory):
    """A small copy of the built-in dataset: 4 train shards of 64 and one eval shard of 40
    samples per modality. Returns {modality: {"train": pattern, "eval": pattern}}."""
    from mera_ds.data.synth import synth_dataset

    out = tmp_path_factory.mktemp("shards")
    return synth_dataset(str(out), seed=0, train_per_modality=256, eval_per_modality=40,
                         samples_per_shard=64)


def default_config(shards: dict, run_dir) -> dict:
    """The embedded default config (a dict) on `shards` (builtin_shards), its run in run_dir."""
    from mera_ds.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "launch/configs/default.yaml")).model_dump(mode="json")
    cfg["run_dir"] = str(run_dir)
    for m in cfg["modalities"]:
        m["train_shards"] = shards[m["name"]]["train"]
        m["eval_shards"] = shards[m["name"]]["eval"]
    cfg["data"] = {"shuffle_buffer": 64}
    return cfg


@pytest.fixture
def tiny_config(builtin_shards, tmp_path):
    """The embedded default config on the small shards, writing its run under tmp_path."""
    return default_config(builtin_shards, tmp_path / "run")


def two_modalities(cfg: dict) -> dict:
    """The default config cut to two short stages: the runs of the pipeline tests."""
    cfg["modalities"] = cfg["modalities"][:2]
    st = cfg["stages"]
    st["finetune"].update(steps=8, warmup_steps=1)
    # One sample per rank and step: the ranks' realign batches often hold different modalities.
    st["realign"].update(steps=6, batch_size=2, micro_batch_size=1)
    st["eval"].update(max_samples=16, batch_size=16)
    return cfg


def run_in_process(cfg: dict, tmp_path) -> None:
    """`mera run --executor local` on config `cfg` (written to tmp_path/run.yaml): the whole run
    in one process, no Ray."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "mera_ds", "run", str(path), "--executor",
                           "local"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


class Crash(Exception):
    pass


def crashing_checkpointer(path: str):
    """A resume-state checkpointer that raises Crash right after its first save: a job killed
    just after a checkpoint."""
    from mera_ds.train.runtime import DirCheckpointer

    class Crashing(DirCheckpointer):
        def save(self, engine, step, metrics):
            super().save(engine, step, metrics)
            raise Crash(step)

    return Crashing(path)


def mera_run(path, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "mera_ds", "run", str(path), *extra],
                            cwd=ROOT, env=env or mera_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="session")
def resumed_run(builtin_shards, tmp_path_factory):
    """A two-modality run on a local Ray (one step at a time: the sequential schedule), its
    driver killed during stage 2's finetune, then resumed to the end (test_pipeline checks the
    resume; test_faults and test_schedule compare with it)."""
    from mera_ds.config import parse_config
    from mera_ds.run.layout import RunLayout

    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = two_modalities(default_config(builtin_shards, tmp / "ray"))
    cfg["cluster"]["schedule"] = "sequential"
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
    stage1 = {p: os.path.getmtime(p) for step in first.values() for url in step["outputs"]
              for p in _files(url)}

    proc = mera_run(path, "--resume")
    out = proc.stdout.read()
    assert proc.wait() == 0, out[-4000:]
    return {"cfg": cfg, "path": path, "layout": layout, "first": first, "stage1": stage1,
            "out": out, "tmp": tmp}


def _files(path: str) -> list[str]:
    """The file at `path`, or the files under the directory there."""
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]


def ray_train_worker_of(driver: int) -> int:
    """A Ray Train worker process started by this driver (not by another Ray on the host)."""
    for pid in map(int, subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"],
                                       capture_output=True, text=True).stdout.split()):
        if driver in ancestors(pid):
            return pid
    raise AssertionError("no Ray Train worker of this driver is running")


def ancestors(pid: int) -> list[int]:
    out = []
    try:
        while pid > 1:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
            out.append(pid)
    except OSError:  # gone meanwhile
        pass
    return out
