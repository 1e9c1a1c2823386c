"""The node cache: a model directory on S3 copied once per node into a local directory that all
the ranks and tasks on the node read (from_pretrained reads local files only). Without it every
rank downloads the whole LLM: 8 x 16 GB for an 8B model on one node.

An entry is named by the directory's URL and its files' sizes and ETags, so an artifact rewritten
at the same URL is fetched again. The first process on a node fetches it under the entry's fetch
lock (the others wait, then reuse it) into a temporary sibling, renamed into place once every file is
there: an entry that exists is complete. A remote directory is fetched only when complete itself,
its safetensors index there and every file the index names with it (the writers put the index
last). While a process reads an entry it holds a shared lock on it; the least recently used
entries beyond KEEP are removed by whoever fetches next, unless a reader holds them.

The cache lives in MERA_CACHE_DIR, by default under TMPDIR (node-local on clusters, where the
home directory is usually shared over the network and too small for LLMs).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Iterator

from mera_ds.errors import MeraError
from mera_ds.storage import accessing, is_remote, url_to_fs

log = logging.getLogger("mera_ds.model")

KEEP = 2  # entries kept besides those in use: a stage's LLM and the one before it


def cache_dir() -> str:
    return os.environ.get("MERA_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                            f"mera-cache-{os.getuid()}")


def check_model_dir(path: str) -> None:
    """A one-line MeraError unless `path` is a model directory: a local directory, a complete
    one on S3, or a hub id ("org/name", left to the hub)."""
    if is_remote(path):
        _complete_listing(path)
    else:
        _local_dir(path)


def is_local_path(path: str) -> bool:
    """A path on this machine's disk (absolute, relative with ./ or ../, or file://), not a hub
    id ("org/name") or a remote URL."""
    return path.startswith("file://") or (not is_remote(path) and path.startswith(("/", ".")))


def _local_dir(path: str) -> str:
    local = path.removeprefix("file://")
    if is_local_path(path) and not os.path.isdir(local):
        raise MeraError(f"{path}: no such model directory")
    return local


@contextlib.contextmanager
def local_model(path: str) -> Iterator[str]:
    """A local directory holding the model directory at `path` while the block runs: `path`
    itself if it is local, else its node-cache entry (fetched first if needed)."""
    if not is_remote(path):
        yield _local_dir(path)
        return
    files = _complete_listing(path)
    root = os.path.join(cache_dir(), "models")
    os.makedirs(root, exist_ok=True)
    entry = os.path.join(root, _key(path, files))
    # Two locks: readers share `.lock` for as long as they read (an evicting fetcher skips an
    # entry held so); `.fetch` lets one process fetch while the others wait. A reader never waits
    # for an exclusive lock on `.lock`: its ranks may be in a collective while holding it shared.
    with open(entry + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        if not os.path.isdir(entry):
            with open(entry + ".fetch", "a") as fetching:
                fcntl.flock(fetching, fcntl.LOCK_EX)
                if not os.path.isdir(entry):
                    _fetch(path, files, entry)
                    _evict(root, keep=entry)
        os.utime(entry)
        yield entry


def _complete_listing(url: str) -> dict[str, dict]:
    """{relative name: info} of the files of the directory at `url`, if it is a complete model
    directory; else a one-line MeraError."""
    fs, path = url_to_fs(url)
    path = path.rstrip("/")
    with accessing(url):
        found = fs.find(path, detail=True)
    files = {p[len(path) + 1:]: info for p, info in found.items()}
    if "config.json" not in files:
        raise MeraError(f"{url}: no config.json; not a model directory")
    for name in (n for n in files if n.endswith(".index.json")):
        with accessing(url), fs.open(f"{path}/{name}", "r") as f:
            named = set(json.load(f).get("weight_map", {}).values())
        missing = sorted(n for n in named if n not in files)
        if missing:
            raise MeraError(f"{url}: {name} names {missing[0]}, which is not there "
                            f"(the directory is incomplete)")
    if not any(n.endswith(".index.json") for n in files) and any(
            "-of-" in n and n.endswith(".safetensors") for n in files):
        raise MeraError(f"{url}: safetensors shards but no index; the directory is incomplete "
                        f"(still being written?)")
    return files


def _key(url: str, files: dict[str, dict]) -> str:
    versions = sorted((n, i.get("size"), str(i.get("ETag") or i.get("mtime") or ""))
                      for n, i in files.items())
    return hashlib.sha256(json.dumps([url.rstrip("/"), versions]).encode()).hexdigest()[:20]


def _fetch(url: str, files: dict[str, dict], entry: str) -> None:
    fs, path = url_to_fs(url)
    path = path.rstrip("/")
    for stale in (n for n in os.listdir(os.path.dirname(entry))
                  if n.startswith(os.path.basename(entry) + ".tmp-")):
        shutil.rmtree(os.path.join(os.path.dirname(entry), stale), ignore_errors=True)
    tmp = f"{entry}.tmp-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    try:
        for name in files:
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with accessing(url):
                fs.get_file(f"{path}/{name}", os.path.join(tmp, name))
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(int(i.get("size") or 0) for i in files.values())
    log.info("node cache: fetched %s (%d files, %.1f MB) in %.1f s into %s", url, len(files),
             size / 1e6, time.time() - t0, entry)


def _evict(root: str, keep: str) -> None:
    """Remove the least recently used entries beyond KEEP, skipping any a process reads."""
    entries = sorted((os.path.join(root, n) for n in os.listdir(root)
                      if os.path.isdir(os.path.join(root, n)) and ".tmp-" not in n),
                     key=os.path.getmtime, reverse=True)
    for old in [e for e in entries if e != keep][KEEP:]:
        with open(old + ".lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # in use
            shutil.rmtree(old, ignore_errors=True)
            log.info("node cache: removed %s", old)
