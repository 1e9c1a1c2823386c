"""Reading HF-layout safetensors directories, local or s3://, one tensor (or run of elements) at a
time.

:class:`Checkpoint` parses the headers only; :meth:`Checkpoint.read` fetches a tensor or a range of
its elements with a positioned read (pread) into a fresh buffer, or a ranged GET on S3. We do not
use safetensors' mmap-based `safe_open`: every page it touches counts against the process until the
file is closed, so a merge over whole shards would show a resident size of the shards; a positioned
read costs the same one copy out of the page cache and keeps memory to what we allocate.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any, Optional

import numpy as np
import torch

from mera_ds import storage
from mera_ds.errors import MeraError
from mera_ds.io.format import (MAX_HEADER, CONFIG_FILE, DTYPES, INDEX_FILE, SINGLE_FILE,
                               TensorInfo)

class _LocalFile:
    """Positioned reads (pread), safe to share between threads."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        # Read front to back: the kernel may read ahead twice as far.
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_into(self, buf: np.ndarray, offset: int) -> int:
        view, done = memoryview(buf).cast("B"), 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def prefetch(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading these bytes into the page cache, without waiting."""
        os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        os.close(self.fd)


class _RemoteFile:
    """Ranged GETs through fsspec: one tensor's bytes, never the whole shard."""

    def __init__(self, url: str):
        self.fs, self.path = storage.url_to_fs(url)

    def size(self) -> int:
        return self.fs.size(self.path)

    def read_into(self, buf: np.ndarray, offset: int) -> int:
        data = self.fs.cat_file(self.path, start=offset, end=offset + buf.nbytes)
        view = memoryview(buf).cast("B")
        view[:len(data)] = data
        return len(data)

    def prefetch(self, offset: int, nbytes: int) -> None:
        pass  # a ranged GET has no page cache to warm

    def close(self) -> None:
        pass


def _open_file(url: str):
    try:
        if storage.is_remote(url):
            return _RemoteFile(url)
        return _LocalFile(url.removeprefix("file://"))
    except FileNotFoundError:
        raise MeraError(f"{url}: no such file") from None


def _read_exact(f, url: str, offset: int, nbytes: int, what: str,
                buf: Optional[np.ndarray] = None) -> np.ndarray:
    buf = np.empty(nbytes, dtype=np.uint8) if buf is None else buf[:nbytes]
    if nbytes and f.read_into(buf, offset) != nbytes:
        raise MeraError(f"{url}: truncated: {what} needs bytes {offset}..{offset + nbytes}, "
                        f"the file has {f.size()}")
    return buf


def read_header(url: str) -> tuple[list[TensorInfo], dict]:
    """The tensors of one safetensors file, in the order of their bytes, and its metadata."""
    f = _open_file(url)
    try:
        size = f.size()
        if size < 8:
            raise MeraError(f"{url}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", _read_exact(f, url, 0, 8, "the header length").tobytes())
        if n > MAX_HEADER or 8 + n > size:
            raise MeraError(f"{url}: not a safetensors file (header length {n}, file {size} B)")
        raw = _read_exact(f, url, 8, n, "the header").tobytes()
    finally:
        f.close()
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MeraError(f"{url}: not a safetensors file (header is not JSON: {e})") from None
    metadata = header.pop("__metadata__", None) or {}
    infos = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), \
                entry["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise MeraError(f"{url}: tensor {name}: malformed header entry {entry!r}") from None
        if dtype not in DTYPES:
            raise MeraError(f"{url}: tensor {name}: unsupported dtype {dtype}")
        info = TensorInfo(name, dtype, shape, file=url, offset=8 + n + begin)
        if end - begin != info.nbytes:
            raise MeraError(f"{url}: tensor {name}: {end - begin} bytes stored for "
                            f"{dtype}{list(shape)}, which needs {info.nbytes}")
        infos.append(info)
    infos.sort(key=lambda i: i.offset)
    return infos, metadata


class Checkpoint:
    """Lazy tensor index over an HF-layout directory of safetensors (local path or s3:// URL).

    Only headers are read on open; tensors are read on demand. Picklable (open files are not
    carried along), so a plan holding checkpoints can be sent to pool workers or Ray tasks.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        index_url = storage.join(self.url, INDEX_FILE)
        single_url = storage.join(self.url, SINGLE_FILE)
        if storage.exists(index_url):
            index = storage.read_json(index_url)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise MeraError(f"{index_url}: no weight_map in the index")
            files = sorted(set(weight_map.values()))
            for name in files:  # a file of this directory, never one reached through it
                if not isinstance(name, str) or "/" in name or "\\" in name or \
                        name in ("", ".", ".."):
                    raise MeraError(f"{index_url}: weight_map names {name!r}, not a file of "
                                    f"this directory")
        elif storage.exists(single_url):
            weight_map, files = None, [SINGLE_FILE]
        elif not storage.exists(self.url):
            raise MeraError(f"{self.url}: no such directory")
        else:
            raise MeraError(f"{self.url}: not an HF safetensors directory (no {SINGLE_FILE} "
                            f"or {INDEX_FILE})")
        self.infos: dict[str, TensorInfo] = {}
        for name in files:
            file_url = storage.join(self.url, name)
            if not storage.exists(file_url):
                raise MeraError(f"{file_url}: listed in {INDEX_FILE} but missing")
            for info in read_header(file_url)[0]:
                if info.name in self.infos:
                    raise MeraError(f"{file_url}: tensor {info.name} is also in "
                                    f"{self.infos[info.name].file}")
                self.infos[info.name] = info
        if weight_map is not None:
            for name, file in weight_map.items():
                info = self.infos.get(name)
                if info is None or not info.file.endswith("/" + file):
                    raise MeraError(f"{storage.join(self.url, file)}: has no tensor {name}, "
                                    f"which {INDEX_FILE} places there")
        self._files: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """Tensor names in storage order (by shard, then by offset)."""
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise MeraError(f"{self.url}: no tensor {name}") from None

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def config(self) -> Optional[dict]:
        url = storage.join(self.url, CONFIG_FILE)
        return storage.read_json(url) if storage.exists(url) else None

    def _file(self, url: str):
        with self._lock:
            f = self._files.get(url)
            if f is None:
                f = self._files[url] = _open_file(url)
            return f

    def read(self, name: str, start: int = 0, count: Optional[int] = None,
             buf: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements [start, start + count) of tensor `name`, flattened, in its stored dtype;
        the whole tensor, in its shape, when no range is given. `buf`: a uint8 tensor of at
        least that many bytes to read into (reusing buffers saves the page faults of new ones);
        the result is a view of it."""
        info = self.info(name)
        whole = start == 0 and count is None
        count = info.numel - start if count is None else count
        if start < 0 or count < 0 or start + count > info.numel:
            raise ValueError(f"{name}: elements {start}..{start + count} of {info.numel}")
        nbytes = count * info.itemsize
        if buf is not None and buf.numel() < nbytes:
            raise ValueError(f"{name}: a buffer of {buf.numel()} bytes for {nbytes}")
        raw = _read_exact(self._file(info.file), info.file, info.offset + start * info.itemsize,
                          nbytes, f"tensor {name}", None if buf is None else buf.numpy())
        flat = torch.from_numpy(raw).view(info.torch_dtype)
        return flat.view(info.shape) if whole else flat

    def prefetch(self, name: str, start: int, count: int) -> None:
        """Hint that elements [start, start + count) of tensor `name` will be read soon: a local
        file's bytes are read into the page cache in the background, so that reading overlaps
        merging even with one thread."""
        info = self.info(name)
        self._file(info.file).prefetch(info.offset + start * info.itemsize,
                                       count * info.itemsize)

    def get(self, name: str) -> torch.Tensor:
        return self.read(name)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
