"""The training recipe that align, finetune and realign share: a JobSpec in, a trained MLLM's
artifacts out, under DeepSpeed ZeRO-3.

    run_job = setup_engine -> restore -> setup_data -> train_loop -> export

Each step is a short function over the runtime (mera_ds.train.runtime); what differs between the
phases (what trains, at which learning rate, on which data, what is exported) is the JobSpec that
mera_ds.train.jobs builds for them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist

from mera_ds.config import LoraConfig, RunConfig, TrainingSettings, parse_size
from mera_ds.data.replay import ReplaySet
from mera_ds.errors import MeraError, RankFailure
from mera_ds.train.runtime import (Board, Checkpointer, deepspeed_config, device_for,
                                   device_memory, init_distributed, llm_bytes, is_comm_failure, optimizer_for, rank_addresses,
                                   to_device)

log = logging.getLogger("mera_ds.train")


@dataclass(frozen=True)
class JobSpec:
    name: str                                  # the plan step, e.g. "02-video/finetune"
    phase: str                                 # align | finetune | realign
    modality: str                              # the stage's modality m_i
    learned: tuple[str, ...]                   # modalities whose connectors the model holds
    train_llm: bool                            # the LLM's weights, or its adapters with lora
    train_connectors: tuple[str, ...]
    # Shard patterns, or replay sets (resolved when the job starts: they are written by an
    # earlier step). Several are mixed: uniformly, or by the replay sets' sizes.
    data: tuple[Union[str, ReplaySet], ...]
    settings: TrainingSettings
    lr_llm: float
    lr_connector: float
    init_llm: Optional[str]                    # LLM directory; None: the config's llm
    init_connectors: dict[str, str] = field(default_factory=dict)
    export_llm: Optional[str] = None           # HF directory to write the trained LLM to
    export_connectors: dict[str, str] = field(default_factory=dict)
    tensorboard: Optional[str] = None
    state: Optional[str] = None                # where resume checkpoints go while it runs
    lora: Optional[LoraConfig] = None          # train LoRA adapters instead of the LLM
    # A learned merge (mera_ds.model.ada): the LLM is init_llm (theta_0) plus these finetuned
    # LLMs' task vectors weighed by coefficients that train at lr_merge, and are written to
    # export_coefficients.
    merge_finetuned: tuple[str, ...] = ()
    lr_merge: float = 0.0
    export_coefficients: Optional[str] = None
    # The replay-free regularizers of a finetune toward init_llm (theta_{i-1}), with the
    # settings' weights. lwf: distil from it, frozen (mera_ds.model.lwf). fisher: the summed
    # Fisher of the earlier stages (mera_ds.train.ewc), which weighs a finetune's EWC penalty,
    # and to which a fisher job adds its own estimate, written to export_fisher.
    lwf: bool = False
    fisher: Optional[str] = None
    export_fisher: Optional[str] = None

    @property
    def outputs(self) -> tuple[str, ...]:
        """The artifacts it writes (the resume state is none)."""
        return tuple(u for u in (self.export_llm, *self.export_connectors.values(),
                                 self.export_coefficients, self.export_fisher) if u)

    @property
    def inputs(self) -> tuple[str, ...]:
        """What it reads that a run may write: the LLM, connectors, replay sets and Fisher it
        starts from (not the shards nor the config's LLM, which are there before the run)."""
        replays = (d.dir for d in self.data if isinstance(d, ReplaySet))
        return tuple(u for u in (self.init_llm, *self.merge_finetuned,
                                 *self.init_connectors.values(), *replays, self.fisher) if u)


def with_length(spec: JobSpec) -> JobSpec:
    """The spec with its steps set from its epochs where it has them (a realign: its replay sets
    are written by earlier steps, so their sizes are known only now)."""
    epochs = getattr(spec.settings, "epochs", None)
    if epochs is None:
        return spec
    _, sizes = resolve_data(spec.data)
    if sizes is None:
        raise MeraError(f"{spec.name}: epochs needs replay sets, whose sizes are known; "
                        f"set steps instead")
    steps = max(1, math.ceil(epochs * sum(sizes) / spec.settings.batch_size))
    return dataclasses.replace(spec, settings=spec.settings.model_copy(update={"steps": steps}))


def lr_factor(step: int, settings: TrainingSettings) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def run_job(cfg: RunConfig, spec: JobSpec, checkpointer: Optional[Checkpointer] = None,
            checkpoint_every: Optional[int] = None,
            observe: Optional[Callable[[str, object], None]] = None,
            progress: Optional[Callable[[int, int, Optional[float], Optional[float]],
                                        None]] = None) -> dict:
    """Train per `spec`, export its artifacts, and return the job's metrics (on every rank).

    `observe(event, engine)` is called on every rank at "start" (after a resume) and at "end"
    (before the export): for callers that inspect or log the engine. `progress`: see
    train_loop.
    """
    spec = with_length(spec)
    init_distributed(cfg)
    rank = dist.get_rank()
    try:
        addresses = " ".join(rank_addresses())
        if rank == 0:
            log.info("%s: ranks 0..%d on %s", spec.name, dist.get_world_size() - 1, addresses)
        device = device_for(cfg)
        engine = setup_engine(cfg, spec, device)
        start = checkpointer.restore(engine) if checkpointer else 0
        if start:
            log.info("%s: resuming at step %d of %d", spec.name, start, spec.settings.steps)
        if observe:
            observe("start", engine)
        loader = setup_data(cfg, spec, engine, start)
        if spec.phase == "fisher":  # it writes its Fisher; nothing trains
            from mera_ds.train.ewc import estimate_fisher

            metrics = estimate_fisher(spec, engine, device, loader)
        else:
            metrics = train_loop(spec, engine, device, loader, start, checkpointer,
                                 checkpoint_every or max(1, spec.settings.steps // 4), progress,
                                 penalty=ewc_penalty(spec, engine))
        # ZeRO wraps the optimizer; stage 0 (a replicated LLM) leaves it as it is.
        optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
        metrics.update(addresses=addresses, optimizer=type(optimizer).__name__,
                       zero_stage=engine.zero_optimization_stage())
        if observe:
            observe("end", engine)
        export(cfg, spec, engine)
        return metrics
    except MeraError:
        raise
    except Exception as e:
        if is_comm_failure(e):
            raise RankFailure(
                f"{spec.name}: rank {rank}: a collective failed or timed out "
                f"(cluster.timeout_s={cfg.cluster.timeout_s}); a peer rank probably died: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        raise


def setup_engine(cfg: RunConfig, spec: JobSpec, device: torch.device):
    """The MLLM of the job (LLM partitioned by ZeRO-3, or whole on every rank for a
    data-parallel realign; connectors loaded, what trains unfrozen) and its optimizer, wrapped in
    a DeepSpeed engine."""
    import warnings

    import deepspeed

    from mera_ds.model.ada import with_learned_merge
    from mera_ds.model.connectors import load_connector
    from mera_ds.model.llm import DTYPES, build_llm
    from mera_ds.model.lora import with_lora
    from mera_ds.model.lwf import Distillation
    from mera_ds.model.mllm import build_mllm, param_groups, set_trainable

    # DeepSpeed calls torch's renamed collectives on every step: one warning per call otherwise.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    torch.manual_seed(cfg.seed)
    replicated = replicates_llm(cfg, spec, device)
    ds_config = deepspeed_config(cfg, spec.settings, zero=not replicated)
    # Replicated (frozen): every rank runs the LLM whole, nothing of it is gathered or reduced.
    # Else it is created partitioned: no rank ever holds all of it. Encoders and connectors are
    # built outside that scope.
    with contextlib.nullcontext() if replicated else _partitioned(ds_config):
        llm, tokenizer = build_llm(cfg.llm, path=spec.init_llm)
        teacher = build_llm(cfg.llm, path=spec.init_llm)[0] if spec.lwf else None
    if spec.merge_finetuned:
        llm = with_learned_merge(llm, spec.merge_finetuned, None if replicated else ds_config)
    if spec.lora:
        llm = with_lora(llm, spec.lora)
    mllm = build_mllm(cfg, modalities=list(spec.learned), llm=llm, tokenizer=tokenizer)
    if teacher is not None:
        mllm.distill = Distillation(teacher, spec.settings.lwf_alpha,
                                    spec.settings.lwf_temperature)
    for m, url in spec.init_connectors.items():
        load_connector(mllm.connectors[m], url)
    set_trainable(mllm, llm=spec.train_llm, connectors=list(spec.train_connectors),
                  merge=bool(spec.merge_finetuned))
    # One dtype for the whole model: DeepSpeed flattens trainable partitions into one buffer.
    mllm.to(device=device, dtype=DTYPES[cfg.llm.dtype])

    groups = param_groups(mllm, lr_llm=spec.lr_llm, lr_connector=spec.lr_connector,
                          lr_merge=spec.lr_merge, weight_decay=spec.settings.weight_decay)
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = optimizer_for(groups, ds_config, device)
    engine, _, _, _ = deepspeed.initialize(model=mllm, optimizer=optimizer, config=ds_config)
    return engine


@contextlib.contextmanager
def _partitioned(ds_config: dict) -> Iterator[None]:
    """Models created inside are partitioned by ZeRO-3 as they are built (zero.Init through
    transformers' DeepSpeed integration, which holds the config by a weak reference: kept
    alive here until the block ends)."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del config


def ewc_penalty(spec: JobSpec, engine):
    """The EWC penalty of a finetune with a Fisher (mera_ds.train.ewc), else None."""
    if spec.phase != "finetune" or not spec.fisher:
        return None
    from mera_ds.train.ewc import Penalty

    return Penalty(engine, spec.fisher, spec.init_llm, spec.settings.ewc_lambda)


def replicates_llm(cfg: RunConfig, spec: JobSpec, device: torch.device) -> bool:
    """Whether this job keeps the LLM whole on every rank: a realign in data_parallel mode (its
    LLM is frozen, so only the connectors' gradients need reducing), or in auto mode where the
    LLM's weights take at most a third of every rank's device memory (the rest for activations
    and the connectors; a learned merge holds the task vectors too). Collective: the ranks
    agree."""
    if spec.phase != "realign" or spec.settings.mode == "zero3":
        return False
    if spec.settings.mode == "data_parallel":
        return True
    copies = 1 + len(spec.merge_finetuned)
    fits = torch.tensor([llm_bytes(cfg, spec.init_llm) * copies * 3 <= device_memory(device)],
                        dtype=torch.int64)
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    return bool(fits.item())


def setup_data(cfg: RunConfig, spec: JobSpec, engine, start: int):
    """This rank's loader: exactly the micro-batches of the steps still to take, the same as an
    uninterrupted job's (a resumed one skips those of the steps before `start`)."""
    from mera_ds.data.loader import make_loader, make_mixed_loader
    from mera_ds.model.mllm import Collator

    s = spec.settings
    patterns, weights = resolve_data(spec.data)
    accumulation = engine.gradient_accumulation_steps()
    common = dict(batch_size=s.micro_batch_size,
                  collate_fn=Collator(engine.module, train=True, pack=s.packing),
                  num_steps=s.steps * accumulation, skip=min(start, s.steps) * accumulation,
                  rank=dist.get_rank(), world_size=dist.get_world_size(),
                  seed=cfg.seed * 1_000_003, num_workers=cfg.data.loader_workers,
                  on_corrupt=cfg.data.on_corrupt, shuffle_buffer=cfg.data.shuffle_buffer)
    if len(patterns) == 1:
        return make_loader(patterns[0], **common)
    return make_mixed_loader(patterns, weights, **common)


def resolve_data(data) -> tuple[list[str], Optional[list[float]]]:
    """(patterns, mixing weights): plain patterns mix uniformly (weights None), replay sets by
    their sizes."""
    if all(isinstance(d, str) for d in data):
        return list(data), None
    if not all(isinstance(d, ReplaySet) for d in data):
        raise MeraError(f"training data mixes shard patterns and replay sets: {data}")
    resolved = [d.resolve() for d in data]
    return [p for p, _ in resolved], [w for _, w in resolved]


class _Window:
    """Loss and throughput over the steps since the last log line. Throughput is also kept
    steady: every window after the first, which holds the warm-up."""

    def __init__(self):
        self.losses, self.tokens, self.t0 = [], 0, time.time()
        self.steady_tokens, self.steady_time, self.count = 0, 0.0, 0

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.losses.append(loss.detach().float())
        self.tokens += tokens

    def close(self, device) -> tuple[float, float]:
        """(mean loss over all ranks, tokens/s of the window); starts the next window. Ends in an
        all_reduce, so device work is finished when timed."""
        world = dist.get_world_size()
        mean = torch.stack(self.losses).mean().to(device)
        dist.all_reduce(mean)
        elapsed = time.time() - self.t0
        tok_s = self.tokens * world / max(elapsed, 1e-9)
        self.count += 1
        if self.count > 1:
            self.steady_tokens += self.tokens * world
            self.steady_time += elapsed
        self.losses, self.tokens, self.t0 = [], 0, time.time()
        return float(mean) / world, tok_s

    def steady(self, last: float) -> float:
        return self.steady_tokens / self.steady_time if self.steady_time else last


def train_loop(spec: JobSpec, engine, device: torch.device, loader, start: int,
               checkpointer: Optional[Checkpointer], checkpoint_every: int,
               progress: Optional[Callable[[int, int, Optional[float], Optional[float]],
                                           None]] = None, penalty=None) -> dict:
    """Steps start..settings.steps; returns the metrics (first and last loss, throughput).

    `progress(step, steps, loss, tokens_per_s)` is called on rank 0 as the loop starts (step =
    start) and after each step, with the loss and tokens/s of the logging window that closed at
    that step (else None): a console's progress bar. It must return at once.
    `penalty` (mera_ds.train.ewc.Penalty): added to every step's gradient before its optimizer
    step; the loss logged is the model's (without it), the penalty logged beside it.
    """
    report = progress if dist.get_rank() == 0 else None
    s = spec.settings
    accum = engine.gradient_accumulation_steps()
    board = Board(spec.tensorboard)
    log_every = max(1, s.steps // 20)
    metrics = {"phase": spec.phase, "modality": spec.modality, "steps": s.steps,
               "resumed_at": start}
    window, batches, step, penalties = _Window(), iter(loader), start, []
    # How long steps wait for their batches (the loader runs in this process unless
    # data.loader_workers): the loader's share of the loop's time, for the finetune benchmark.
    data_wait, loop_start = 0.0, time.perf_counter()
    engine.train()
    if report:
        report(start, s.steps, None, None)
    while step < s.steps:
        for g in engine.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, s)
        for _ in range(accum):
            waited = time.perf_counter()
            try:
                batch = to_device(next(batches), device)
            except StopIteration:
                raise MeraError(f"{spec.name}: the data ran out at step {step} "
                                f"({spec.data})") from None
            data_wait += time.perf_counter() - waited
            loss = engine(batch).loss
            engine.backward(loss)
            if penalty and engine.is_gradient_accumulation_boundary():
                penalties.append(penalty.apply(engine))
            engine.step()
            window.add(loss, int(batch["num_tokens"]))
        step += 1
        closed = (None, None)
        if step % log_every == 0 or step == s.steps:
            loss, tok_s = window.close(device)
            closed = (loss, tok_s)
            if dist.get_rank() == 0:
                log.info("%s step %d/%d loss %.4f lr %.2e %.0f tok/s", spec.name, step, s.steps,
                         loss, engine.optimizer.param_groups[0]["lr"], tok_s)
            board.scalars(step, loss=loss, tokens_per_s=tok_s)
            metrics.update(loss=loss, tokens_per_s=window.steady(tok_s))
            metrics.setdefault("first_loss", loss)
            if penalties:  # the same on every rank
                mean = sum(penalties) / len(penalties)
                board.scalars(step, ewc_penalty=mean)
                metrics.update(ewc_penalty=mean)
                penalties.clear()
        if report:
            report(step, s.steps, *closed)
        if checkpointer and step % checkpoint_every == 0 and step < s.steps:
            checkpointer.save(engine, step, {"step": step, **{k: v for k, v in metrics.items()
                                                             if isinstance(v, (int, float))}})
    board.close()
    metrics.update(data_wait_s=data_wait, loop_s=time.perf_counter() - loop_start)
    return metrics


def export(cfg: RunConfig, spec: JobSpec, engine) -> None:
    """Write the trained LLM and connectors the spec names; collective over all ranks."""
    from mera_ds.model.ada import read_coefficients
    from mera_ds.storage import write_json
    from mera_ds.train.export import export_connectors, export_llm

    bucket = parse_size(os.environ.get("MERA_EXPORT_BUCKET", "64MB"))
    if spec.export_llm:
        export_llm(engine.module.llm, engine.module.tokenizer, spec.export_llm,
                   shard_size=parse_size(cfg.stages.merge.shard_size), bucket_bytes=bucket,
                   base=spec.init_llm or cfg.llm.path)
    if spec.export_connectors:
        export_connectors({m: engine.module.connectors[m] for m in spec.export_connectors},
                          spec.export_connectors)
    if spec.export_coefficients:
        fitted = read_coefficients(engine.module.llm)
        if dist.get_rank() == 0:
            write_json(spec.export_coefficients, fitted)
    dist.barrier()
