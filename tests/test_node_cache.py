"""The node cache of remote model directories: one fetch per node, complete entries only, a
rewritten artifact fetched again, old entries evicted unless in use."""
import json
import os
import subprocess
import sys

import pytest

from mera_ds.errors import MeraError
from mera_ds.model import node_cache
from mera_ds.model.node_cache import local_model
from tests.conftest import ROOT, mera_env

FILES = {"config.json": b'{"model_type": "llama"}',
         "model-00001-of-00002.safetensors": b"A" * 1000,
         "model-00002-of-00002.safetensors": b"B" * 500,
         "tokenizer.json": b"{}"}
INDEX = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors"}}


def put_model(bucket: str, name: str, files=FILES, index=INDEX) -> str:
    import s3fs

    fs = s3fs.S3FileSystem()
    url = f"{bucket}/{name}"
    for n, data in files.items():
        fs.pipe(f"{url}/{n}", data)
    if index is not None:
        fs.pipe(f"{url}/model.safetensors.index.json", json.dumps(index).encode())
    return url


def contents(d: str) -> dict:
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def entries(cache) -> list[str]:
    return sorted(n for n in os.listdir(cache / "models") if os.path.isdir(cache / "models" / n))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_ranks_of_a_node_fetch_a_remote_model_once(s3_bucket, cache, tmp_path):
    url = put_model(s3_bucket, "llm")
    # Four "ranks" at once, as the processes of a node start a job. Each meets the others while
    # it reads the entry, as ranks do in a collective inside from_pretrained (ZeRO-3): none may
    # wait for a lock that a reader holds.
    code = ("import glob, logging, os, sys, time\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from mera_ds.model.node_cache import local_model\n"
            f"with local_model({url!r}) as d:\n"
            f"    open(os.path.join({str(tmp_path)!r}, f'ready-{{os.getpid()}}'), 'w').close()\n"
            "    deadline = time.time() + 60\n"
            f"    while len(glob.glob({str(tmp_path)!r} + '/ready-*')) < 4:\n"
            "        assert time.time() < deadline, 'the other ranks never came'\n"
            "        time.sleep(0.05)\n"
            "    print(d)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=mera_env(MERA_CACHE_DIR=str(cache))) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    dirs = {o.strip() for o, _ in outs}
    assert len(dirs) == 1
    assert sum(e.count("node cache: fetched") for _, e in outs) == 1
    expected = {**FILES, "model.safetensors.index.json": json.dumps(INDEX).encode()}
    assert contents(dirs.pop()) == expected
    assert not [n for n in os.listdir(cache / "models") if ".tmp-" in n]


def test_an_incomplete_remote_directory_is_refused(s3_bucket, cache):
    no_index = put_model(s3_bucket, "no-index", index=None)
    with pytest.raises(MeraError, match="no-index: safetensors shards but no index"):
        with local_model(no_index):
            pass
    missing = dict(FILES)
    del missing["model-00002-of-00002.safetensors"]
    half = put_model(s3_bucket, "half", files=missing)
    with pytest.raises(MeraError, match="half: model.safetensors.index.json names "
                                        "model-00002-of-00002.safetensors, which is not there"):
        with local_model(half):
            pass
    with pytest.raises(MeraError, match="nothing: no config.json"):
        with local_model(f"{s3_bucket}/nothing"):
            pass
    assert not os.path.exists(cache / "models") or not entries(cache)


def test_rewritten_model_is_fetched_again_and_old_entries_go_unless_in_use(s3_bucket, cache,
                                                                          monkeypatch):
    import s3fs

    url = put_model(s3_bucket, "llm")
    with local_model(url) as first:
        pass
    s3fs.S3FileSystem().pipe(f"{url}/tokenizer.json", b'{"new": 1}')
    with local_model(url) as second:
        assert second != first and contents(second)["tokenizer.json"] == b'{"new": 1}'
        # Three more models while `second` is read: the oldest entries go, never `second`.
        monkeypatch.setattr(node_cache, "KEEP", 1)
        others = []
        for name in ("b", "c", "d"):
            with local_model(put_model(s3_bucket, name)) as d:
                others.append(d)
        assert os.path.isdir(second) and contents(second)["tokenizer.json"] == b'{"new": 1}'
    assert sorted(os.path.basename(d) for d in (second, others[-2], others[-1])) == entries(cache)
