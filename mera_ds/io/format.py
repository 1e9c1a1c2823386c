"""The safetensors format of HF LLM directories: file names, dtype codes, tensor specs, headers.

An HF LLM directory holds `model.safetensors`, or shards `model-0000k-of-0000N.safetensors` named in
`model.safetensors.index.json`, next to config.json and the tokenizer files. A safetensors file is
an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data offsets) and the
raw tensor bytes, so one tensor, or any run of its elements, is one ranged read
(mera_ds.io.reader) and a planned shard can be written tensor by tensor (mera_ds.io.writer).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Iterable

import torch

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
MAX_HEADER = 100_000_000


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


def header_bytes(specs: Iterable[TensorSpec]) -> bytes:
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

