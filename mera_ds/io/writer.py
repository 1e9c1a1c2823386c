"""Writing HF-layout safetensors directories, local or s3://, one tensor at a time.

The shards are planned up front from the tensors' sizes (:func:`plan_shards`), so each shard's
header is known before its first byte: :class:`ShardFileWriter` writes it and then streams each
tensor's bytes as they are produced (memory: one tensor, or one piece of one), and
:class:`ShardPieceWriter` takes the pieces of its tensors from several threads in any order
(each piece's place in the file is known from the plan).
:class:`ShardedWriter` writes a whole directory tensor by tensor, with a plan (streaming) or without one (buffering one
shard, flushed by size). Whoever writes a directory writes `model.safetensors.index.json` last
(:func:`write_index`): on S3, where nothing can be renamed, a directory without its index is an
incomplete one. Local directories are committed by rename (:func:`mera_ds.storage.committed_dir`).
"""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from mera_ds import storage
from mera_ds.errors import MeraError
from mera_ds.io.format import INDEX_FILE, TensorSpec, header_bytes

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
        self._f.write(header_bytes(plan.tensors))

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


def _pwrite_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class ShardPieceWriter:
    """Writes one planned shard from several threads: the header at once, then any piece (a
    flat run of elements) of any of its tensors, each at its place in the file. A local file takes
    positioned writes (pwrite) in any order; a remote one (S3) is one stream, so a piece waits
    until every byte before it is written (its writers must take pieces in file order)."""

    def __init__(self, dir_url: str, plan: ShardPlan):
        self.url = storage.join(dir_url, plan.filename)
        header = header_bytes(plan.tensors)
        self._specs = {t.name: t for t in plan.tensors}
        self._starts, pos = {}, len(header)
        for spec in plan.tensors:
            self._starts[spec.name] = pos
            pos += spec.nbytes
        self._size, self._written = pos, len(header)
        self._cond = threading.Condition()
        self._cancelled = self._closed = False
        if storage.is_remote(self.url):
            self._fd, self._f = None, storage.open_url(self.url, "wb")
            self._f.write(header)
        else:
            self._fd = os.open(self.url.removeprefix("file://"),
                               os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            _pwrite_all(self._fd, header, 0)

    def write(self, name: str, start: int, data: torch.Tensor) -> bool:
        """Write `data` as elements [start, start + numel) of tensor `name`; True once every
        planned byte of the shard is written."""
        spec = self._specs.get(name)
        if spec is None:
            raise MeraError(f"{self.url}: got tensor {name}, which the plan puts elsewhere")
        if data.dtype != spec.torch_dtype:
            raise MeraError(f"{self.url}: tensor {name} is {data.dtype}, planned "
                            f"{spec.torch_dtype}")
        raw = _as_bytes(data)
        if start < 0 or (start + data.numel()) * spec.itemsize > spec.nbytes:
            raise MeraError(f"{self.url}: tensor {name}: more than its {spec.nbytes} bytes")
        pos = self._starts[name] + start * spec.itemsize
        if self._cancelled:
            raise MeraError(f"{self.url}: cancelled")
        if self._fd is not None:
            _pwrite_all(self._fd, raw, pos)
        with self._cond:
            if self._fd is None:
                self._cond.wait_for(lambda: self._written == pos or self._cancelled)
                if self._cancelled:
                    raise MeraError(f"{self.url}: cancelled")
                self._f.write(raw)
            self._written += raw.nbytes
            self._cond.notify_all()
            return self._written == self._size

    def close(self) -> None:
        self._close()
        if self._written != self._size:
            raise MeraError(f"{self.url}: closed with {self._size - self._written} planned "
                            f"bytes not written")

    def cancel(self) -> None:
        """Refuse every piece from now on (a writer waiting for its turn too); the file stays
        open until `abort`, for threads that may still be writing to it."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def abort(self) -> None:
        self.cancel()
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
        else:
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
