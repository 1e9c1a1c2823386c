"""Local paths and s3:// URLs through fsspec, and committing artifacts so nobody reads half of one.

Local outputs are written under a temporary sibling name and committed by one rename. S3 has no
rename: an artifact there is written in place, and what marks it complete is written last (the
index of an HF directory, or the run manifest's entry), so readers must go by that.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from typing import Any, Iterator, Optional

import fsspec

from mera_ds.errors import MeraError


# Transient S3 failures (5xx, throttling, connection resets and refusals, timeouts) are retried by
# botocore's "standard" mode with exponential backoff, at most 6 attempts per request, each
# waiting at most read_timeout for a byte; permission and not-found errors are never retried.
# Settings of the user's own fsspec config (FSSPEC_S3_CONFIG_KWARGS...) win.
S3_CONFIG = {"retries": {"mode": "standard", "total_max_attempts": 6}, "connect_timeout": 5,
             "read_timeout": 20}


def url_to_fs(url: str):
    """(filesystem, path inside it). s3:// options (endpoint, keys) come from the usual env vars
    (AWS_*, FSSPEC_S3_*), so the same URL works on a laptop, a cluster and in the tests."""
    options = {}
    if url.startswith("s3://"):
        options["config_kwargs"] = {**S3_CONFIG,
                                    **fsspec.config.conf.get("s3", {}).get("config_kwargs", {})}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise MeraError(f"{url}: cannot open this URL ({e})") from None


# Failing to reach a server at all (refused, reset, timed out), by class name: aiohttp, botocore
# and the standard library each have their own, and this module imports none of them.
_UNREACHABLE = {"ClientConnectorError", "ClientOSError", "ServerDisconnectedError",
                "ServerTimeoutError", "EndpointConnectionError", "ConnectTimeoutError",
                "ReadTimeoutError", "ConnectionClosedError", "FSTimeoutError", "TimeoutError",
                "ConnectionError"}


def access_error(url: str, e: BaseException) -> Optional[MeraError]:
    """The one-line error for failing to reach or access `url` (no such bucket, access denied,
    no credentials, server unreachable); None for other errors. None of these is a
    problem of the data: a reader never takes them for a corrupt file."""
    if isinstance(e, MeraError):
        return e
    names = {c.__name__ for c in type(e).__mro__}
    text = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return MeraError(f"{url}: no S3 credentials ({text}); set AWS_PROFILE or "
                         f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or use an instance role")
    if isinstance(e, PermissionError):
        return MeraError(f"{url}: access denied ({text})")
    if isinstance(e, FileNotFoundError):  # a missing file is its caller's to name
        return MeraError(f"{url}: no such bucket ({text})") if "bucket" in text.lower() else None
    if names & _UNREACHABLE:
        return MeraError(f"{url}: cannot reach {_server(url)} ({type(e).__name__}: {text})")
    return None


def _server(url: str) -> str:
    if url.startswith("s3://"):
        endpoint = (fsspec.config.conf.get("s3", {}).get("endpoint_url")
                    or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        return f"S3 at {endpoint}" if endpoint else "S3"
    return url.split("/", 3)[2] if "://" in url else url


@contextlib.contextmanager
def accessing(url: str) -> Iterator[None]:
    """Raise :func:`access_error`'s one line for errors of reaching `url` inside the block."""
    try:
        yield
    except Exception as e:
        err = access_error(url, e)
        if err is None or err is e:
            raise
        raise err from e


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    with accessing(url):
        return fs.exists(path)


def remove(url: str) -> bool:
    """Remove a file or directory tree, local or s3://, if it is there; whether it was."""
    fs, path = url_to_fs(url)
    with accessing(url):
        if not fs.exists(path):
            return False
        fs.rm(path, recursive=True)
    return True


def open_url(url: str, mode: str = "rb"):
    fs, path = url_to_fs(url)
    if "w" in mode and not is_remote(url):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with accessing(url):
        return fs.open(path, mode)


def read_json(url: str) -> Any:
    try:
        with open_url(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise MeraError(f"{url}: no such file") from None
    except json.JSONDecodeError as e:
        raise MeraError(f"{url}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise MeraError(f"{url}: not valid JSON (not UTF-8 text)") from None


def write_json(url: str, obj: Any) -> None:
    """Replace a small JSON file at once: a reader sees the old or the new one, never a part."""
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_bytes(url: str, data: bytes) -> None:
    """Write a file whole: locally under a temporary name, then renamed into place."""
    if is_remote(url):
        fs, path = url_to_fs(url)
        with accessing(url):
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


# Errors of the device written to, not of what is being written: named as such, with the artifact.
_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large for the file system", errno.EROFS: "read-only file system"}


@contextlib.contextmanager
def committed_dir(url: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a directory URL to write an artifact into; it appears at `url` only on success.

    An existing artifact is never replaced unless `overwrite` is given: a step re-run by mistake
    must not destroy the earlier one; with it, the new artifact is whole before the old one goes.
    Temporaries that a killed writer of the same artifact left behind (a full model each) are
    removed first: one writer per artifact at a time is the executors' rule.
    """
    fs, path = url_to_fs(url)
    if not is_remote(url):
        _check_parents(path)
    if fs.exists(path) and not overwrite:
        raise MeraError(f"{url}: already exists; refusing to overwrite it")
    remove_stale_temporaries(url)
    if is_remote(url) and not fs.exists(path):
        # S3 cannot rename: written in place, and complete once its index (written last) is.
        with _device_errors(url):
            yield url
        return
    tmp = _temporary(url)
    fs.makedirs(_fs_path(tmp), exist_ok=True)
    try:
        with _device_errors(url):
            yield tmp
        _replace(fs, _fs_path(tmp), path, is_remote(url))
    except BaseException:
        if fs.exists(_fs_path(tmp)):
            fs.rm(_fs_path(tmp), recursive=True)
        raise


def _check_parents(path: str) -> None:
    """A local output under an existing file: say so, rather than fail in makedirs."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise MeraError(f"{parent}: is a file, not a directory (on the way to {path})")


def _temporary(url: str) -> str:
    head, _, name = url.rstrip("/").rpartition("/")
    return f"{head}/.{name}.tmp-{uuid.uuid4().hex[:8]}"


def _fs_path(url: str) -> str:
    return url_to_fs(url)[1]


def remove_stale_temporaries(url: str) -> list[str]:
    """Remove the temporaries (`.NAME.tmp-*`) that killed writers of `url` left; returns them."""
    fs, path = url_to_fs(url)
    head, _, name = path.rstrip("/").rpartition("/")
    stale = fs.glob(f"{head}/.{name}.tmp-*") if fs.exists(head) else []
    for p in stale:
        fs.rm(p, recursive=True)
    return stale


def _replace(fs, tmp: str, path: str, remote: bool) -> None:
    """Put the whole artifact at `tmp` in the place of `path`, removing what was there only
    after the new one is complete."""
    if not remote:
        if os.path.exists(path):
            old = f"{tmp}.old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        return
    # S3 cannot rename. The old index goes first (the old artifact then reads as incomplete),
    # the new files are copied with their index last, then the old files not among them go.
    _rm_files(fs, [p for p in fs.find(path) if p.endswith(".index.json")])
    new = sorted(fs.find(tmp), key=lambda p: (p.endswith(".index.json"), p))
    for p in new:
        fs.copy(p, path + p[len(tmp):])
    kept = {path + p[len(tmp):] for p in new}
    _rm_files(fs, [p for p in fs.find(path) if p not in kept])
    fs.rm(tmp, recursive=True)


def _rm_files(fs, paths: list[str]) -> None:
    if paths:  # s3fs takes an empty list for a missing path
        fs.rm(paths)


@contextlib.contextmanager
def _device_errors(url: str) -> Iterator[None]:
    """A full disk (or quota, or read-only mount) while writing `url`: one line naming it."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL:
            raise
        raise MeraError(f"{url}: {_FULL[e.errno]} while writing it") from e
