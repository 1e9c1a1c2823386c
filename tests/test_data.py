"""The data layer on local files: built-in dataset, reading, splitting, corrupt data, CLI."""
import gzip
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest

from mera_ds.cli import main
from mera_ds.data.inspect import inspect_shards
from mera_ds.data.loader import make_loader, make_mixed_loader, read_samples, sample_stream
from mera_ds.data.tar import expand_shards, rank_shards, raw_samples
from mera_ds.data.synth import SAMPLE_RATE, TASKS, _digit_pool, synth_dataset
from mera_ds.data.writer import encode_sample, write_shards
from mera_ds.errors import MeraError
from tests.conftest import file_digests

META = {"modality": "depth", "instruction": "what ?", "answer": "a", "label": 0}


def _sample(key, value=0.0, **meta):
    return encode_sample(key, {**META, **meta}, "depth", np.full((2, 2), value, np.float32))


def _uneven_shards(root, sizes, name="s"):
    """One shard per size, with 1..N samples each: a pattern over shards of different sizes."""
    for i, n in enumerate(sizes):
        write_shards([_sample(f"{name}{i}-{j}", i) for j in range(n)], f"{root}/{name}{i}", n)
    return f"{root}/{name}{{0..{len(sizes) - 1}}}-000000.tar"


# --- the built-in dataset ------------------------------------------------------------------------

def test_synth_layout_balance_and_inspect(builtin_shards):
    assert set(builtin_shards) == {"image", "video", "audio", "depth"}
    image = builtin_shards["image"]
    assert image["train"].endswith("/image/train-{000000..000003}.tar")
    assert image["eval"].endswith("/image/eval-{000000..000000}.tar")
    field = {"image": "png", "video": "video.npy", "audio": "wav", "depth": "depth.npy"}
    for modality, patterns in builtin_shards.items():
        info = inspect_shards(patterns["train"])
        assert info["shards"] == 4 and info["samples"] == 256
        assert info["fields"] == sorted(["json", field[modality]])
        assert info["modalities"] == {modality: 256}
        counts = info["answers"][modality]
        assert set(counts) == set(TASKS[modality].answers)
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced


def test_decoded_samples_follow_the_contract(builtin_shards):
    shapes = {"image": (32, 32), "video": (4, 32, 32), "audio": (SAMPLE_RATE,),
              "depth": (32, 32)}
    for modality, patterns in builtin_shards.items():
        samples = list(read_samples(patterns["eval"]))
        assert len(samples) == 40
        assert len({s["__key__"] for s in samples}) == 40
        s = samples[0]
        assert s["__key__"] == f"{modality}-eval-000000"
        assert s["__url__"].endswith(f"/{modality}/eval-000000.tar")
        assert s["modality"] == modality and s["input_kind"] == modality
        assert s["instruction"] == TASKS[modality].instruction
        assert all(x["answer"] in TASKS[modality].answers for x in samples)
        assert s["input"].shape == shapes[modality]
        if modality in ("image", "video"):
            assert s["input"].dtype == np.uint8
        else:
            assert s["input"].dtype == np.float32
        if modality == "audio":
            assert s["sample_rate"] == SAMPLE_RATE
            assert -1.0 <= s["input"].min() < 0 < s["input"].max() <= 1.0
        else:
            assert "sample_rate" not in s
    assert list(read_samples(builtin_shards["depth"]["train"], limit=3))[2]["__key__"] == \
        "depth-train-000002"


def test_eval_digits_are_not_train_digits():
    train, eval_ = _digit_pool("train"), _digit_pool("eval")
    assert len(train[0]) + len(eval_[0]) == 1797
    assert set(train[1]) == set(eval_[1]) == set(range(10))
    seen = {img.tobytes() for img in train[0]}
    assert sum(img.tobytes() in seen for img in eval_[0]) < 3  # sklearn has a few duplicates


def _features(sample):
    x = sample["input"].astype(np.float32)
    if sample["input_kind"] == "audio":  # a tone's phase is random; its spectrum is not
        return np.abs(np.fft.rfft(x))[:1000]
    if sample["input_kind"] == "depth":  # min-max per map, as the depth encoder does
        x = (x - x.min()) / (x.max() - x.min())
    return x.ravel()


@pytest.mark.parametrize("modality,least", [("image", 0.4), ("video", 0.65), ("audio", 0.9),
                                            ("depth", 0.45)])
def test_task_is_learnable_from_the_input(builtin_shards, modality, least):
    """A nearest-centroid classifier on the inputs of 256 training samples beats chance (a model
    ignoring the input: the classes are balanced) by far on unseen samples."""
    from sklearn.neighbors import NearestCentroid

    data = {split: list(read_samples(builtin_shards[modality][split]))
            for split in ("train", "eval")}
    clf = NearestCentroid().fit(np.stack([_features(s) for s in data["train"]]),
                                [s["answer"] for s in data["train"]])
    predicted = clf.predict(np.stack([_features(s) for s in data["eval"]]))
    accuracy = np.mean(predicted == np.array([s["answer"] for s in data["eval"]]))
    chance = 1 / len(TASKS[modality].answers)
    assert accuracy >= least >= 1.8 * chance


def test_synth_is_deterministic_for_a_seed(tmp_path):
    kw = dict(train_per_modality=6, eval_per_modality=3, samples_per_shard=4)
    patterns = synth_dataset(str(tmp_path / "a"), seed=3, **kw)
    synth_dataset(str(tmp_path / "b"), seed=3, **kw)
    synth_dataset(str(tmp_path / "c"), seed=4, **kw)
    a, b, c = (file_digests(tmp_path / d) for d in "abc")
    assert len(a) == 4 * (2 + 1) and a == b
    assert all(a[f] != c[f] for f in a)
    assert patterns["audio"]["train"] == f"{tmp_path}/a/audio/train-{{000000..000001}}.tar"
    assert not [f for f in os.listdir(tmp_path / "a" / "image") if ".tmp-" in f]
    with tarfile.open(tmp_path / "a" / "image" / "train-000000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
        assert [m.name for m in tar.getmembers()][:2] == ["image-train-000000.json",
                                                         "image-train-000000.png"]


def test_synth_rejects_bad_counts(tmp_path):
    with pytest.raises(MeraError, match="eval_per_modality must be >= 1"):
        synth_dataset(str(tmp_path), eval_per_modality=0)


# --- reading: patterns, ranks, workers, steps ------------------------------------------------

def test_expand_shards(tmp_path):
    pattern = _uneven_shards(tmp_path, [1, 2, 3])
    urls = expand_shards(pattern)
    assert urls == [f"{tmp_path}/s{i}-000000.tar" for i in range(3)]
    assert expand_shards(f"{tmp_path}/s*-000000.tar") == urls  # globs are listed
    with pytest.raises(MeraError, match="no shards matched"):
        expand_shards(f"{tmp_path}/nothing-*.tar")
    with pytest.raises(MeraError, match="unbalanced braces"):
        expand_shards(f"{tmp_path}/s{{0..2-000000.tar")


def test_ranks_and_workers_read_disjoint_shards_covering_all(tmp_path):
    import torch.utils.data

    pattern = _uneven_shards(tmp_path, [1, 2, 3, 4, 5])
    seen = []
    for rank in range(2):
        stream = sample_stream(pattern, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2,
                                             multiprocessing_context="fork")
        seen.append([(s["__url__"], s["__key__"]) for s in loader])
    urls = [{u for u, _ in keys} for keys in seen]
    assert not urls[0] & urls[1]
    assert urls[0] | urls[1] == set(expand_shards(pattern))
    keys = [k for rank_keys in seen for _, k in rank_keys]
    assert len(keys) == len(set(keys)) == 15  # every sample once, across ranks and workers
    assert rank_shards(pattern, expand_shards(pattern), 1, 2) == sorted(urls[1])
    with pytest.raises(MeraError, match=r"s\{0\.\.4\}-000000\.tar: 5 shard\(s\) for 6 ranks"):
        sample_stream(pattern, rank=0, world_size=6)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_takes_the_same_number_of_steps(tmp_path, num_workers):
    pattern = _uneven_shards(tmp_path, [1, 2, 9])  # ranks 0 and 1 hold 10 and 2 samples
    for rank in range(2):
        loader = make_loader(pattern, batch_size=3, collate_fn=list, num_steps=7, rank=rank,
                             world_size=2, seed=1, num_workers=num_workers, shuffle_buffer=4)
        assert len(loader) == 7
        for _ in range(2):  # a second epoch too
            batches = list(loader)
            assert len(batches) == 7 and all(len(b) == 3 for b in batches)
            assert isinstance(batches[0][0]["input"], np.ndarray)  # as collate_fn made it
    assert list(make_loader(pattern, batch_size=1, collate_fn=list, num_steps=0)) == []


def test_resampled_streams_are_seeded(tmp_path):
    pattern = _uneven_shards(tmp_path, [4, 4, 4, 4])

    def keys(seed, epochs=1):
        loader = make_loader(pattern, batch_size=4, collate_fn=list, num_steps=6, seed=seed,
                             shuffle_buffer=8)
        return [[s["__key__"] for b in loader for s in b] for _ in range(epochs)]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    first, second = keys(0, epochs=2)
    assert first != second  # each epoch draws anew


def test_mixed_stream_follows_weights(tmp_path):
    a = _uneven_shards(tmp_path, [5, 5], name="a")
    b = _uneven_shards(tmp_path, [5, 5], name="b")
    loader = make_mixed_loader([a, b], [3, 1], batch_size=10, collate_fn=list, num_steps=40,
                               seed=2)
    names = [s["__key__"][0] for batch in loader for s in batch]
    assert len(names) == 400 and 0.68 < names.count("a") / 400 < 0.82
    again = [s["__key__"][0] for batch in loader for s in batch]
    assert again != names
    with pytest.raises(MeraError, match="mix weights"):
        make_mixed_loader([a, b], [1], batch_size=1, collate_fn=list, num_steps=1)


# --- corrupt data ----------------------------------------------------------------------------

def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def test_truncated_shard_names_shard_and_key(tmp_path, caplog):
    pattern = write_shards([_sample(f"k{j}", j) for j in range(6)], f"{tmp_path}/t", 3)
    bad = f"{tmp_path}/t-000001.tar"
    _truncate(bad, 512 * 5)  # mid-way through the member data of the second sample
    with pytest.raises(MeraError) as err:
        list(read_samples(pattern))
    assert bad in str(err.value) and "'k4'" in str(err.value)
    assert "\n" not in str(err.value)

    stream = sample_stream(pattern, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="mera_ds.data"):
        keys = [s["__key__"] for s in stream]
    assert keys == ["k0", "k1", "k2", "k3"]  # what came before the damage is kept
    assert (stream.skipped.shards, stream.skipped.samples) == (1, 0)
    assert any(bad in r.getMessage() and "1 shards skipped" in r.getMessage()
               for r in caplog.records)


def test_shard_cut_at_a_member_boundary_is_caught(tmp_path):
    """tarfile would end such an archive quietly (no end-of-archive block is not an error to it)."""
    pattern = write_shards([_sample(f"k{j}", j) for j in range(3)], f"{tmp_path}/t", 3)
    with tarfile.open(f"{tmp_path}/t-000000.tar") as tar:
        end_of_k1 = tar.getmember("k1.json").offset  # members sort as depth.npy, json
    _truncate(f"{tmp_path}/t-000000.tar", end_of_k1)
    with pytest.raises(MeraError, match=r"t-000000\.tar: corrupt shard at "
                                        r"sample 'k1'"):
        list(read_samples(pattern))


def _tar_of(samples, path, fmt, opener=open):
    """A shard written by tarfile in `fmt`, members in sample order (as webdataset writes)."""
    with opener(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=fmt) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if not ext.startswith("__"):
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt,opener", [
    (tarfile.USTAR_FORMAT, open), (tarfile.GNU_FORMAT, open), (tarfile.PAX_FORMAT, gzip.open)])
def test_shards_written_by_other_tars_read_whole(tmp_path, fmt, opener):
    """Keys in directories (the ustar prefix field), keys too long for a header (GNU long names,
    pax records; ustar has none) and gzip: every sample comes back as written."""
    long = "d" * 90 + "/" + ("k" * 120 if fmt != tarfile.USTAR_FORMAT else "k" * 60)
    samples = [_sample(key, j) for j, key in enumerate(["a", "dir/b", long])]
    _tar_of(samples, f"{tmp_path}/o-000000.tar", fmt, opener)
    got = list(raw_samples(f"{tmp_path}/o-000000.tar"))
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in got] == samples


def test_garbled_header_names_the_shard(tmp_path):
    pattern = write_shards([_sample(f"k{j}", j) for j in range(3)], f"{tmp_path}/g", 3)
    path = f"{tmp_path}/g-000000.tar"
    with tarfile.open(path) as tar:
        header = tar.getmember("k1.json").offset
    with open(path, "r+b") as f:  # one bit of the header's name: only the checksum tells
        f.seek(header)
        f.write(b"j")
    with pytest.raises(MeraError, match=r"g-000000\.tar: corrupt shard at sample 'k1'.*checksum"):
        list(read_samples(pattern))


def _raw_with(key, **fields):
    raw = _sample(key)
    raw.update(fields)
    return raw


@pytest.mark.parametrize("bad,message", [
    ({"json": json.dumps({"modality": "depth", "instruction": "x"}).encode()},
     "json has no 'messages' and no string 'answer'"),
    ({"json": b"{not json"}, "json does not parse"),
    ({"depth.npy": b"\x93NUMPY garbage"}, "depth.npy does not decode"),
    ({"png": b"\x89PNG not really"}, "needs exactly one input member"),
])
def test_corrupt_sample_names_shard_and_key(tmp_path, bad, message):
    good = [_sample(f"k{j}", j) for j in range(4)]
    pattern = write_shards(good[:2] + [_raw_with("bad", **bad)] + good[2:], f"{tmp_path}/c", 5)
    with pytest.raises(MeraError, match=message) as err:
        list(read_samples(pattern))
    assert f"{tmp_path}/c-000000.tar: sample 'bad'" in str(err.value)
    stream = sample_stream(pattern, on_corrupt="skip")
    assert [s["__key__"] for s in stream] == ["k0", "k1", "k2", "k3"]
    assert (stream.skipped.samples, stream.skipped.shards) == (1, 0)


def test_undecodable_png_and_pickled_npy_are_refused(tmp_path):
    png = {"png": b"\x89PNG\r\n\x1a\n broken"}
    raw = _raw_with("img", **png)
    del raw["depth.npy"]
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    pickled = _raw_with("pickle", **{"depth.npy": buf.getvalue()})
    pattern = write_shards([raw, pickled], f"{tmp_path}/p", 1)
    with pytest.raises(MeraError, match=r"p-000000\.tar: sample 'img': png does not decode"):
        list(read_samples(pattern))
    with pytest.raises(MeraError, match=r"p-000001\.tar: sample 'pickle': depth.npy does not "
                                        r"decode \(ValueError: .*pickle"):
        list(read_samples(pattern.replace("{000000..000001}", "000001")))


def test_skips_are_counted_across_loader_workers(tmp_path):
    pattern = write_shards([_sample(f"k{j}", j) for j in range(4)], f"{tmp_path}/w", 2)
    write_shards([_raw_with("bad", json=b"[]")], f"{tmp_path}/w-bad", 1)
    pattern = f"{tmp_path}/{{w-000000,w-000001,w-bad-000000}}.tar"
    loader = make_loader(pattern, batch_size=2, collate_fn=list, num_steps=30, num_workers=2,
                         on_corrupt="skip")
    assert len(list(loader)) == 30
    assert loader.skipped.samples > 0 and loader.skipped.shards == 0


def test_errors_from_loader_workers_are_one_line(tmp_path):
    pattern = write_shards([_raw_with(f"bad{j}", json=b"[]") for j in range(2)],
                           f"{tmp_path}/e", 1)
    loader = make_loader(pattern, batch_size=1, collate_fn=list, num_steps=3, num_workers=2)
    with pytest.raises(MeraError) as err:
        list(loader)
    assert "\n" not in str(err.value) and "json is not an object" in str(err.value)
    # skipping everything would spin forever on resampled shards: it stops instead
    loader = make_loader(pattern, batch_size=1, collate_fn=list, num_steps=3, on_corrupt="skip")
    with pytest.raises(MeraError, match="no readable sample in the 2 shard"):
        list(loader)


def test_missing_shard_is_an_error_even_when_skipping(tmp_path):
    with pytest.raises(MeraError, match=r"gone-000000\.tar: no such shard"):
        list(read_samples(f"{tmp_path}/gone-000000.tar", on_corrupt="skip"))


# --- the CLI ----------------------------------------------------------------------------------

def test_cli_synth_and_inspect(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["shards", "synth", "--out", str(out), "--seed", "1", "--train-per-modality",
                 "8", "--eval-per-modality", "4", "--samples-per-shard", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"depth  train {out}/depth/train-{{000000..000001}}.tar" in printed

    assert main(["shards", "inspect", f"{out}/video/train-{{000000..000001}}.tar"]) == 0
    text = capsys.readouterr().out
    assert "shards:   2" in text and "samples:  8" in text and "fields:   json video.npy" in text
    assert "modality: video (8 samples; answers: down 2, left 2, right 2, up 2)" in text

    assert main(["shards", "inspect", f"{out}/*/eval-*.tar", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shards"] == 4 and info["samples"] == 16
    assert info["modalities"] == {"audio": 4, "depth": 4, "image": 4, "video": 4}
    assert info["fields"] == ["depth.npy", "json", "png", "video.npy", "wav"]


def test_cli_inspect_errors_are_one_line(tmp_path, capsys):
    assert main(["shards", "inspect", f"{tmp_path}/none-{{0..3}}.tar"]) == 2
    err = capsys.readouterr().err
    assert err == f"mera: error: {tmp_path}/none-{{0..3}}.tar: no shards matched\n"

    write_shards([_sample("k0"), _sample("k1")], f"{tmp_path}/x", 2)
    _truncate(f"{tmp_path}/x-000000.tar", 700)
    assert main(["shards", "inspect", f"{tmp_path}/x-000000.tar", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x-000000.tar: corrupt shard" in err
