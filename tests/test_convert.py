"""`mera shards convert`: LLaVA-style JSON and media files -> shards the trainer reads; the media
readers that `mera predict` shares."""
import json
import os

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from mera_ds.cli import main
from mera_ds.data import media
from mera_ds.data.convert import convert_llava
from mera_ds.data.decode import decode_sample
from mera_ds.data.tar import expand_shards, raw_samples
from mera_ds.errors import MeraError
from mera_ds.model.tiny import PLACEHOLDER


def _turns(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def _write_mp4(path, num_frames=20, size=(64, 48)):
    """A clip whose frame i is the flat grey level 10 * i: which frames were taken shows."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(num_frames):
            frame = np.full((size[1], size[0], 3), 10 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_tone(path, seconds=0.5, rate=44100, hz=440):
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * hz * t)
    soundfile.write(str(path), np.stack([tone, tone], axis=1), rate)  # stereo, 44.1 kHz


@pytest.fixture
def llava(tmp_path):
    """Media files and a LLaVA JSON of good and bad image records: {"json", "root"}."""
    root = tmp_path / "media"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / "img/a.png")
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(root / "img/b.jpg")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "img/gray.png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "img/c.gif")
    (root / "img/corrupt.jpg").write_bytes((root / "img/b.jpg").read_bytes()[:120])
    records = [
        {"id": "one", "image": "img/a.png", "conversations": _turns("<image>\nWhat is it?",
                                                                     "a cat")},
        {"id": "multi", "image": "img/b.jpg",
         "conversations": _turns("What colour?\n<image>", "red", "And the size?", "small")},
        {"id": "missing", "image": "img/none.jpg", "conversations": _turns("<image>\nq", "a")},
        {"id": "corrupt", "image": "img/corrupt.jpg", "conversations": _turns("<image>\nq", "a")},
        {"id": "late-tag", "image": "img/a.png", "conversations": _turns("q", "a", "<image>", "b")},
        {"id": "gpt-first", "image": "img/a.png",
         "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        {"id": 7, "image": "img/gray.png", "conversations": _turns("Describe.", "noise")},
        {"id": "gif", "image": "img/c.gif", "conversations": _turns("<image> Which?", "this")},
        {"id": "two-tags", "image": "img/a.png", "conversations": _turns("<image><image>", "a")},
        "not a record",
        {"id": "placeholder", "image": "img/a.png", "conversations": _turns("q", "<modality>")},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return {"json": str(path), "root": str(root)}


def _convert(llava, out, **kwargs):
    kwargs = {"samples_per_shard": 2, "progress": False, **kwargs}
    return convert_llava(llava["json"], llava["root"], "image", str(out), **kwargs)


def _samples(pattern):
    return [decode_sample(raw) for url in expand_shards(pattern) for raw in raw_samples(url)]


def _stats(pattern):
    return {u: (os.stat(u).st_ino, os.stat(u).st_mtime_ns) for u in expand_shards(pattern)}


def _bytes(pattern):
    return [open(u, "rb").read() for u in expand_shards(pattern)]


# --- the media readers ---------------------------------------------------------------------------

def test_media_readers(tmp_path):
    Image.fromarray(np.full((6, 9), 200, np.uint8)).save(tmp_path / "g.png")  # mode L
    image = media.read_image(str(tmp_path / "g.png"))
    assert image.shape == (6, 9, 3) and image.dtype == np.uint8 and (image == 200).all()

    _write_tone(tmp_path / "t.wav")
    audio = media.read_audio(str(tmp_path / "t.wav"), 16000)
    assert audio.dtype == np.float32 and audio.shape == (8000,)  # 0.5 s at 16 kHz, mono
    assert np.argmax(np.abs(np.fft.rfft(audio))) * 16000 / len(audio) == pytest.approx(440, abs=4)

    _write_mp4(tmp_path / "v.mp4")
    video = media.read_video(str(tmp_path / "v.mp4"), 4)
    assert video.shape == (4, 48, 64, 3) and video.dtype == np.uint8
    # frames 0, 6, 13, 19 of 20: the first, the last and evenly between
    np.testing.assert_allclose(video.mean(axis=(1, 2, 3)), [0, 60, 130, 190], atol=6)
    assert media.read_video(str(tmp_path / "v.mp4"), 3, size=24).shape == (3, 24, 32, 3)
    assert media.read_video(str(tmp_path / "v.mp4"), 30).shape == (30, 48, 64, 3)


def test_media_errors_name_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    cases = [(media.read_image, "bad.jpg", "does not decode as an image"),
             (media.read_image, "none.png", "no such file"),
             (media.read_audio, "bad.jpg", "does not decode as audio"),
             (media.read_video, "bad.jpg", "does not decode as a video"),
             (media.read_video, "none.mp4", "no such file")]
    for read, name, cause in cases:
        args = {media.read_audio: (16000,), media.read_video: (4,)}.get(read, ())
        with pytest.raises(media.MediaError) as e:
            read(str(tmp_path / name), *args)
        assert str(e.value).startswith(f"{tmp_path / name}: {cause}")
        assert "\n" not in str(e.value) and " at 0x" not in str(e.value)


# --- converting ----------------------------------------------------------------------------------

def test_convert_writes_conversations_and_reports_bad_records(llava, tmp_path):
    result = _convert(llava, tmp_path / "out/train-%06d.tar")
    # shard k = records [2k, 2k + 2) of those passing the cheap checks: 0, 1 | 3, 6 | 7
    assert result["pattern"] == f"{tmp_path}/out/train-{{000000..000002}}.tar"
    assert (result["shards"], result["samples"], result["records"]) == (3, 4, 11)
    samples = _samples(result["pattern"])
    by_id = {json.loads(raw["json"])["id"]: raw
             for url in expand_shards(result["pattern"]) for raw in raw_samples(url)}
    assert [s["__key__"] for s in samples] == [
        "image-000000000", "image-000000001", "image-000000006", "image-000000007"]
    assert samples[0]["messages"] == [{"role": "user", "content": "What is it?"},
                                      {"role": "assistant", "content": "a cat"}]
    assert samples[1]["messages"] == [
        {"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the size?"}, {"role": "assistant", "content": "small"}]
    assert (samples[1]["instruction"], samples[1]["answer"]) == ("What colour?", "small")
    assert samples[2]["messages"][0]["content"] == "Describe."  # no tag: the text as it is
    assert samples[3]["messages"][0]["content"] == "Which?"
    assert all(s["modality"] == "image" and s["input_kind"] == "image" for s in samples)
    # JPEG and PNG files are kept byte for byte; other formats become PNG
    assert by_id["one"]["png"] == open(f"{llava['root']}/img/a.png", "rb").read()
    assert by_id["multi"]["jpg"] == open(f"{llava['root']}/img/b.jpg", "rb").read()
    assert "png" in by_id["gif"] and samples[3]["input"].shape == (8, 8, 3)

    reasons = {s["index"]: (s["id"], s["reason"]) for s in result["skipped_records"]}
    assert sorted(reasons) == [2, 3, 4, 5, 8, 9, 10] and result["skipped"] == 7
    assert reasons[2] == ("missing", f"{llava['root']}/img/none.jpg: no such file")
    assert reasons[3][0] == "corrupt"
    assert "img/corrupt.jpg: does not decode as an image" in reasons[3][1]
    assert "conversations[2] has <image>" in reasons[4][1]
    assert 'conversations[0] is not {"from": "human"' in reasons[5][1]
    assert "2 <image> tags" in reasons[8][1]
    assert reasons[9] == (None, "not a JSON object")
    assert reasons[10][1] == f"conversations[1] has {PLACEHOLDER}, the model's placeholder token"
    with open(tmp_path / "out/train-report.json") as f:
        report = json.load(f)
    assert report["skipped_records"] == result["skipped_records"]
    assert report["pattern"] == result["pattern"] and report["samples"] == 4


def test_audio_and_video_records(tmp_path):
    _write_tone(tmp_path / "t.wav")
    _write_mp4(tmp_path / "v.mp4")
    for modality, name in (("audio", "t.wav"), ("video", "v.mp4")):
        path = tmp_path / f"{modality}.json"
        path.write_text(json.dumps([{"id": "x", modality: name, "conversations": _turns(
            f"<{modality}>\nWhat is it?", "this")}]))
        out = str(tmp_path / modality / "train-%06d.tar")
        result = convert_llava(str(path), str(tmp_path), modality, out, name=f"my{modality}",
                               num_frames=4, frame_size=24, progress=False)
        [sample] = _samples(result["pattern"])
        assert sample["modality"] == f"my{modality}" and sample["instruction"] == "What is it?"
        if modality == "audio":
            assert sample["sample_rate"] == 16000 and sample["input"].shape == (8000,)
        else:
            assert sample["input"].shape == (4, 24, 32, 3)
            np.testing.assert_allclose(sample["input"].mean(axis=(1, 2, 3)), [0, 60, 130, 190],
                                       atol=6)


def test_strict_stops_at_the_first_bad_record(llava, tmp_path):
    with pytest.raises(MeraError) as e:
        _convert(llava, tmp_path / "a/train-%06d.tar", strict=True)
    assert str(e.value) == (f"{llava['json']}: record 2 (id 'missing'): "
                            f"{llava['root']}/img/none.jpg: no such file")
    # a record that passes the cheap checks but does not decode stops the run just as well,
    # also from a worker process
    records = json.load(open(llava["json"]))
    path = tmp_path / "decode.json"
    path.write_text(json.dumps([records[0], records[3]]))
    with pytest.raises(MeraError, match=r"record 1 \(id 'corrupt'\): .*corrupt.jpg: does not "
                                        r"decode as an image"):
        convert_llava(str(path), llava["root"], "image", str(tmp_path / "b/train-%06d.tar"),
                      strict=True, samples_per_shard=1, workers=2, progress=False)
    assert not os.path.exists(tmp_path / "b/train-000001.tar")


def test_rerun_resumes_and_never_rewrites_finished_shards(llava, tmp_path):
    out = tmp_path / "out/train-%06d.tar"
    first = _convert(llava, out, samples_per_shard=1)
    pattern, before, data = first["pattern"], _stats(first["pattern"]), _bytes(first["pattern"])
    assert first["kept_shards"] == 0 and first["shards"] == 5
    # the shard of the corrupt image (record 3) is written empty, so the numbering holds
    assert first["empty_shards"] == [f"{tmp_path}/out/train-000002.tar"]
    assert list(raw_samples(f"{tmp_path}/out/train-000002.tar")) == []

    again = _convert(llava, out, samples_per_shard=1)
    assert _stats(pattern) == before and again["kept_shards"] == 5
    assert {k: again[k] for k in first if k != "kept_shards"} == \
        {k: first[k] for k in first if k != "kept_shards"}  # the report, skips included

    # interrupted: one shard missing, the temporary of a killed writer left behind
    os.remove(f"{tmp_path}/out/train-000003.tar")
    stale = tmp_path / "out/.train-000003.tar.tmp-deadbeef"
    stale.write_bytes(b"half a shard")
    resumed = _convert(llava, out, samples_per_shard=1)
    assert resumed["kept_shards"] == 4 and not stale.exists()
    after = _stats(pattern)
    assert {u: s for u, s in after.items() if "000003" not in u} == \
        {u: s for u, s in before.items() if "000003" not in u}
    assert after[f"{tmp_path}/out/train-000003.tar"] != before[f"{tmp_path}/out/train-000003.tar"]
    assert _bytes(pattern) == data and resumed["samples"] == first["samples"]


def test_workers_write_the_same_bytes(llava, tmp_path):
    one = _convert(llava, tmp_path / "w1/train-%06d.tar", samples_per_shard=1, workers=1)
    two = _convert(llava, tmp_path / "w2/train-%06d.tar", samples_per_shard=1, workers=2)
    assert _bytes(one["pattern"]) == _bytes(two["pattern"]) and len(_bytes(one["pattern"])) == 5
    assert one["skipped_records"] == two["skipped_records"]


@pytest.mark.timeout(60)
def test_a_worker_that_dies_stops_the_run(llava, tmp_path, monkeypatch):
    """A decoder that crashes its process (a segfault, the OOM killer) must not hang the run."""
    monkeypatch.setattr("mera_ds.data.convert._input_member", lambda url, options: os._exit(1))
    with pytest.raises(RuntimeError, match="a worker process died writing it"):
        _convert(llava, tmp_path / "out/train-%06d.tar", workers=2)


def test_other_settings_never_mix_into_a_conversion(llava, tmp_path):
    out = tmp_path / "out/train-%06d.tar"
    _convert(llava, out)
    with pytest.raises(MeraError, match=r"holds a conversion with other settings "
                                        r"\(samples_per_shard 2, now 3\)"):
        _convert(llava, out, samples_per_shard=3)
    with pytest.raises(MeraError, match=r"\(name 'image', now 'photo'\)"):
        _convert(llava, out, name="photo")
    records = json.load(open(llava["json"]))
    with open(llava["json"], "w") as f:
        json.dump(records[:4], f)
    with pytest.raises(MeraError, match="input_sha256"):
        _convert(llava, out)
    # shards that no conversion wrote are not taken over either
    (tmp_path / "other").mkdir()
    (tmp_path / "other/train-000000.tar").write_bytes(b"")
    with pytest.raises(MeraError, match="not written by `mera shards convert`"):
        _convert(llava, tmp_path / "other/train-%06d.tar")
    # another template in the same directory is another conversion (train and eval side by side)
    assert _convert(llava, tmp_path / "out/eval-%06d.tar")["shards"] == 2


def test_out_needs_the_shard_number(llava, tmp_path):
    for out in ("out/train.tar", "out/%06d/train.tar", "out/train-%06d-%06d.tar"):
        with pytest.raises(MeraError, match="needs one %06d in the file name"):
            _convert(llava, tmp_path / out)


def test_nothing_to_convert_is_an_error_with_a_report(llava, tmp_path):
    records = json.load(open(llava["json"]))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records[2:6:3]))  # a missing file, a malformed conversation
    with pytest.raises(MeraError, match=r"bad.json: none of its 2 records can be converted "
                                        r"\(reasons in .*/out/train-report.json\)"):
        convert_llava(str(path), llava["root"], "image", str(tmp_path / "out/train-%06d.tar"),
                      progress=False)
    report = json.load(open(tmp_path / "out/train-report.json"))
    assert [s["index"] for s in report["skipped_records"]] == [0, 1] and report["shards"] == 0
    assert not (tmp_path / "out/train-convert.json").exists()  # nothing claimed: fix and re-run


def test_cli_convert(llava, tmp_path, capsys):
    out = f"{tmp_path}/out/train-%06d.tar"
    argv = ["shards", "convert", "--format", "llava", "--input", llava["json"], "--media-root",
            llava["root"], "--modality", "image", "--out", out, "--samples-per-shard", "2",
            "--workers", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "samples:  4 of 11 records, in 3 shards (0 already written)" in printed
    assert f"skipped:  7 records (all of them in {tmp_path}/out/train-report.json)" in printed
    assert "  record 2 (id 'missing'): " in printed
    assert printed.splitlines()[-1] == f"pattern:  {tmp_path}/out/train-{{000000..000002}}.tar"
    assert main(argv) == 0
    assert "(3 already written)" in capsys.readouterr().out

    assert main([*argv, "--strict", "--out", f"{tmp_path}/strict/train-%06d.tar"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # under the progress bar
    assert last == (f"mera: error: {llava['json']}: record 2 (id 'missing'): "
                    f"{llava['root']}/img/none.jpg: no such file")


def test_convert_on_s3(llava, s3_bucket, tmp_path):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(llava["root"], f"{s3_bucket}/media", recursive=True)
    fs.put(llava["json"], f"{s3_bucket}/llava.json")
    local = _convert(llava, tmp_path / "out/train-%06d.tar")
    remote = convert_llava(f"{s3_bucket}/llava.json", f"{s3_bucket}/media", "image",
                           f"{s3_bucket}/out/train-%06d.tar", samples_per_shard=2, workers=2,
                           progress=False)
    assert remote["pattern"] == f"{s3_bucket}/out/train-{{000000..000002}}.tar"
    assert [fs.cat(u) for u in expand_shards(remote["pattern"])] == _bytes(local["pattern"])
    assert [s["index"] for s in remote["skipped_records"]] == [2, 3, 4, 5, 8, 9, 10]
    again = convert_llava(f"{s3_bucket}/llava.json", f"{s3_bucket}/media", "image",
                          f"{s3_bucket}/out/train-%06d.tar", samples_per_shard=2, progress=False)
    assert again["kept_shards"] == 3
    # the media readers take s3:// URLs too
    _write_tone(tmp_path / "t.wav")
    _write_mp4(tmp_path / "v.mp4")
    fs.put([str(tmp_path / "t.wav"), str(tmp_path / "v.mp4")], f"{s3_bucket}/av/")
    assert media.read_audio(f"{s3_bucket}/av/t.wav", 16000).shape == (8000,)
    assert media.read_video(f"{s3_bucket}/av/v.mp4", 4, size=24).shape == (4, 24, 32, 3)
    assert media.read_image(f"{s3_bucket}/media/img/a.png").shape == (12, 16, 3)
    with pytest.raises(media.MediaError, match="av/none.mp4: no such file"):
        media.read_video(f"{s3_bucket}/av/none.mp4", 4)
