"""The training job that align, finetune and realign share: DeepSpeed ZeRO-3 over the MLLM.

One process per rank, started by the `deepspeed` launcher, `torchrun` or a Ray Train worker; the
same code in all three. What differs between the stages (what trains, at which learning rate, on
which data, what is exported) is a :class:`JobSpec`. Resumable state goes through a
:class:`Checkpointer` so that this module never imports Ray.
"""
from __future__ import annotations

import datetime
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
import torch.distributed as dist

from mera_ds.config import RunConfig, _Training, parse_size, resolve_path
from mera_ds.errors import MeraError
from mera_ds.storage import is_remote, url_to_fs

log = logging.getLogger("mera_ds.train")


@dataclass
class JobSpec:
    stage: str                                  # align | finetune | realign
    modality: str                               # the stage's modality m_i
    learned: list[str]                          # modalities whose connectors the model holds
    train_llm: bool
    train_connectors: list[str]
    data: list[str]                             # shard patterns; several are mixed
    settings: _Training
    lr_llm: float
    lr_connector: float
    init_llm: Optional[str]                     # LLM directory; None: the config's llm
    init_connectors: dict[str, str] = field(default_factory=dict)
    data_weights: Optional[list[float]] = None  # mixing weights of `data` (default uniform)
    export_llm: Optional[str] = None            # HF directory to write the trained LLM to
    export_connectors: dict[str, str] = field(default_factory=dict)
    tensorboard: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.modality}"


class Checkpointer(Protocol):
    """Where a job keeps the state it resumes from after a failure."""

    def restore(self, engine) -> int:
        """Load the latest saved state into the engine; return the step to continue from."""

    def save(self, engine, step: int, metrics: dict) -> None:
        """Save the engine's state after `step` steps (collective: every rank calls it)."""


class DirCheckpointer:
    """DeepSpeed checkpoints in one local directory (shared by all ranks): the launcher runs.

    DeepSpeed writes its resume state with torch.save; it is private to the job that wrote it and
    deleted once the job's artifacts are committed. Artifacts themselves are safetensors.
    """

    def __init__(self, path: str):
        if is_remote(path):
            raise MeraError(f"{path}: resume state needs a local or shared directory; "
                            f"run through Ray (storage_path) to keep it on S3")
        self.path = path

    def restore(self, engine) -> int:
        if not os.path.exists(os.path.join(self.path, "latest")):
            return 0
        _, client = engine.load_checkpoint(self.path)
        return int(client["step"])

    def save(self, engine, step: int, metrics: dict) -> None:
        engine.save_checkpoint(self.path, tag=f"step{step}", client_state={"step": step})
        if dist.get_rank() == 0:  # keep the newest only
            for name in os.listdir(self.path):
                if name.startswith("step") and name != f"step{step}":
                    shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# process group


def init_distributed(cfg: RunConfig) -> None:
    """Join (or, alone, create) the process group with an explicit timeout, so a dead peer or a
    hung collective ends in an error after cluster.timeout_s rather than a silent hang."""
    import deepspeed

    # Under Ray Train the torch process group exists already (TorchConfig set its timeout);
    # deepspeed.init_distributed then only wraps it, which DeepSpeed needs to see the world size.
    if not dist.is_initialized() and "RANK" not in os.environ:  # one process, no launcher
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if os.environ.get("MASTER_ADDR", "").startswith("127.") or os.environ.get(
            "MASTER_ADDR") == "localhost":
        # All ranks on this host: keep gloo's sockets on loopback too (it otherwise binds to the
        # interface the host name resolves to).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if cfg.cluster.use_gpu:
        # Fail fast on NCCL timeouts instead of leaving ranks blocked in a kernel.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    deepspeed.init_distributed(dist_backend="nccl" if cfg.cluster.use_gpu else "gloo",
                               timeout=datetime.timedelta(seconds=cfg.cluster.timeout_s))


def device_for(cfg: RunConfig) -> torch.device:
    if cfg.cluster.use_gpu:
        if not torch.cuda.is_available():
            raise MeraError("cluster.use_gpu is true but this worker sees no CUDA device")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def deepspeed_config(cfg: RunConfig, spec: JobSpec) -> dict:
    """The JSON config from ds_configs/, with batch sizes and precision from the run config."""
    import json

    with open(resolve_path(cfg.cluster.deepspeed_config)) as f:
        ds = json.load(f)
    s = spec.settings
    world = dist.get_world_size()
    ds["train_micro_batch_size_per_gpu"] = s.micro_batch_size
    ds["gradient_accumulation_steps"] = s.batch_size // (s.micro_batch_size * world)
    ds["train_batch_size"] = s.batch_size
    ds["gradient_clipping"] = s.grad_clip
    ds["bf16"] = {"enabled": cfg.llm.dtype == "bfloat16"}
    ds["fp16"] = {"enabled": cfg.llm.dtype == "float16"}
    ds.setdefault("steps_per_print", 10**9)
    return ds


def lr_factor(step: int, settings: _Training) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


class _Board:
    """TensorBoard on rank 0. S3 run dirs: written locally, uploaded when the job ends."""

    def __init__(self, url: Optional[str]):
        self.url, self.writer, self.local = url, None, None
        if url is None or dist.get_rank() != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.local = tempfile.mkdtemp(prefix="mera-tb-") if is_remote(url) else url
        self.writer = SummaryWriter(self.local)

    def scalars(self, step: int, **values: float) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if not self.writer:
            return
        self.writer.close()
        if self.local != self.url:
            fs, path = url_to_fs(self.url)
            fs.put(self.local, path, recursive=True)
            shutil.rmtree(self.local, ignore_errors=True)


def _comm_failure(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, getattr(dist, "DistBackendError", ())) or any(
        k in text for k in ("timed out", "timeout", "connection closed", "connection reset",
                            "broken pipe", "gloo", "nccl"))


def run_job(cfg: RunConfig, spec: JobSpec, checkpointer: Optional[Checkpointer] = None,
            checkpoint_every: Optional[int] = None,
            observe: Optional[Callable[[str, object], None]] = None) -> dict:
    """Train per `spec`, export its artifacts, and return the job's metrics (on every rank).

    `observe(event, engine)` is called on every rank at "start" (after a resume) and at "end"
    (before the export): for callers that inspect or log the engine.
    """
    init_distributed(cfg)
    rank = dist.get_rank()
    try:
        return _run(cfg, spec, checkpointer, checkpoint_every, observe)
    except MeraError:
        raise
    except Exception as e:
        if _comm_failure(e):
            raise MeraError(
                f"stage {spec.name}: rank {rank}: a collective failed or timed out "
                f"(cluster.timeout_s={cfg.cluster.timeout_s}); a peer rank probably died: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        raise


def _run(cfg: RunConfig, spec: JobSpec, checkpointer, checkpoint_every, observe) -> dict:
    import warnings

    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from mera_ds.data.shards import make_loader, make_mixed_loader
    from mera_ds.model.connectors import load_connector
    from mera_ds.model.llm import DTYPES, build_llm
    from mera_ds.model.mllm import Collator, build_mllm, param_groups, set_trainable
    from mera_ds.stages.export import export_connectors, export_llm

    rank, world = dist.get_rank(), dist.get_world_size()
    # DeepSpeed calls torch's renamed collectives on every step: one warning per call otherwise.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    device = device_for(cfg)
    torch.manual_seed(cfg.seed)
    ds_config = deepspeed_config(cfg, spec)
    s = spec.settings
    accum = ds_config["gradient_accumulation_steps"]

    # The LLM is created partitioned (zero.Init through transformers' DeepSpeed integration):
    # no rank ever holds all of it. Encoders and connectors are built outside that scope.
    hf_ds = HfDeepSpeedConfig(ds_config)
    try:
        llm, tokenizer = build_llm(cfg.llm, path=spec.init_llm)
    finally:
        unset_hf_deepspeed_config()
        del hf_ds
    mllm = build_mllm(cfg, modalities=spec.learned, llm=llm, tokenizer=tokenizer)
    for m, url in spec.init_connectors.items():
        load_connector(mllm.connectors[m], url)
    set_trainable(mllm, llm=spec.train_llm, connectors=spec.train_connectors)
    # One dtype for the whole model: DeepSpeed flattens trainable partitions into one buffer.
    mllm.to(device=device, dtype=DTYPES[cfg.llm.dtype])

    groups = param_groups(mllm, lr_llm=spec.lr_llm, lr_connector=spec.lr_connector,
                          weight_decay=s.weight_decay)
    for g in groups:
        g["initial_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda")
    engine, optimizer, _, _ = deepspeed.initialize(model=mllm, optimizer=optimizer,
                                                   config=ds_config)
    start = checkpointer.restore(engine) if checkpointer else 0
    if start:
        log.info("%s: resuming at step %d of %d", spec.name, start, s.steps)
    if observe:
        observe("start", engine)

    collate = Collator(mllm, train=True, pack=s.packing)
    common = dict(batch_size=s.micro_batch_size, collate_fn=collate,
                  num_steps=max(0, s.steps - start) * accum, rank=rank, world_size=world,
                  seed=cfg.seed * 1_000_003 + start, num_workers=cfg.data.loader_workers,
                  on_corrupt=cfg.data.on_corrupt, shuffle_buffer=cfg.data.shuffle_buffer)
    loader = (make_loader(spec.data[0], **common) if len(spec.data) == 1
              else make_mixed_loader(spec.data, spec.data_weights, **common))

    board = _Board(spec.tensorboard)
    engine.train()
    every = checkpoint_every or max(1, s.steps // 4)
    log_every = max(1, s.steps // 20)
    metrics = {"stage": spec.stage, "modality": spec.modality, "steps": s.steps,
               "resumed_at": start}
    # Throughput: per log window, and steady (every window after the first, which holds the
    # warm-up); each window ends in an all_reduce, so device work is finished when timed.
    step, losses, tokens, t0 = start, [], 0, time.time()
    steady_tokens, steady_time, windows = 0, 0.0, 0
    batches = iter(loader)
    while step < s.steps:
        for g in engine.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, s)
        for _ in range(accum):
            try:
                batch = next(batches)
            except StopIteration:
                raise MeraError(f"stage {spec.name}: the data ran out at step {step} "
                                f"({spec.data})") from None
            batch = to_device(batch, device)
            loss = engine(batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            tokens += int(batch["num_tokens"])
        step += 1
        if step % log_every == 0 or step == s.steps:
            mean = torch.stack(losses).mean().to(device)
            dist.all_reduce(mean)
            mean = float(mean) / world
            elapsed = time.time() - t0
            tok_s = tokens * world / max(elapsed, 1e-9)
            if rank == 0:
                log.info("%s step %d/%d loss %.4f lr %.2e %.0f tok/s", spec.name, step, s.steps,
                         mean, engine.optimizer.param_groups[0]["lr"], tok_s)
            windows += 1
            if windows > 1:
                steady_tokens, steady_time = steady_tokens + tokens * world, steady_time + elapsed
            board.scalars(step, loss=mean, tokens_per_s=tok_s)
            metrics.update(loss=mean, tokens_per_s=steady_tokens / steady_time if steady_time
                           else tok_s)
            metrics.setdefault("first_loss", mean)
            losses, tokens, t0 = [], 0, time.time()
        if checkpointer and step % every == 0 and step < s.steps:
            checkpointer.save(engine, step, {"step": step, **{k: v for k, v in metrics.items()
                                                             if isinstance(v, (int, float))}})
    board.close()
    if observe:
        observe("end", engine)

    bucket = parse_size(os.environ.get("MERA_EXPORT_BUCKET", "64MB"))
    if spec.export_llm:
        export_llm(engine.module.llm, engine.module.tokenizer, spec.export_llm,
                   shard_size=parse_size(cfg.stages.merge.shard_size), bucket_bytes=bucket)
    if spec.export_connectors:
        export_connectors({m: engine.module.connectors[m] for m in spec.export_connectors},
                          spec.export_connectors)
    dist.barrier()
    return metrics


def launcher_main(make_spec) -> None:
    """Entry point under the `deepspeed` launcher or `torchrun`: one process per rank.

        deepspeed --num_gpus 8 --module mera_ds.stages.finetune --config C --modality M
        torchrun --nproc_per_node 2 -m mera_ds.stages.finetune --config C --modality M
    """
    import argparse
    import json
    import sys

    from mera_ds.config import absolute, load_config
    from mera_ds.layout import RunLayout

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--modality", required=True)
    p.add_argument("--run", help="run directory (default: the config's run_dir)")
    p.add_argument("--checkpoint-every", type=int)
    args, _ = p.parse_known_args()  # the deepspeed launcher adds --local_rank
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config)
        if args.run:
            cfg = cfg.model_copy(update={"run_dir": absolute(args.run)})
        spec = make_spec(cfg, args.modality)
        init_distributed(cfg)
        state = RunLayout.of(cfg).train_state(args.modality, spec.stage)
        metrics = run_job(cfg, spec, DirCheckpointer(state), args.checkpoint_every)
        if dist.get_rank() == 0:
            shutil.rmtree(state, ignore_errors=True)
            print(json.dumps(metrics))
    except MeraError as e:
        print(f"mera: error: {e}", file=sys.stderr)
        sys.exit(2)
