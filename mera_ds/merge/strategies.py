"""Merge strategies: per-tensor functions of theta_{i-1} and the fine-tuned LLM tensors, in fp32.

STRATEGIES is the one registry: the run config validates `stages.merge.strategy` against it, and
`mera merge --strategy` takes its choices and help from it. A new strategy is a subclass with a
`name`, a `summary` and `merge` (and `check`, where it has settings per tensor), added to
STRATEGIES; its settings are fields of config.MergeConfig (read here as `cfg.<field>`; this
module imports no config, so the config can import it).

- mera: prev + sum_k (ft_k - prev) / i, step i >= 2: with prev = theta_{i-1} and one fine-tuned
  model, the paper's Eq. 4.1; with prev = theta_0 and the i fine-tuned models of stages 1..i (a
  merge across stages), the same uniform average of the per-modality LLMs, in one step;
- linear: sum_k w_k x_k / sum_k w_k over x = (prev, *finetuned) (model soups; equal weights by
  default);
- task_arithmetic: prev + lam * sum_k (ft_k - prev);
- ties: each delta trimmed to its top `density` fraction by magnitude (elements with |d| >= the
  k-th largest |d|, k = max(1, floor(density * n))), the sign elected per element as the sign of
  the sum of trimmed deltas, the disjoint mean (mean of the trimmed deltas that agree with it,
  zeros excluded), then prev + lam * merged;
- dare: each delta element dropped with probability p and the rest scaled by 1 / (1 - p), then
  prev + lam * sum. The random mask of model k on block j of tensor `name` is drawn from a
  generator seeded by (seed, name, k, j), blocks being fixed runs of BLOCK elements: the result
  does not depend on the shard plan, the number of workers or the order of work;
- pcb: PCB-Merging (Du et al., NeurIPS 2024), per tensor. Over the n deltas d_k (|d_k| clamped
  to its 0.01% and 99.99% order statistics, as the authors' code does): intra-balancing
  exp(n * minmax(|d_k|)^2), inter-balancing tanh(d_k * sum_j d_j), their product the score s_k;
  each s_k clamped from below at its (1 - density) order statistic and min-max normalised to a
  weight w_k (the rest of the elements get 0), then prev + lam * sum_k w_k d_k / sum_k w_k.
  The authors normalise over the whole model's flattened task vector; here each tensor is its
  own vector, so the merge streams tensor by tensor;
- ada: prev + sum_k lambda_{t,k} (ft_k - prev), one coefficient per tensor t and fine-tuned model
  k, read from a JSON file (--coefficients): those a mera-ada realign fitted on the replay mix
  (mera_ds.model.ada).
"""
from __future__ import annotations

import hashlib
from typing import ClassVar, Optional, Sequence

import torch

from mera_ds.errors import MeraError

# The runs of elements that dare draws one random mask for (see the module doc): part of the
# definition of its masks, so changing it changes dare. The engine merges a whole number of them
# at once (mera_ds.merge.engine.CHUNK).
BLOCK = 1 << 16


class Strategy:
    """A per-tensor merge: fp32 inputs (theta_{i-1} and the fine-tuned tensors, flat blocks or
    whole tensors) -> the fp32 merged tensor. The inputs are scratch copies: a strategy may
    overwrite them (and return one of them), which keeps the merge free of allocations."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `mera merge --help` and the docs
    # True: element e of the output depends on element e of the inputs only, so any block of a
    # tensor can be merged on its own.
    elementwise: ClassVar[bool] = True
    # True: the fine-tuned models' deltas are summed (times lam), not averaged: across stages the
    # plan divides lam by the stage number, so that lam scales their average.
    sums: ClassVar[bool] = False
    # True: its coefficients are learned in the run, by the realign (the plan runs it first).
    learned: ClassVar[bool] = False

    def __init__(self, cfg, n_finetuned: int, step: Optional[int]):
        # cfg: a config.MergeConfig (its fields are the strategies' settings)
        if n_finetuned < 1:
            raise MeraError(f"merge strategy {self.name}: needs at least one fine-tuned LLM")
        self.cfg, self.n_finetuned, self.step = cfg, n_finetuned, step

    def check(self, names: Sequence[str]) -> None:
        """Called with every tensor's name before any is merged: a strategy with settings per
        tensor checks it has them."""

    def merge(self, name: str, block: int, prev: torch.Tensor,
              finetuned: Sequence[torch.Tensor]) -> torch.Tensor:
        """`prev` and `finetuned`: elements of tensor `name` from the start of its run of BLOCK
        elements number `block`: one or several whole runs (the tensor's last may be short),
        or the whole tensor (block 0)."""
        raise NotImplementedError


class Mera(Strategy):
    name = "mera"
    summary = ("prev + sum_k (ft_k - prev) / i: the paper's running average (--step i; prev "
               "theta_{i-1} and ft_i, or theta_0 and ft_1..ft_i)")

    def __init__(self, cfg, n_finetuned, step):
        super().__init__(cfg, n_finetuned, step)
        if step is None or step < 2:
            raise MeraError(f"merge strategy mera: step must be >= 2 (the stage being merged), "
                            f"got {step}")
        if n_finetuned not in (1, step):
            raise MeraError(f"merge strategy mera: takes one fine-tuned LLM (after theta_"
                            f"{{i-1}}) or i of them (after theta_0), got {n_finetuned} at step "
                            f"{step}")

    def merge(self, name, block, prev, finetuned):
        # theta_{i-1} + (theta_ft_i - theta_{i-1}) / i, in this order of operations.
        total = finetuned[0].sub_(prev)
        for x in finetuned[1:]:
            total.add_(x.sub_(prev))
        return total.div_(self.step).add_(prev)


class Linear(Strategy):
    name = "linear"
    summary = "sum_k w_k x_k / sum_k w_k over (prev, *finetuned): model soups (--weights)"

    def __init__(self, cfg, n_finetuned, step):
        super().__init__(cfg, n_finetuned, step)
        n = n_finetuned + 1
        weights = cfg.weights if cfg.weights is not None else [1.0] * n
        if len(weights) != n:
            raise MeraError(f"merge strategy linear: {len(weights)} weights for {n} models "
                            f"(the previous LLM and {n_finetuned} fine-tuned)")
        total = sum(weights)
        if total == 0:
            raise MeraError("merge strategy linear: the weights sum to 0")
        self.weights = [w / total for w in weights]

    def merge(self, name, block, prev, finetuned):
        out = prev.mul_(self.weights[0])
        for w, x in zip(self.weights[1:], finetuned):
            out.add_(x, alpha=w)
        return out


class TaskArithmetic(Strategy):
    name = "task_arithmetic"
    summary = "prev + lam * sum_k (ft_k - prev) (--lam)"
    sums = True

    def delta(self, name: str, block: int, k: int, x: torch.Tensor,
              prev: torch.Tensor) -> torch.Tensor:
        """The task vector of fine-tuned model k (in place of x)."""
        return x.sub_(prev)

    def merge(self, name, block, prev, finetuned):
        total = self.delta(name, block, 0, finetuned[0], prev)
        for k, x in enumerate(finetuned[1:], 1):
            total.add_(self.delta(name, block, k, x, prev))
        return total.mul_(self.cfg.lam).add_(prev)


class Dare(TaskArithmetic):
    name = "dare"
    summary = "task arithmetic on deltas randomly dropped with p and rescaled (--drop-p, --seed)"

    def generator(self, name: str, k: int, block: int) -> torch.Generator:
        key = f"{self.cfg.seed}\0{name}\0{k}\0{block}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def delta(self, name, block, k, x, prev):
        delta = x.sub_(prev)
        p = self.cfg.drop_p
        if p > 0:
            for j, part in enumerate(delta.view(-1).split(BLOCK)):  # a mask per run of BLOCK
                part.mul_(torch.rand(part.shape, generator=self.generator(name, k, block + j))
                          >= p)
            delta.div_(1 - p)
        return delta


class Ties(Strategy):
    name = "ties"
    summary = "trim deltas to the top density, elect signs, disjoint mean (--density, --lam)"
    elementwise = False

    def merge(self, name, block, prev, finetuned):
        n = prev.numel()
        k = max(1, int(self.cfg.density * n))
        trimmed = []
        for x in finetuned:
            delta = x.sub_(prev)
            if k < n:
                magnitude = delta.abs()
                threshold = magnitude.reshape(-1).kthvalue(n - k + 1).values
                delta.mul_(magnitude >= threshold)
                del magnitude
            trimmed.append(delta)
        sign = torch.sign(sum(trimmed))
        total = torch.zeros_like(prev)
        count = torch.zeros_like(prev)
        for delta in trimmed:
            agree = (torch.sign(delta) == sign) & (delta != 0)
            total.add_(delta * agree)
            count.add_(agree)
        return total.div_(count.clamp_(min=1)).mul_(self.cfg.lam).add_(prev)


class Pcb(Strategy):
    name = "pcb"
    summary = ("PCB-Merging: deltas weighed by intra- and inter-model balancing, the top density "
               "of each kept (--density, --lam)")
    elementwise = False
    OUTLIERS = 1e-4  # of |delta| clamped at each end (the authors' code)

    def merge(self, name, block, prev, finetuned):
        deltas = torch.stack([x.sub_(prev).reshape(-1) for x in finetuned])
        n, d = deltas.shape
        magnitude = _clamp_rows(deltas.abs(), self.OUTLIERS, self.OUTLIERS)
        score = torch.exp(n * _minmax_rows(magnitude) ** 2)
        score.mul_(torch.tanh(deltas * deltas.sum(0)))
        weight = _minmax_rows(_clamp_rows(score, 1 - self.cfg.density, 0.0))
        del score
        clamped = magnitude.mul_(torch.sign(deltas))
        merged = (clamped * weight).sum(0).div_(weight.sum(0).clamp_(min=1e-12))
        return merged.reshape(prev.shape).mul_(self.cfg.lam).add_(prev)


class Ada(Strategy):
    name = "ada"
    summary = ("prev + sum_k lambda_{t,k} (ft_k - prev), one coefficient per tensor and model, "
               "fitted by a mera-ada realign (--coefficients FILE)")
    learned = True

    def __init__(self, cfg, n_finetuned, step):
        super().__init__(cfg, n_finetuned, step)
        from mera_ds.storage import read_json

        if not cfg.coefficients:
            raise MeraError("merge strategy ada: needs the coefficients file (--coefficients)")
        self.url = cfg.coefficients
        self.coefficients = read_json(self.url)
        if not isinstance(self.coefficients, dict):
            raise MeraError(f"{self.url}: not a JSON object {{tensor: [coefficients]}}")

    def check(self, names):
        for name in names:
            lam = self.coefficients.get(name)
            if not (isinstance(lam, list) and len(lam) == self.n_finetuned and
                    all(isinstance(x, (int, float)) for x in lam)):
                raise MeraError(f"{self.url}: tensor {name!r} needs {self.n_finetuned} numbers "
                                f"(one per fine-tuned LLM), got {lam!r}")

    def merge(self, name, block, prev, finetuned):
        lam = self.coefficients[name]
        total = finetuned[0].sub_(prev).mul_(lam[0])
        for w, x in zip(lam[1:], finetuned[1:]):
            total.add_(x.sub_(prev), alpha=w)
        return total.add_(prev)


def _clamp_rows(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Each row of x (n x d) clamped between its order statistics at int(d * low) and
    int(d * (1 - high)) - 1 (0-based, ascending)."""
    d = x.shape[1]
    lo = x.kthvalue(int(d * low) + 1, dim=1, keepdim=True).values
    hi = x.kthvalue(max(1, int(d * (1 - high))), dim=1, keepdim=True).values
    return torch.maximum(torch.minimum(x, hi), lo)


def _minmax_rows(x: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) per row; a constant row is all zeros."""
    lo = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True) - lo
    return (x - lo).div_(torch.where(span > 0, span, torch.ones_like(span)))


STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s for s in (Mera, Linear, TaskArithmetic, Ties, Dare, Pcb, Ada)}


def make_strategy(cfg, n_finetuned: int, step: Optional[int] = None) -> Strategy:
    try:
        cls = STRATEGIES[cfg.strategy]
    except KeyError:
        raise MeraError(f"unknown merge strategy {cfg.strategy!r} "
                        f"(one of {', '.join(STRATEGIES)})") from None
    return cls(cfg, n_finetuned, step)
