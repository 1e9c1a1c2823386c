"""The learned merge (mera-ada): the stage-i LLM as a function of merge coefficients,

    W_t(lambda) = theta_0,t + sum_k lambda_{t,k} T_k,t,    T_k = theta_ft_k - theta_0, k = 1..i,

one coefficient per stage k and parameter tensor t (AdaMerging's layer-wise coefficients), fitted
on the replay mix by the realign job together with the connectors; every weight of the LLM stays
frozen. They start at 1/i: the uniform average, MERA's merge. The merge step then writes
W(lambda) with the `ada` strategy (mera_ds.merge.strategies), streaming as any merge.

Each tensor t is parametrized (torch.nn.utils.parametrize): its own parameter keeps theta_0, a
frozen parameter holds its i task vectors stacked, and lambda_t is the one trainable parameter.
Under ZeRO-3 all three are partitioned like any parameter, so a rank holds (i + 1) / N of the
LLM's size, and a layer's (i + 1) pieces are gathered only while it runs, forward and backward
(d loss / d lambda_{t,k} = <d loss / d W_t, T_k,t>, which autograd takes from the gathered T_k).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from mera_ds.errors import MeraError


class MergeCoefficients(nn.Module):
    """The parametrization of one tensor: theta_0 in, theta_0 + sum_k lambda_k T_k out."""

    def __init__(self, shape: torch.Size, n: int, dtype: torch.dtype):
        super().__init__()
        self.task_vectors = nn.Parameter(torch.zeros(n, *shape, dtype=dtype), requires_grad=False)
        self.lam = nn.Parameter(torch.full((n,), 1.0 / n, dtype=dtype))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + torch.tensordot(self.lam.to(base.dtype), self.task_vectors, dims=1)


def with_learned_merge(llm: nn.Module, finetuned: Sequence[str],
                       ds_config: Optional[dict] = None) -> nn.Module:
    """`llm` (theta_0, partitioned by ZeRO-3 when `ds_config` is given) with every parameter
    tensor parametrized over the task vectors of the HF directories `finetuned` (theta_ft_1 ..
    theta_ft_i, as finetunes export them), the coefficients at 1/i. Collective under ZeRO-3:
    rank 0 reads each tensor once and fills the others' partitions."""
    from mera_ds.io.reader import Checkpoint

    tensors = list(llm.named_parameters())  # tied weights once
    checkpoints = [Checkpoint(url) for url in finetuned]
    try:
        for ckpt, url in zip(checkpoints, finetuned):
            missing = [n for n, _ in tensors if n not in ckpt]
            if missing:
                raise MeraError(f"{url}: no tensor {missing[0]!r} of the base LLM (the learned "
                                f"merge needs the finetuned LLMs of one run)")
        owners = {}  # tensor -> every (module, attribute) holding it: tied weights share one
        for module in llm.modules():
            for attr, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((module, attr))
        for name, p in tensors:
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            with _created(ds_config):
                coefficients = MergeCoefficients(shape, len(finetuned), p.dtype)
            _fill(coefficients.task_vectors, p, name, checkpoints)
            for module, attr in owners[id(p)]:
                # unsafe: under ZeRO-3 the original is an empty partition, nothing to check
                parametrize.register_parametrization(module, attr, coefficients, unsafe=True)
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    return llm


def _created(ds_config: Optional[dict]):
    """Parameters made inside are partitioned at once under ZeRO-3 (never whole on a rank)."""
    if ds_config is None:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


@torch.no_grad()
def _fill(task_vectors: nn.Parameter, base: nn.Parameter, name: str, checkpoints) -> None:
    """task_vectors[k] = theta_ft_k[name] - theta_0[name]: under ZeRO-3 rank 0 fills the
    tensor gathered whole and every rank keeps its partition; replicated, every rank its own."""
    partitioned = hasattr(base, "ds_id")
    with _gathered([base], modify=False), _gathered([task_vectors]):
        if not partitioned or dist.get_rank() == 0:
            for k, ckpt in enumerate(checkpoints):
                ft = ckpt.get(name).to(task_vectors.dtype)
                if ft.shape != base.shape:
                    raise MeraError(f"{ckpt.url}: tensor {name!r} has shape {tuple(ft.shape)}, "
                                    f"the base LLM {tuple(base.shape)}")
                task_vectors[k].copy_(ft.sub_(base.to(ft.dtype)))


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter], modify: bool = True) -> Iterator[None]:
    """ZeRO-3 partitions whole while inside (rank 0's changes kept); plain tensors as they are."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def coefficients(llm: nn.Module) -> dict[str, nn.Parameter]:
    """{tensor name: lambda (i,)} of a parametrized LLM, tied tensors once."""
    out, seen = {}, set()
    for mname, module in llm.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            lam = plist[0].lam
            if id(lam) not in seen:
                seen.add(id(lam))
                out[f"{mname}.{attr}" if mname else attr] = lam
    return out


def read_coefficients(llm: nn.Module) -> dict[str, list[float]]:
    """The fitted coefficients, on every rank; collective under ZeRO-3."""
    out = {}
    for name, lam in coefficients(llm).items():
        with _gathered([lam], modify=False):
            out[name] = [float(x) for x in lam.detach().float().cpu()]
    return out
