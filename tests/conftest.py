"""Shared fixtures: a real S3-protocol server (moto) on 127.0.0.1, as s3fs's own tests do."""
import hashlib
import os
import socket
import uuid

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


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
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    old_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    yield endpoint
    server.stop()
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
