"""Weights leave a ZeRO-3 job here: gathered one bucket at a time on global rank 0 and written as
sharded safetensors in HF layout, so rank 0 never holds more than a bucket of the model and its
CPU copy. A parameter larger than the bucket is gathered whole. tests/test_export.py measures it."""
from __future__ import annotations

import logging
from typing import Iterator

import torch
import torch.distributed as dist

from mera_ds.storage import committed_dir

log = logging.getLogger("mera_ds.export")


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", None) or p.numel()


def buckets(named: list[tuple[str, torch.nn.Parameter]], bucket_bytes: int
            ) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive groups of parameters of at most bucket_bytes (a larger one goes alone)."""
    group, size = [], 0
    for name, p in named:
        nbytes = _numel(p) * p.element_size()
        if group and size + nbytes > bucket_bytes:
            yield group
            group, size = [], 0
        group.append((name, p))
        size += nbytes
    if group:
        yield group


def gathered(named: list[tuple[str, torch.nn.Parameter]], bucket_bytes: int
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every rank iterates; full CPU copies come out on rank 0 only (other ranks get nothing)."""
    import deepspeed

    rank0 = dist.get_rank() == 0
    for group in buckets(named, bucket_bytes):
        params = [p for _, p in group]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank0:
                for name, p in group:
                    yield name, p.data.detach().to("cpu", copy=True)


def export_llm(llm, tokenizer, out_url: str, *, shard_size: int, bucket_bytes: int) -> None:
    """Write the (partitioned) LLM to `out_url` in HF layout; collective over all ranks."""
    from mera_ds.io.format import TensorSpec, dtype_code
    from mera_ds.io.writer import ShardedWriter
    from mera_ds.model.llm import save_llm_metadata

    named = list(llm.named_parameters())  # tied weights appear once; HF re-ties on load
    if dist.get_rank() != 0:
        for _ in gathered(named, bucket_bytes):
            pass
        dist.barrier()
        return
    # Shapes are known without gathering (ds_shape), so shards are planned up front and each
    # tensor streams to its file as it arrives: memory stays at one bucket.
    plan = [TensorSpec(n, dtype_code(p.dtype), tuple(getattr(p, "ds_shape", p.shape)))
            for n, p in named]
    with committed_dir(out_url) as tmp:
        save_llm_metadata(llm, tokenizer, tmp)  # before the index, which marks it complete
        with ShardedWriter(tmp, max_shard_size=shard_size, plan=plan) as writer:
            for name, tensor in gathered(named, bucket_bytes):
                writer.add(name, tensor)
                del tensor
    log.info("exported LLM (%d tensors) to %s", len(named), out_url)
    dist.barrier()


def export_connectors(connectors: dict[str, torch.nn.Module], urls: dict[str, str]) -> None:
    """Gather each connector (small) and save it from rank 0; collective over all ranks."""
    import deepspeed

    from mera_ds.model.connectors import save_connector

    for m, module in connectors.items():
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if dist.get_rank() == 0:
                save_connector(module, urls[m])
    dist.barrier()
