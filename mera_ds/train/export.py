"""Weights leave a ZeRO-3 job here: gathered one bucket at a time on global rank 0 and written as
sharded safetensors in HF layout, so rank 0 never holds more than a bucket of the model and its
CPU copy. A parameter larger than the bucket is gathered whole. tests/test_export.py measures it."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from mera_ds.model.lora import Export
from mera_ds.storage import committed_dir, join

log = logging.getLogger("mera_ds.export")

# The adapter of a LoRA finetune, as peft names its files (PeftModel.from_pretrained reads them).
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", None) or p.numel()


def buckets(tensors: list[Export], bucket_bytes: int) -> Iterator[list[Export]]:
    """Consecutive groups of tensors whose parameters take at most bucket_bytes (a larger one
    goes alone)."""
    group, size = [], 0
    for t in tensors:
        nbytes = sum(_numel(p) * p.element_size() for p in t[1])
        if group and size + nbytes > bucket_bytes:
            yield group
            group, size = [], 0
        group.append(t)
        size += nbytes
    if group:
        yield group


def gathered(tensors: list[Export], bucket_bytes: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Every rank iterates; full CPU copies come out on rank 0 only (other ranks get nothing).
    A tensor made of several parameters (a LoRA layer) is computed from them on rank 0."""
    import deepspeed

    rank0 = dist.get_rank() == 0
    for group in buckets(tensors, bucket_bytes):
        params = [p for _, ps, _ in group for p in ps]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank0:
                for name, ps, combine in group:
                    data = combine(*(p.data for p in ps)) if combine else ps[0].data
                    yield name, data.detach().to("cpu", copy=True)


def _write_all(tensors: list[Export], bucket_bytes: int, write) -> None:
    """Gather `tensors` (collective) and, on rank 0, pass each to write(name, tensor)."""
    for name, tensor in gathered(tensors, bucket_bytes):
        write(name, tensor)
        del tensor


def export_llm(llm, tokenizer, out_url: str, *, shard_size: int, bucket_bytes: int,
               base: Optional[str] = None) -> None:
    """Write the (partitioned) LLM to `out_url` in HF layout; collective over all ranks. A
    LoRA-wrapped LLM is written with its adapters folded in, and the adapter itself (trained on
    `base`, the LLM the job started from) to OUT/adapter/ in peft's layout."""
    from mera_ds.io.format import TensorSpec, dtype_code
    from mera_ds.io.writer import ShardedWriter
    from mera_ds.model.llm import save_llm_metadata
    from mera_ds.model.lora import adapter_tensors, is_lora, merged_tensors

    tensors = merged_tensors(llm)  # tied weights appear once; HF re-ties on load
    adapter = adapter_tensors(llm) if is_lora(llm) else []
    if dist.get_rank() != 0:
        _write_all(adapter, bucket_bytes, None)
        _write_all(tensors, bucket_bytes, None)
        dist.barrier()
        return
    # Shapes are known without gathering (ds_shape), so shards are planned up front and each
    # tensor streams to its file as it arrives: memory stays at one bucket.
    plan = [TensorSpec(n, dtype_code(ps[0].dtype), tuple(getattr(ps[0], "ds_shape", ps[0].shape)))
            for n, ps, _ in tensors]
    with committed_dir(out_url) as tmp:
        if adapter:  # before the index, which marks the directory complete
            _save_adapter(llm, adapter, join(tmp, "adapter"), bucket_bytes, base)
        save_llm_metadata(llm, tokenizer, tmp)
        with ShardedWriter(tmp, max_shard_size=shard_size, plan=plan) as writer:
            _write_all(tensors, bucket_bytes, writer.add)
    log.info("exported LLM (%d tensors%s) to %s", len(tensors),
             ", LoRA folded in" if adapter else "", out_url)
    dist.barrier()


def _save_adapter(llm, adapter: list[Export], url: str, bucket_bytes: int,
                  base: Optional[str]) -> None:
    """adapter_model.safetensors and adapter_config.json at `url` (rank 0 of a collective)."""
    from safetensors.torch import save

    from mera_ds.model.lora import save_adapter_config
    from mera_ds.storage import write_bytes

    state: dict[str, torch.Tensor] = {}
    _write_all(adapter, bucket_bytes, state.__setitem__)
    write_bytes(join(url, ADAPTER_WEIGHTS), save(state))
    with tempfile.TemporaryDirectory(prefix="mera-adapter-") as d:
        save_adapter_config(llm, d, base)
        with open(os.path.join(d, ADAPTER_CONFIG), "rb") as f:
            write_bytes(join(url, ADAPTER_CONFIG), f.read())


def export_connectors(connectors: dict[str, torch.nn.Module], urls: dict[str, str]) -> None:
    """Gather each connector (small) and save it from rank 0; collective over all ranks."""
    import deepspeed

    from mera_ds.model.connectors import save_connector

    for m, module in connectors.items():
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if dist.get_rank() == 0:
                save_connector(module, urls[m])
    dist.barrier()
