"""Committing artifacts (mera_ds.storage.committed_dir), local and on S3: what a killed writer
leaves is removed by the next one, an overwrite never loses both copies, a full disk is one line,
and errors of reaching storage are never taken for bad data."""
import os
import subprocess
import uuid

import pytest

from mera_ds import storage
from mera_ds.errors import MeraError


def write_artifact(url, files, overwrite=False):
    with storage.committed_dir(url, overwrite=overwrite) as tmp:
        for name, data in files.items():
            storage.write_bytes(storage.join(tmp, name), data)


def listing(url):
    fs, path = storage.url_to_fs(url)
    return sorted(p[len(path.rstrip("/")) + 1:] for p in fs.find(path))


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket")


def test_stale_temporaries_of_killed_writers_are_removed(root):
    out = storage.join(root, "stage", "llm")
    fs, _ = storage.url_to_fs(out)
    stale = storage.join(root, "stage", ".llm.tmp-dead0001")
    storage.write_bytes(storage.join(stale, "model-00001-of-00002.safetensors"), b"x" * 100)
    other = storage.join(root, "stage", ".connector.tmp-dead0002")  # another artifact's: kept
    storage.write_bytes(storage.join(other, "a"), b"y")
    write_artifact(out, {"model.safetensors.index.json": b"{}"})
    assert not fs.exists(storage.url_to_fs(stale)[1])
    assert fs.exists(storage.url_to_fs(other)[1])
    assert listing(out) == ["model.safetensors.index.json"]


def test_overwrite_replaces_whole_and_keeps_the_old_until_the_new_is_complete(root):
    out = storage.join(root, "merged")
    write_artifact(out, {"a.safetensors": b"old-a", "b.safetensors": b"old-b",
                         "model.safetensors.index.json": b"old"})
    with pytest.raises(RuntimeError):  # a writer failing half-way through the new artifact
        with storage.committed_dir(out, overwrite=True) as tmp:
            storage.write_bytes(storage.join(tmp, "a.safetensors"), b"new-a")
            raise RuntimeError("killed")
    assert listing(out) == ["a.safetensors", "b.safetensors", "model.safetensors.index.json"]
    with storage.open_url(storage.join(out, "a.safetensors")) as f:
        assert f.read() == b"old-a"
    write_artifact(out, {"a.safetensors": b"new-a", "model.safetensors.index.json": b"new"},
                   overwrite=True)
    assert listing(out) == ["a.safetensors", "model.safetensors.index.json"]
    with storage.open_url(storage.join(out, "model.safetensors.index.json")) as f:
        assert f.read() == b"new"
    parent = storage.url_to_fs(root)[0].ls(storage.url_to_fs(root)[1], detail=False)
    assert [p for p in parent if ".tmp-" in p] == []


def test_existing_artifact_is_kept_without_overwrite(root):
    out = storage.join(root, "x")
    write_artifact(out, {"f": b"1"})
    with pytest.raises(MeraError, match="x: already exists; refusing to overwrite it"):
        write_artifact(out, {"f": b"2"})


def test_output_under_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MeraError, match=r"file: is a file, not a directory"):
        write_artifact(str(tmp_path / "file" / "deeper" / "out"), {"f": b"1"})


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A tmpfs of 64 KiB stands for a full disk."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(MeraError, match=r"small/out: no space left on the device while "
                                            r"writing it"):
            write_artifact(str(mnt / "out"), {"big": os.urandom(256 << 10)})
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_access_errors_are_named_and_not_data_errors(s3_endpoint, tmp_path):
    from mera_ds.data.tar import CorruptDataError, raw_samples

    missing = f"s3://no-bucket-{uuid.uuid4().hex[:8]}/train-000000.tar"
    with pytest.raises(MeraError, match=f"{missing}: no such bucket") as e:
        list(raw_samples(missing))
    assert not isinstance(e.value, CorruptDataError)
    denied = tmp_path / "denied.tar"
    denied.write_bytes(b"\0" * 1024)
    err = storage.access_error(str(denied), PermissionError(13, "Permission denied"))
    assert "denied.tar: access denied" in str(err)


def test_overwrite_of_an_artifact_without_index(root):
    """What a killed in-place S3 writer leaves (shards, no index) is replaced whole."""
    out = storage.join(root, "partial")
    storage.write_bytes(storage.join(out, "model-00001-of-00002.safetensors"), b"half")
    write_artifact(out, {"model-00001-of-00001.safetensors": b"new",
                         "model.safetensors.index.json": b"{}"}, overwrite=True)
    assert listing(out) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
