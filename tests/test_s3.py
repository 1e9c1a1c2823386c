"""Shards on S3 (a real S3-protocol server, moto, on loopback) read as local files are."""
import numpy as np
import pytest
import s3fs

from mera_ds import storage
from mera_ds.cli import main
from mera_ds.data.inspect import inspect_shards
from mera_ds.data.loader import make_loader, read_samples
from mera_ds.data.tar import expand_shards
from mera_ds.data.synth import synth_dataset
from mera_ds.errors import MeraError

COUNTS = dict(seed=5, train_per_modality=12, eval_per_modality=6, samples_per_shard=4)


@pytest.fixture
def fs(s3_endpoint):
    return s3fs.S3FileSystem(endpoint_url=s3_endpoint)


def test_round_trip_matches_local_shards(s3_bucket, fs, tmp_path):
    remote = synth_dataset(f"{s3_bucket}/ds", **COUNTS)
    local = synth_dataset(str(tmp_path), **COUNTS)
    for modality in remote:
        for split in ("train", "eval"):
            r_urls, l_urls = expand_shards(remote[modality][split]), expand_shards(
                local[modality][split])
            assert len(r_urls) == len(l_urls) == (3 if split == "train" else 2)
            for r, l in zip(r_urls, l_urls):  # the same bytes, wherever they are written
                with open(l, "rb") as f:
                    assert fs.cat(r) == f.read()
            r_samples = list(read_samples(remote[modality][split]))
            l_samples = list(read_samples(local[modality][split]))
            assert [s["__key__"] for s in r_samples] == [s["__key__"] for s in l_samples]
            for r, l in zip(r_samples, l_samples):
                assert r["__url__"].startswith(f"{s3_bucket}/ds/{modality}/")
                assert r["answer"] == l["answer"] and r["input_kind"] == l["input_kind"]
                assert r["input"].dtype == l["input"].dtype
                np.testing.assert_array_equal(r["input"], l["input"])


def test_loader_workers_read_s3(s3_bucket):
    """Forked workers open their own S3 clients: none is shared across the fork."""
    patterns = synth_dataset(f"{s3_bucket}/ds", **COUNTS)
    listed = expand_shards(f"{s3_bucket}/ds/depth/train-*.tar")
    assert listed == [f"{s3_bucket}/ds/depth/train-{i:06d}.tar" for i in range(3)]
    for rank in range(2):
        loader = make_loader(patterns["depth"]["train"], batch_size=2, collate_fn=list,
                             num_steps=5, rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        assert len(batches) == 5
        urls = {s["__url__"] for b in batches for s in b}
        assert urls <= set(listed[rank::2])


def test_inspect_and_corrupt_shards_on_s3(s3_bucket, fs, capsys):
    patterns = synth_dataset(f"{s3_bucket}/ds", **COUNTS)
    info = inspect_shards(patterns["audio"]["train"])
    assert (info["shards"], info["samples"], info["fields"]) == (3, 12, ["json", "wav"])
    assert main(["shards", "inspect", f"{s3_bucket}/ds/*/eval-*.tar", "--json"]) == 0
    assert '"samples": 24' in capsys.readouterr().out

    bad = f"{s3_bucket}/ds/audio/train-000001.tar"
    fs.pipe_file(bad, fs.cat(bad)[:20_000])  # cut inside the first sample's wav
    storage.url_to_fs(bad)[0].invalidate_cache()  # the readers' own instance saw the old one
    with pytest.raises(MeraError, match=f"{bad}: corrupt shard at sample "
                                        "'audio-train-000004'"):
        list(read_samples(patterns["audio"]["train"]))
    assert main(["shards", "inspect", f"{s3_bucket}/ds/nothing-*.tar"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"mera: error: {s3_bucket}/ds/nothing-*.tar: no shards matched"]


def test_remote_shards_read_ahead_as_local_ones(s3_bucket, tmp_path, monkeypatch):
    """A remote shard is opened while the one before it is read (a small one fetched whole, a
    larger one in background blocks): the samples and their order are the local ones, and a
    missing shard is named when the stream reaches it, after every sample before it."""
    from mera_ds.data import tar

    remote = synth_dataset(f"{s3_bucket}/ds", **COUNTS)["audio"]["train"]
    local = synth_dataset(str(tmp_path), **COUNTS)["audio"]["train"]
    keys = [s["__key__"] for s in read_samples(local)]
    for whole, block in ((tar.WHOLE, tar.BLOCK), (1024, 8192)):  # the second: blocks of 8 KB
        monkeypatch.setattr(tar, "WHOLE", whole)
        monkeypatch.setattr(tar, "BLOCK", block)
        samples = list(read_samples(remote))
        assert [s["__key__"] for s in samples] == keys
        for r, l in zip(samples, read_samples(local)):
            np.testing.assert_array_equal(r["input"], l["input"])
    urls = expand_shards(remote)
    missing = f"{s3_bucket}/ds/audio/train-000009.tar"
    seen = []
    with pytest.raises(MeraError, match=f"^{missing}: no such shard$"):
        for sample in read_samples(f"{{{urls[0]},{missing},{urls[1]}}}"):
            seen.append(sample["__key__"])
    assert seen == keys[:4]  # the first shard's samples, then the error
    stream = iter(make_loader(remote, batch_size=2, collate_fn=list, num_steps=50))
    assert len(next(stream)) == 2  # an endless stream left after one batch: nothing waits
