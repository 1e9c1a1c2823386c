"""The DeepSpeed runtime of a training job: process group, device, DeepSpeed config, resume
checkpoints, failure classification and TensorBoard. What a job trains is the recipe's
(mera_ds.train.recipe); this module knows nothing of the MLLM.

One process per rank, started by the `deepspeed` launcher, `torchrun`, a Ray Train worker or
alone (a single rank); the same code in all of them. Resumable state goes through a
:class:`Checkpointer` so that this module never imports Ray.
"""
from __future__ import annotations

import datetime
import gc
import logging
import math
import os
import shutil
import socket
import tempfile
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from mera_ds.config import RunConfig, TrainingSettings
from mera_ds.errors import MeraError
from mera_ds.storage import is_remote, url_to_fs

log = logging.getLogger("mera_ds.train")


# --- process group and device --------------------------------------------------------------------

def init_distributed(cfg: RunConfig) -> None:
    """Join (or, alone, create) the process group with an explicit timeout, so a dead peer or a
    hung collective ends in an error after cluster.timeout_s rather than a silent hang."""
    import deepspeed

    timeout = datetime.timedelta(seconds=cfg.cluster.timeout_s)
    backend = "nccl" if cfg.cluster.use_gpu else "gloo"
    if os.environ.get("MASTER_ADDR", "127.0.0.1").startswith("127.") or os.environ.get(
            "MASTER_ADDR") == "localhost":
        # All ranks on this host: keep gloo's sockets on loopback too (it otherwise binds to the
        # interface the host name resolves to).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # Under Ray Train the torch process group exists already (TorchConfig set its timeout);
    # deepspeed.init_distributed then only wraps it, which DeepSpeed needs to see the world size.
    if "RANK" not in os.environ and (not dist.is_initialized() or dist.get_world_size() == 1):
        # One process, no launcher: an in-memory store, so nothing listens on a port (a TCPStore
        # would listen on every interface, unauthenticated). DeepSpeed reads the variables, also
        # in a later job of the same process whose environment was reset.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    if cfg.cluster.use_gpu:
        # Fail fast on NCCL timeouts instead of leaving ranks blocked in a kernel.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        _without_shm_allreduce()
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


def _without_shm_allreduce() -> None:
    """On CPU, DeepSpeed's shared-memory all-reduce is JIT-compiled by every rank under a lock
    that a killed build leaves behind (every later job then waits on it forever), and it leaves a
    69 MB /dev/shm buffer per rank, named by address and port, that a later job on the same port
    meets half-written (ranks aborted). CPU runs are tests and demos: gloo's all-reduce serves."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def rank_addresses() -> list[str]:
    """Every rank's network address, in rank order (collective): the address of the interface it
    reaches rank 0 through. Recorded with a job's metrics, so a run says where its ranks ran."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master, 9))  # a UDP connect only picks the route; nothing is sent
            mine = s.getsockname()[0]
        except OSError:
            mine = socket.gethostname()
    addresses: list = [None] * dist.get_world_size()
    dist.all_gather_object(addresses, mine)
    return addresses


def shutdown_distributed() -> None:
    """Leave the process group together, at the end of a launcher's process: every rank waits for
    the others, then destroys it. A rank that exits while a peer still talks to it can be
    aborted by gloo at exit ("terminate called without an active exception"). The job's engine
    (DeepSpeed's hooks keep it in reference cycles) is collected first, while the group is whole,
    so that no object holding a process group is left for the interpreter's teardown."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def device_for(cfg: RunConfig) -> torch.device:
    if cfg.cluster.use_gpu:
        if not torch.cuda.is_available():
            raise MeraError("cluster.use_gpu is true but this worker sees no CUDA device")
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def deepspeed_config(cfg: RunConfig, settings: TrainingSettings, zero: bool = True) -> dict:
    """The JSON config from ds_configs/, with batch sizes and precision from the run config.
    zero=False: plain data parallelism (ZeRO stage 0, nothing offloaded), for a job whose model
    is replicated and whose trainable part is small."""
    ds = cfg.cluster.deepspeed
    if not zero:
        ds["zero_optimization"] = {"stage": 0}
    world = dist.get_world_size()
    ds["train_micro_batch_size_per_gpu"] = settings.micro_batch_size
    ds["gradient_accumulation_steps"] = settings.batch_size // (settings.micro_batch_size * world)
    ds["train_batch_size"] = settings.batch_size
    ds["gradient_clipping"] = settings.grad_clip
    ds["bf16"] = {"enabled": cfg.llm.dtype == "bfloat16"}
    ds["fp16"] = {"enabled": cfg.llm.dtype == "float16"}
    ds.setdefault("steps_per_print", 10**9)
    return ds


def device_memory(device: torch.device) -> int:
    """Bytes of memory one rank may use: its GPU's, or on CPU the host's shared by the ranks of
    this node."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def llm_bytes(cfg: RunConfig, path: str) -> int:
    """The size of the LLM of the directory `path` in cfg.llm.dtype, from its safetensors
    headers."""
    from mera_ds.io.reader import Checkpoint
    from mera_ds.model.llm import DTYPES

    return sum(math.prod(i.shape) for i in Checkpoint(path).infos.values()) * \
        DTYPES[cfg.llm.dtype].itemsize


def optimizer_for(groups: list[dict], ds_config: dict, device: torch.device):
    """AdamW over the param groups. With ZeRO-Offload (the optimizer on the CPU), DeepSpeed steps
    it there and takes only its own CPU Adam: it refuses torch's AdamW. The CPU Adam is a
    compiled op: prebuilt in the GPU image, JIT-built once per TORCH_EXTENSIONS_DIR elsewhere."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    if offload.get("device", "none") != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True)
    return torch.optim.AdamW(groups, fused=device.type == "cuda")


# --- failures ------------------------------------------------------------------------------------

def is_comm_failure(e: BaseException) -> bool:
    """A collective that failed or timed out: most often a peer rank that died."""
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, getattr(dist, "DistBackendError", ())) or any(
        k in text for k in ("timed out", "timeout", "connection closed", "connection reset",
                            "broken pipe", "gloo", "nccl"))


# --- resume state --------------------------------------------------------------------------------

class Checkpointer(Protocol):
    """Where a job keeps the state it resumes from after a failure."""

    def restore(self, engine) -> int:
        """Load the latest saved state into the engine; return the step to continue from."""

    def save(self, engine, step: int, metrics: dict) -> None:
        """Save the engine's state after `step` steps (collective: every rank calls it)."""


# What DeepSpeed pickles into its resume state besides tensors and containers (ZeRO-3; fp16 adds
# the dynamic loss scaler). Loading allows these and nothing else.
STATE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                 "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                 "deepspeed.runtime.zero.config.ZeroStageEnum")


def load_state_file(path: str, map_location=None):
    """torch.load of one resume-state file with weights_only: the run directory may be a shared
    bucket, and DeepSpeed's own load (weights_only=False) would run any pickle planted there."""
    import importlib
    import pickle

    allowed = []
    for name in STATE_GLOBALS:
        module, _, attr = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["unpickling refused"])[0]
        raise MeraError(f"{path}: resume state refused, it holds more than tensors and "
                        f"DeepSpeed's own state ({first})") from None


def restore_state(engine, directory: str) -> int:
    """Load the DeepSpeed checkpoint in `directory` into the engine (through
    :func:`load_state_file`); returns the step it was saved at."""
    engine.checkpoint_engine.load = load_state_file
    _, client = engine.load_checkpoint(directory)
    if client is None:
        raise MeraError(f"{directory}: no resume state DeepSpeed can read")
    return int(client["step"])


class DirCheckpointer:
    """DeepSpeed checkpoints in one local directory (shared by all ranks): the runs without Ray.

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
        return restore_state(engine, self.path)

    def save(self, engine, step: int, metrics: dict) -> None:
        engine.save_checkpoint(self.path, tag=f"step{step}", client_state={"step": step})
        if dist.get_rank() == 0:  # keep the newest only
            for name in os.listdir(self.path):
                if name.startswith("step") and name != f"step{step}":
                    shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
        dist.barrier()


# --- TensorBoard ---------------------------------------------------------------------------------

class Board:
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
