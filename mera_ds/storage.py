"""Local paths and s3:// URLs through fsspec, and committing artifacts so nobody reads half of one.

Local outputs are written under a temporary sibling name and committed by one rename. S3 has no
rename: an artifact there is written in place, and what marks it complete is written last (the
index of an HF directory, or the run manifest's entry), so readers must go by that.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator

import fsspec

from mera_ds.errors import MeraError


def url_to_fs(url: str):
    """(filesystem, path inside it). s3:// options (endpoint, keys) come from the usual env vars
    (AWS_*, FSSPEC_S3_*), so the same URL works on a laptop, a cluster and in the tests."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise MeraError(f"{url}: cannot open this URL ({e})") from None


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def open_url(url: str, mode: str = "rb"):
    fs, path = url_to_fs(url)
    if "w" in mode and not is_remote(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return fs.open(path, mode)


def read_json(url: str) -> Any:
    try:
        with open_url(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MeraError(f"{url}: no such file") from None
    except json.JSONDecodeError as e:
        raise MeraError(f"{url}: not valid JSON ({e.msg}, line {e.lineno})") from None


def write_json(url: str, obj: Any) -> None:
    """Replace a small JSON file at once: a reader sees the old or the new one, never a part."""
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_bytes(url: str, data: bytes) -> None:
    """Write a file whole: locally under a temporary name, then renamed into place."""
    if is_remote(url):
        fs, path = url_to_fs(url)
        fs.pipe_file(path, data)  # one PUT: S3 objects appear whole
        return
    path = url.removeprefix("file://")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def committed_dir(url: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a directory URL to write an artifact into; it appears at `url` only on success.

    An existing artifact is never replaced unless `overwrite` is given: a step re-run by mistake
    must not destroy the earlier one.
    """
    fs, path = url_to_fs(url)
    if fs.exists(path) and not overwrite:
        raise MeraError(f"{url}: already exists; refusing to overwrite it")
    if is_remote(url):
        if fs.exists(path):
            fs.rm(path, recursive=True)
        yield url
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(path):  # overwrite: swap the old one out only after the new is whole
            old = f"{tmp}.old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
