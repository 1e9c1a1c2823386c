"""Replay sampling: exact counts, a seeded subset copied byte for byte, readable by two ranks,
local and S3, committed at once and never over an existing replay."""
import dataclasses
import hashlib
import json
import os

import pytest

from mera_ds import storage
from mera_ds.data import replay
from mera_ds.data.replay import sample_replay
from mera_ds.data.loader import make_loader, read_samples
from mera_ds.data.tar import expand_shards, raw_samples
from mera_ds.data.synth import synth_samples
from mera_ds.data.writer import write_shards
from mera_ds.errors import MeraError
from tests.conftest import file_digests

N = 200  # training samples of the source, in 4 shards


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A modality's training shards: 200 built-in image samples in 4 shards."""
    out = tmp_path_factory.mktemp("train")
    return write_shards(synth_samples("image", "train", N, seed=0), str(out / "train"), 50)


def _raw_by_key(pattern):
    return {r["__key__"]: {k: v for k, v in r.items() if k != "__url__"}
            for url in expand_shards(pattern) for r in raw_samples(url)}


@pytest.mark.parametrize("ratio, k, sizes", [(0.01, 2, [1, 1]), (0.1, 20, [10, 10]),
                                             (0.333, 67, [34, 33])])
def test_exact_count_of_raw_training_samples(source, tmp_path, ratio, k, sizes):
    out = str(tmp_path / "replay" / "image")
    info = sample_replay(source, out, ratio, seed=1)
    assert info["samples"] == k == round(ratio * N) and info["source_samples"] == N
    assert info["ratio"] == ratio and info["source"] == source
    assert info["pattern"] == f"{out}/replay-{{000000..{len(sizes) - 1:06d}}}.tar"
    shards = expand_shards(info["pattern"])
    assert [len(list(raw_samples(u))) for u in shards] == sizes  # split evenly over 2 shards
    got = _raw_by_key(info["pattern"])
    keys = [s["__key__"] for s in read_samples(info["pattern"])]
    assert len(keys) == len(set(keys)) == k and set(keys) == set(got)
    train = _raw_by_key(source)
    assert all(got[key] == train[key] for key in keys)  # a subset, copied without re-encoding
    assert info["keys_sha256"] == hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    assert storage.read_json(f"{out}/replay.json") == info
    assert sorted(os.listdir(tmp_path / "replay")) == ["image"]  # no temporary left behind


def test_more_shards_than_two(source, tmp_path):
    info = sample_replay(source, str(tmp_path / "r"), 0.05, seed=0, num_shards=3)
    assert [len(list(raw_samples(u))) for u in expand_shards(info["pattern"])] == [4, 4, 2]
    # k <= num_shards * (num_shards - 1): ceil(5 / 4) = 2 per shard would give 3 shards, not 4
    info = sample_replay(source, str(tmp_path / "s"), 0.025, seed=0, num_shards=4)
    assert [len(list(raw_samples(u))) for u in expand_shards(info["pattern"])] == [1] * 5


def test_seeded(source, tmp_path):
    a = sample_replay(source, str(tmp_path / "a"), 0.1, seed=7)
    b = sample_replay(source, str(tmp_path / "b"), 0.1, seed=7)
    c = sample_replay(source, str(tmp_path / "c"), 0.1, seed=8)
    assert a["keys_sha256"] == b["keys_sha256"] != c["keys_sha256"]
    files = file_digests(tmp_path / "a")
    del files["replay.json"]  # it names its own directory
    assert files == {k: v for k, v in file_digests(tmp_path / "b").items() if k in files}
    assert len(files) == 2  # byte-identical shards
    keys_a = {s["__key__"] for s in read_samples(a["pattern"])}
    keys_c = {s["__key__"] for s in read_samples(c["pattern"])}
    assert keys_a != keys_c and len(keys_c) == 20


def test_two_ranks_read_the_replay(source, tmp_path):
    info = sample_replay(source, str(tmp_path / "r"), 0.1, seed=0)
    seen = []
    for rank in range(2):
        loader = make_loader(info["pattern"], batch_size=4, num_steps=3, rank=rank,
                             world_size=2, collate_fn=lambda b: [s["__key__"] for s in b])
        batches = list(loader)
        assert len(batches) == 3 and all(len(b) == 4 for b in batches)
        seen.append({key for b in batches for key in b})
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank its own shard


def test_s3_round_trip(source, tmp_path, s3_bucket):
    fs, _ = storage.url_to_fs(s3_bucket)
    for url in expand_shards(source):
        fs.put(url, f"{s3_bucket.removeprefix('s3://')}/train/{os.path.basename(url)}")
    remote = f"{s3_bucket}/train/train-{{000000..000003}}.tar"
    out = f"{s3_bucket}/run/replay/image"
    info = sample_replay(remote, out, 0.1, seed=3)
    local = sample_replay(source, str(tmp_path / "r"), 0.1, seed=3)
    assert info["keys_sha256"] == local["keys_sha256"]  # same data, same choice wherever it is
    assert info["pattern"].startswith(f"{out}/replay-") and info["samples"] == 20
    assert storage.read_json(f"{out}/replay.json") == info
    assert _raw_by_key(info["pattern"]) == _raw_by_key(local["pattern"])
    with pytest.raises(MeraError, match="already exists"):
        sample_replay(remote, out, 0.1, seed=4)
    assert storage.read_json(f"{out}/replay.json") == info


def test_existing_replay_is_never_overwritten(source, tmp_path):
    out = tmp_path / "replay"
    sample_replay(source, str(out), 0.1, seed=0)
    before = file_digests(out)
    with pytest.raises(MeraError, match="already exists"):
        sample_replay(source, str(out), 0.01, seed=5)
    assert file_digests(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(MeraError, match="already exists"):
        sample_replay(source, str(other), 0.1, seed=0)
    assert os.listdir(other) == ["notes.txt"] and (other / "notes.txt").read_text() == "mine"


def test_crash_leaves_no_replay(source, tmp_path, monkeypatch):
    def crash(url, obj):
        raise RuntimeError("killed")

    monkeypatch.setattr(replay.storage, "write_json", crash)
    with pytest.raises(RuntimeError):
        sample_replay(source, str(tmp_path / "r"), 0.1, seed=0)
    assert os.listdir(tmp_path) == []  # neither the replay nor its temporary


@pytest.mark.parametrize("ratio, num_shards, match", [
    (0.004, None, r"train-\{000000\.\.000003\}\.tar: a replay ratio of 0.004 of 200 samples is 1 "
                  r"sample\(s\), fewer than the 2 replay shards"),
    (0.02, 5, "is 4 sample"),
    (0.0, None, r"replay ratio must be in \(0, 1\], got 0.0"),
    (1.5, None, "got 1.5"),
    (0.1, 0, "num_shards must be >= 1"),
])
def test_bad_replay_is_one_line_error(source, tmp_path, ratio, num_shards, match):
    with pytest.raises(MeraError, match=match) as e:
        sample_replay(source, str(tmp_path / "r"), ratio, seed=0, num_shards=num_shards)
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_duplicate_keys_are_an_error(tmp_path):
    write_shards(synth_samples("image", "train", 4), str(tmp_path / "a"), 4)
    write_shards(synth_samples("image", "train", 4), str(tmp_path / "b"), 4)
    with pytest.raises(MeraError, match="'image-train-000000' occurs twice"):
        sample_replay(str(tmp_path / "{a,b}-000000.tar"), str(tmp_path / "r"), 0.5, seed=0)
    assert not os.path.exists(tmp_path / "r")


def test_full_replay_json(source, tmp_path):
    info = sample_replay(source, str(tmp_path / "r"), 1.0, seed=0)
    assert info["samples"] == N
    assert set(_raw_by_key(info["pattern"])) == set(_raw_by_key(source))
    with open(tmp_path / "r" / "replay.json") as f:
        assert json.load(f)["keys_sha256"] == info["keys_sha256"]


def test_a_realign_in_epochs_takes_its_steps_from_the_replay_sizes(tmp_path):
    """stages.realign.epochs: the realign's steps follow its replay mix's size, known once the
    replay steps have written it, so a 1% realign is a tenth of a 10% one."""
    from mera_ds.config import RealignConfig
    from mera_ds.data.replay import MANIFEST, ReplaySet
    from mera_ds.storage import write_json
    from mera_ds.train.recipe import JobSpec, with_length

    sets = []
    for name, samples in (("image", 200), ("video", 120)):
        write_json(str(tmp_path / name / MANIFEST), {"pattern": f"{name}-{{0..1}}.tar",
                                                     "samples": samples})
        sets.append(ReplaySet(str(tmp_path / name)))
    spec = JobSpec(name="02-video/realign", phase="realign", modality="video",
                   learned=("image", "video"), train_llm=False, train_connectors=("image",),
                   data=tuple(sets), settings=RealignConfig(epochs=1.5, batch_size=16),
                   lr_llm=0.0, lr_connector=1e-3, init_llm=None)
    assert with_length(spec).settings.steps == 30  # ceil(1.5 * 320 / 16)
    fixed = dataclasses.replace(spec, settings=RealignConfig(steps=7))
    assert with_length(fixed) is fixed
    shards = dataclasses.replace(spec, data=("a-{0..1}.tar",))
    with pytest.raises(MeraError, match="02-video/realign: epochs needs replay sets"):
        with_length(shards)
