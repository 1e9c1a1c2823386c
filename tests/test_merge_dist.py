"""The merge fanned out: a local process pool and Ray tasks give the inline result, bit for bit;
inputs and output on S3 (moto on 127.0.0.1) read by ranged GETs."""
import os

import pytest
import torch

from mera_ds.io.format import INDEX_FILE
from mera_ds.io.reader import Checkpoint
from mera_ds.config import MergeConfig
from mera_ds.merge.engine import merge_llm

from .test_merge import state, tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# dare: random masks, so any dependence on the plan or on where a shard runs would show.
CFG = MergeConfig(strategy="dare", drop_p=0.5, lam=0.8, seed=3, shard_size="20KB")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    models = [tiny_llama(root / f"m{k}", seed=k) for k in range(3)]
    reference = str(root / "inline")
    merge_llm(models[0], models[1:], reference, CFG)
    return models, state(reference)


def assert_same(path, reference):
    got = state(path)
    assert set(got) == set(reference)
    for name, t in reference.items():
        assert torch.equal(got[name], t), name


def test_process_pool_gives_the_inline_result(inputs, tmp_path):
    models, reference = inputs
    report = merge_llm(models[0], models[1:], str(tmp_path / "out"), CFG, workers=2)
    assert report.shards > 2
    assert_same(tmp_path / "out", reference)


def test_ray_tasks_give_the_inline_result(inputs, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from mera_ds.cluster.merge_actor import merge_on_ray

    models, reference = inputs
    monkeypatch.setenv("PYTHONPATH", REPO)  # Ray workers import mera_ds from the checkout
    from mera_ds.cluster.connect import connect

    connect(None, num_cpus=2)  # a local instance on loopback
    try:
        report = merge_on_ray(models[0], models[1:], str(tmp_path / "out"), CFG, groups=3)
        assert report.shards > 3 and report.tensors == len(reference)
        assert_same(tmp_path / "out", reference)
    finally:
        ray.shutdown()


def test_s3_inputs_and_output(inputs, s3_bucket, tmp_path):
    import fsspec

    models, reference = inputs
    fs = fsspec.filesystem("s3")
    urls = []
    for k, path in enumerate(models):
        url = f"{s3_bucket}/llms/m{k}"
        fs.put(path, url, recursive=True)
        urls.append(url)
    out = f"{s3_bucket}/merged/llm"
    merge_llm(urls[0], urls[1:], out, CFG)
    assert fs.exists(f"{out}/{INDEX_FILE}") and fs.exists(f"{out}/config.json")
    local = tmp_path / "downloaded"
    fs.get(out, str(local), recursive=True)
    assert_same(local, reference)
    # ranged reads over S3 give what the local file holds
    remote, here = Checkpoint(urls[1]), Checkpoint(models[1])
    name = "model.embed_tokens.weight"
    assert torch.equal(remote.read(name, 100, 50), here.read(name, 100, 50))
