"""HF-layout safetensors checkpoints, local or s3://, read and written one tensor at a time.

An HF LLM directory holds `model.safetensors`, or shards `model-0000k-of-0000N.safetensors` named in
`model.safetensors.index.json`, next to config.json and the tokenizer files. A safetensors file is
an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data offsets) and the
raw tensor bytes, so one tensor, or any run of its elements, is one ranged read.

Reading: :class:`Checkpoint` parses the headers only; :meth:`Checkpoint.read` fetches a tensor or
a range of its elements with a positioned read (pread) into a fresh buffer, or a ranged GET on S3.
We do not use safetensors' mmap-based `safe_open`: every page it touches counts against the
process until the file is closed, so a merge over whole shards would show a resident size of the
shards; a positioned read costs the same one copy out of the page cache and keeps memory to what we
allocate.

Writing: the shards are planned up front from the tensors' sizes (:func:`plan_shards`), so each
shard's header is known before its first byte: :class:`ShardFileWriter` writes it and then streams
each tensor's bytes as they are produced (memory: one tensor, or one piece of one).
:class:`ShardedWriter` writes a whole directory tensor by tensor, with a plan (streaming) or
without one (buffering one shard, flushed by size). Whoever writes a directory writes
`model.safetensors.index.json` last (:func:`write_index`): on S3, where nothing can be renamed, a
directory without its index is an incomplete one. Local directories are committed by rename
(:func:`mera_ds.storage.committed_dir`).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from mera_ds import storage
from mera_ds.errors import MeraError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# safetensors dtype codes <-> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})

# A header larger than this is not a safetensors header (the format's own limit is 100 MB).
_MAX_HEADER = 100_000_000


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise MeraError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor is, without its data: enough to plan where it goes."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorSpec":
        return cls(name, dtype_code(tensor.dtype), tuple(tensor.shape))


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """A stored tensor: its spec and where its bytes are."""

    file: str = ""   # URL of the shard
    offset: int = 0  # absolute byte offset of the first element in the file


# --- reading -------------------------------------------------------------------------------------

class _LocalFile:
    """Positioned reads (pread), safe to share between threads."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)

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
        if n > _MAX_HEADER or 8 + n > size:
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
        elif storage.exists(single_url):
            weight_map, files = None, [SINGLE_FILE]
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

    def get(self, name: str) -> torch.Tensor:
        return self.read(name)

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


# --- writing -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its file name and the tensors it holds, in order."""

    filename: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def shard_name(k: int, n: int) -> str:
    """HF naming of shard k (1-based) of n."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[ShardPlan]:
    """Cut `specs`, in order, into shards of at most `max_shard_size` bytes of tensor data (a
    larger tensor gets a shard of its own), named as HF names them."""
    if max_shard_size <= 0:
        raise MeraError(f"shard size must be positive, got {max_shard_size}")
    groups: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not groups or (size + spec.nbytes > max_shard_size and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    return [ShardPlan(shard_name(k + 1, len(groups)), tuple(g)) for k, g in enumerate(groups)]


def _header_bytes(specs: Iterable[TensorSpec]) -> bytes:
    # transformers refuses safetensors files whose metadata lacks format=pt.
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad with spaces to 8-byte alignment, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach().contiguous().reshape(-1)
    if t.device.type != "cpu":
        t = t.cpu()
    return t.view(torch.uint8).numpy()


class ShardFileWriter:
    """Writes one planned shard: the header at once, then the tensors' bytes in plan order, each
    whole or in consecutive pieces (any flat run of elements)."""

    def __init__(self, dir_url: str, plan: ShardPlan):
        self.url = storage.join(dir_url, plan.filename)
        self.plan = plan
        self._i = 0      # index of the tensor being written
        self._done = 0   # bytes of it written so far
        self._f = storage.open_url(self.url, "wb")
        self._f.write(_header_bytes(plan.tensors))

    @property
    def expected(self) -> Optional[TensorSpec]:
        """The tensor whose bytes come next; None once the shard is complete."""
        tensors = self.plan.tensors
        i = self._i + (self._i < len(tensors) and self._done == tensors[self._i].nbytes)
        return tensors[i] if i < len(tensors) else None

    @property
    def complete(self) -> bool:
        return self.expected is None

    def write(self, name: str, data: torch.Tensor) -> None:
        tensors = self.plan.tensors
        if self._i < len(tensors) and self._done == tensors[self._i].nbytes:
            self._i, self._done = self._i + 1, 0
        spec = tensors[self._i] if self._i < len(tensors) else None
        if spec is None or spec.name != name:
            raise MeraError(f"{self.url}: got tensor {name}, the plan expects "
                            f"{spec.name if spec else 'nothing more'}")
        if data.dtype != spec.torch_dtype:
            raise MeraError(f"{self.url}: tensor {name} is {data.dtype}, planned "
                            f"{spec.torch_dtype}")
        raw = _as_bytes(data)
        if self._done + raw.nbytes > spec.nbytes:
            raise MeraError(f"{self.url}: tensor {name}: more than its {spec.nbytes} bytes")
        self._f.write(raw)
        self._done += raw.nbytes

    def close(self) -> None:
        missing = self.expected
        self._f.close()
        if missing is not None:
            raise MeraError(f"{self.url}: closed before all planned tensors were written "
                            f"(next: {missing.name})")

    def abort(self) -> None:
        self._f.close()


def write_index(dir_url: str, weight_map: dict[str, str], total_size: int,
                metadata: Optional[dict] = None) -> None:
    """Write model.safetensors.index.json: last, since it is what makes a directory complete."""
    storage.write_json(storage.join(dir_url, INDEX_FILE),
                       {"metadata": {"total_size": total_size, **(metadata or {})},
                        "weight_map": dict(sorted(weight_map.items()))})


def index_of(plans: Sequence[ShardPlan]) -> tuple[dict[str, str], int]:
    """(weight_map, total_size) of planned shards."""
    weight_map = {t.name: p.filename for p in plans for t in p.tensors}
    return weight_map, sum(p.nbytes for p in plans)


class ShardedWriter:
    """Writes an HF-layout directory of safetensors shards, one tensor at a time.

    With `plan` (the specs of every tensor, in the order they will be added), shards are planned
    up front and each tensor is streamed to its shard as it is added: memory is one tensor.
    Without one, tensors are held until a shard reaches `max_shard_size` and then written under a
    provisional name, renamed to HF's `model-0000k-of-0000N` at close, when N is known.
    `metadata` goes into the index. `close()` writes the index; leaving a `with` block on an
    exception writes none.
    """

    def __init__(self, out_dir: str, max_shard_size: int | str = "2GB",
                 plan: Optional[Sequence[TensorSpec]] = None, metadata: Optional[dict] = None):
        from mera_ds.config import parse_size

        self.out_dir = out_dir.rstrip("/")
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = metadata
        self.plans = plan_shards(plan, self.max_shard_size) if plan is not None else None
        self._shard = 0
        self._writer: Optional[ShardFileWriter] = None
        self._buffer: list[tuple[str, torch.Tensor]] = []
        self._buffered = 0
        self._written: list[tuple[str, list[TensorSpec]]] = []  # unplanned: (provisional, specs)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.plans is not None:
            self._add_planned(name, tensor)
            return
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered + nbytes > self.max_shard_size:
            self._flush()
        self._buffer.append((name, tensor.detach().cpu()))
        self._buffered += nbytes

    def _add_planned(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is not None and self._writer.complete:
            self._writer.close()
            self._writer, self._shard = None, self._shard + 1
        if self._writer is None:
            if self._shard >= len(self.plans):
                raise MeraError(f"{self.out_dir}: tensor {name} is not in the plan")
            self._writer = ShardFileWriter(self.out_dir, self.plans[self._shard])
        spec = self._writer.expected
        if spec.name == name and tuple(tensor.shape) != spec.shape:
            raise MeraError(f"{self.out_dir}: tensor {name} has shape {list(tensor.shape)}, "
                            f"planned {list(spec.shape)}")
        self._writer.write(name, tensor)

    def _flush(self) -> None:
        if not self._buffer:
            return
        specs = [TensorSpec.of(n, t) for n, t in self._buffer]
        provisional = f"model-{len(self._written) + 1:05d}.safetensors.part"
        writer = ShardFileWriter(self.out_dir, ShardPlan(provisional, tuple(specs)))
        for n, t in self._buffer:
            writer.write(n, t)
        writer.close()
        self._written.append((provisional, specs))
        self._buffer, self._buffered = [], 0

    def close(self) -> dict[str, str]:
        """Finish the last shard and write the index; returns the weight map."""
        if self.plans is not None:
            if self._writer is not None and self._writer.complete:
                self._writer.close()
                self._writer, self._shard = None, self._shard + 1
            if self._shard < len(self.plans):
                spec = self._writer.expected if self._writer else self.plans[self._shard].tensors[0]
                if self._writer is not None:
                    self._writer.abort()
                raise MeraError(f"{self.out_dir}: closed before all planned tensors were "
                                f"written (next: {spec.name})")
            weight_map, total = index_of(self.plans)
        else:
            self._flush()
            n = len(self._written)
            fs, base = storage.url_to_fs(self.out_dir)
            plans = []
            for k, (provisional, specs) in enumerate(self._written):
                final = shard_name(k + 1, n)
                fs.mv(f"{base}/{provisional}", f"{base}/{final}")
                plans.append(ShardPlan(final, tuple(specs)))
            weight_map, total = index_of(plans)
        write_index(self.out_dir, weight_map, total, self.metadata)
        return weight_map


# Files of an HF directory that are weights (written by the writer), not to be copied along.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                    ".safetensors.index.json", ".bin.index.json", ".part")


def copy_aux_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy config.json, generation_config.json, the tokenizer files and every other top-level
    non-weight file of `src_dir` into `dst_dir`; returns their names."""
    src_fs, src_path = storage.url_to_fs(src_dir)
    copied = []
    for entry in src_fs.ls(src_path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "file" or name.endswith(_WEIGHT_SUFFIXES) or name.startswith("."):
            continue
        src, dst = storage.join(src_dir, name), storage.join(dst_dir, name)
        if not storage.is_remote(src) and not storage.is_remote(dst):
            shutil.copyfile(src.removeprefix("file://"), dst.removeprefix("file://"))
        else:
            with storage.open_url(src, "rb") as fi, storage.open_url(dst, "wb") as fo:
                shutil.copyfileobj(fi, fo, 16 << 20)
        copied.append(name)
    return copied
