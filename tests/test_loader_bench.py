"""bench/loader_bench.py compares like with like: its paths read the same samples, and plain
webdataset's decoding gives what mera's gives."""
import numpy as np

from bench import loader_bench


def test_paths_see_the_same_samples(tmp_path, one_thread):
    pattern = loader_bench.make_shards(str(tmp_path), "image", 48, per_shard=16)
    collate = loader_bench.collator("image")
    results = loader_bench.measure(pattern, collate, batch_size=8, samples=48, repeats=1)
    assert list(results) == ["webdataset", "mera decode", "mera train"]
    assert {name: r["samples"] for name, r in results.items()} == dict.fromkeys(results, 48)
    assert all(len(r["rates"]) == 1 and r["rates"][0] > 0 for r in results.values())


def test_webdataset_decodes_as_mera_does(tmp_path):
    pattern = loader_bench.make_shards(str(tmp_path), "image", 20, per_shard=10)
    from mera_ds.data.tar import expand_shards

    peer = list(loader_bench.wds_samples(expand_shards(pattern)))
    mera = list(loader_bench.mera_decode_samples(pattern))
    assert [s["__key__"] for s in peer] == [s["__key__"] for s in mera]
    for p, m in zip(peer, mera):
        assert p["png"].dtype == m["input"].dtype == np.uint8
        assert np.array_equal(p["png"], m["input"])
        assert p["json"]["answer"] == m["answer"]
