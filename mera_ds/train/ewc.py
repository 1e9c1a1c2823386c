"""Elastic Weight Consolidation (Kirkpatrick et al., 2017), online: finetune i >= 2 of the seq
chain minimises

    CE + (lambda / 2) sum_t F_t (W_t - W*_t)^2,     W* = theta_{i-1},  F = F_1 + .. + F_{i-1},

over the LLM's weight tensors t, F_k the diagonal empirical Fisher of theta_ft_k: the squared
gradient of a batch's loss on m_k's training data, averaged over stages.finetune.ewc_batches
batches. A fisher job after finetune k estimates it (a job of its own: that finetune may be
shared with methods that need no Fisher, or be a LoRA finetune, whose engine has no gradient for
the full weights) and writes F_1 + .. + F_k, float32, in HF layout next to theta_ft_k.

Under ZeRO-3 a rank holds only its partition of F and W*, in the layout of its partition of W:
the Fisher is accumulated from the gradient partitions, and the penalty's gradient, lambda F
(W - W*), is added to them before the optimizer step (clipped with the rest), with no
communication. In a LoRA finetune every weight is frozen at W* but the adapted ones, whose
W - W* is scaling * B @ A: a rank takes the penalty over its partition's elements of W from the
gathered adapters, and the adapters' gradients are summed over the ranks.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.distributed as dist

from mera_ds.errors import MeraError
from mera_ds.io.reader import Checkpoint
from mera_ds.train.runtime import to_device

log = logging.getLogger("mera_ds.train")


def _partition(p: torch.nn.Parameter) -> int:
    """Elements of each rank's partition of p (ZeRO-3: ceil(numel / ranks), the last padded)."""
    return p.ds_tensor.numel()


def _span(numel: int, partition: int) -> tuple[int, int]:
    """(first element, count) of this rank's partition that lie within the tensor."""
    start = min(numel, dist.get_rank() * partition)
    return start, min(partition, numel - start)


def _local(flat: torch.Tensor, partition: int) -> torch.Tensor:
    """This rank's partition of a whole flat tensor, float32, zero-padded."""
    start, count = _span(flat.numel(), partition)
    out = flat.new_zeros(partition, dtype=torch.float32)
    out[:count] = flat[start:start + count]
    return out


def _read_local(ckpt: Checkpoint, name: str, p: torch.nn.Parameter) -> torch.Tensor:
    """This rank's partition of tensor `name` of a directory, float32, read alone."""
    numel, partition = p.ds_numel, _partition(p)
    if ckpt.info(name).numel != numel:
        raise MeraError(f"{ckpt.url}: tensor {name} has {ckpt.info(name).numel} elements, the "
                        f"LLM's {numel}")
    start, count = _span(numel, partition)
    out = torch.zeros(partition, dtype=torch.float32)
    out[:count] = ckpt.read(name, start, count).float()
    return out.to(p.ds_tensor.device)


def _zero3(engine, what: str) -> None:
    if engine.zero_optimization_stage() != 3:
        raise MeraError(f"cluster.deepspeed_config: {what} works on ZeRO-3 partitions; set "
                        f"zero_optimization.stage to 3")


def _loss_scale(engine) -> float:
    """What the gradients are scaled by (fp16's loss scale; 1 otherwise)."""
    return float(getattr(engine.optimizer, "loss_scale", 1.0))


# --- the Fisher --------------------------------------------------------------------------------

def estimate_fisher(spec, engine, device, loader) -> dict:
    """A fisher job: the LLM's squared batch gradients, averaged over the loader's batches,
    plus the Fisher of spec.fisher (the earlier stages'), written to spec.export_fisher.
    Collective; returns the job's metrics."""
    from deepspeed.utils import safe_get_local_grad

    _zero3(engine, "the Fisher of EWC")
    tensors = list(engine.module.llm.named_parameters())
    fisher = {name: torch.zeros(_partition(p), dtype=torch.float32, device=p.ds_tensor.device)
              for name, p in tensors}
    accumulation, batches = engine.gradient_accumulation_steps(), iter(loader)
    scale, losses = _loss_scale(engine), []
    engine.eval()  # the trained model's predictions, without dropout
    for _ in range(spec.settings.steps):
        for k in range(accumulation):
            # The ranks' micro-batches make one batch: ZeRO-3 averages their gradients.
            engine.set_gradient_accumulation_boundary(k == accumulation - 1)
            loss = engine(to_device(next(batches), device)).loss
            engine.backward(loss)
            losses.append(float(loss.detach()))
        for name, p in tensors:
            fisher[name].add_((safe_get_local_grad(p) / scale).square())
        engine.optimizer.zero_grad()  # the next batch's gradients start from zero, no step
    earlier = Checkpoint(spec.fisher) if spec.fisher else None
    for name, p in tensors:
        fisher[name].div_(spec.settings.steps)
        if earlier:
            fisher[name].add_(_read_local(earlier, name, p).to(fisher[name].device))
    write_fisher(spec.export_fisher, [(name, p, fisher[name]) for name, p in tensors])
    mean = torch.tensor(sum(losses) / len(losses), device=engine.device)
    dist.all_reduce(mean)
    return {"phase": spec.phase, "modality": spec.modality, "batches": spec.settings.steps,
            "loss": float(mean) / dist.get_world_size()}


def write_fisher(url: str, tensors: list) -> None:
    """(name, parameter, this rank's partition) of every tensor, gathered one tensor at a time on
    rank 0 and written as an HF-layout directory of float32 safetensors, whole or not at all.
    Collective."""
    from mera_ds.io.format import TensorSpec
    from mera_ds.io.writer import ShardedWriter
    from mera_ds.storage import committed_dir

    rank0 = dist.get_rank() == 0

    def whole(p, local):
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())] if rank0 else None
        dist.gather(local, parts, dst=0)
        return torch.cat(parts)[:p.ds_numel].view(p.ds_shape).cpu() if rank0 else None

    if not rank0:
        for _, p, local in tensors:
            whole(p, local)
        dist.barrier()
        return
    plan = [TensorSpec(name, "F32", tuple(p.ds_shape)) for name, p, _ in tensors]
    with committed_dir(url) as tmp, ShardedWriter(tmp, max_shard_size="2GB", plan=plan) as out:
        for name, p, local in tensors:
            out.add(name, whole(p, local))
    log.info("wrote the Fisher (%d tensors) to %s", len(tensors), url)
    dist.barrier()


# --- the penalty -------------------------------------------------------------------------------

class _Weight:
    """A trained weight: W - W* on this rank's partition of the optimizer's float32 weights."""

    def __init__(self, p, fisher: torch.Tensor, anchor: torch.Tensor):
        self.p, self.fisher, self.anchor = p, fisher, anchor

    def terms(self, lam: float):
        from deepspeed.utils import safe_get_local_fp32_param

        # the master copy is a leaf that requires grad: the penalty's value needs no graph
        delta = safe_get_local_fp32_param(self.p).detach() - self.anchor
        return (self.fisher * delta.square()).sum() * lam / 2, [(self.p, lam * self.fisher * delta)]


class _Adapted:
    """A LoRA-adapted weight: W - W* = scaling * B @ A on this rank's partition of W's elements
    (its rows computed alone); the adapters' gradients summed over the ranks."""

    def __init__(self, a, b, scaling: float, fisher: torch.Tensor, numel: int, partition: int):
        self.a, self.b, self.scaling, self.fisher = a, b, scaling, fisher
        self.start, self.count = _span(numel, partition)

    def terms(self, lam: float):
        from deepspeed.utils import safe_get_full_fp32_param

        a, b = (safe_get_full_fp32_param(p).detach().requires_grad_() for p in (self.a, self.b))
        width = a.shape[1]
        first, last = self.start // width, math.ceil((self.start + self.count) / width)
        rows = (self.scaling * b[first:last] @ a).flatten()
        delta = rows[self.start - first * width:][:self.count]
        value = (self.fisher * delta.square()).sum() * lam / 2
        flat = torch.cat([g.flatten() for g in torch.autograd.grad(value, [a, b])])
        dist.all_reduce(flat)
        ga, gb = flat.split([a.numel(), b.numel()])
        return value.detach(), [(self.a, _local(ga, _partition(self.a))),
                                (self.b, _local(gb, _partition(self.b)))]


class Penalty:
    """EWC's penalty of a finetune from `anchor` (theta_{i-1}'s directory) weighed by the Fisher
    directory `fisher`: each rank holds its partitions of F (and, for full finetunes, of W*)."""

    def __init__(self, engine, fisher: str, anchor: Optional[str], lam: float):
        from mera_ds.model.lora import adapters, is_lora

        _zero3(engine, "the penalty of EWC")
        llm, self.lam = engine.module.llm, lam
        fisher_ckpt = Checkpoint(fisher)
        if is_lora(llm):
            weights = dict(llm.get_base_model().named_parameters())
            self.terms = []
            for name, (a, b, scaling) in adapters(llm).items():
                w = weights[name.replace(".weight", ".base_layer.weight")]
                start, count = _span(w.ds_numel, _partition(w))
                local = fisher_ckpt.read(name, start, count).float().to(w.ds_tensor.device)
                self.terms.append(_Adapted(a, b, scaling, local, w.ds_numel, _partition(w)))
        else:
            anchor_ckpt = Checkpoint(anchor)
            self.terms = [_Weight(p, _read_local(fisher_ckpt, name, p),
                                  _read_local(anchor_ckpt, name, p))
                          for name, p in llm.named_parameters() if p.requires_grad]

    def apply(self, engine) -> float:
        """Add the penalty's gradient to the reduced gradient partitions (after the backward of
        a step's last micro-batch, before its optimizer step); return the penalty. Collective."""
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        scale = _loss_scale(engine)
        total = torch.zeros((), dtype=torch.float64, device=engine.device)
        for term in self.terms:
            value, grads = term.terms(self.lam)
            total += value.to(total)
            for p, g in grads:
                safe_set_local_grad(p, safe_get_local_grad(p) + scale * g.to(p.ds_tensor.device))
        dist.all_reduce(total)
        return float(total)
