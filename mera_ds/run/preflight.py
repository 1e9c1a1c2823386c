"""Checks before any step of a run starts, so that a mistake costs seconds rather than a started
job (and its Ray retries): every shard the steps read exists and there are enough of them for the
training ranks, the LLM and encoder paths exist, the run directory's bucket exists and the Ray
cluster given is listening. The run's manifest is not written before these pass; what needs the
cluster (:func:`check_nodes`) is checked when the executor connects, before its first step."""
from __future__ import annotations

import socket
from typing import Iterable, Optional

from mera_ds import storage
from mera_ds.config import RunConfig
from mera_ds.data.tar import existing_shards
from mera_ds.errors import MeraError
from mera_ds.model.node_cache import check_model_dir, is_local_path
from mera_ds.run.plan import EvalSpec, ReplaySpec, Step
from mera_ds.train.recipe import JobSpec


def preflight(cfg: RunConfig, steps: Iterable[Step], ranks: Optional[int] = None,
              ray_address: Optional[str] = None) -> None:
    """Raise a one-line MeraError for the first input of `steps` that is missing. `ranks`: the
    processes of every training job under a launcher (None: on Ray, each phase's workers); each
    needs a shard of its own. `ray_address`: a cluster the steps will run on."""
    steps = list(steps)
    for pattern, readers in _shard_patterns(cfg, steps, ranks):
        urls = existing_shards(pattern)
        if len(urls) < readers:
            raise MeraError(f"{pattern}: {len(urls)} shard(s) for {readers} training ranks; "
                            f"every rank needs a shard of its own (write more, smaller shards)")
    modalities = {s.modality for s in steps} | {m for s in steps if isinstance(s.spec, EvalSpec)
                                                for m in s.spec.connectors}
    _model_path("llm.path", cfg.llm.path)
    for i, m in enumerate(cfg.modalities):
        if m.name in modalities:
            _model_path(f"modalities[{i}].encoder.path", m.encoder.path)
    if storage.is_remote(cfg.run_dir):
        bucket = cfg.run_dir.split("://", 1)[1].split("/", 1)[0]
        if not storage.exists(f"{cfg.run_dir.split('://', 1)[0]}://{bucket}"):
            raise MeraError(f"{cfg.run_dir}: no such bucket {bucket!r} (run_dir)")
    if ray_address:
        _listening(ray_address)


def _shard_patterns(cfg: RunConfig, steps: list[Step],
                    ranks: Optional[int]) -> list[tuple[str, int]]:
    """(pattern, the most training ranks that read it at once; 0: none) of every shard pattern
    the steps read, once each. Replay sets are left out: an earlier step writes them."""
    seen: dict[str, int] = {}
    for step in steps:
        spec = step.spec
        if isinstance(spec, JobSpec):
            for d in spec.data:
                if isinstance(d, str):
                    seen[d] = max(seen.get(d, 0), ranks or cfg.workers(spec.phase))
        elif isinstance(spec, ReplaySpec):
            seen.setdefault(spec.source, 0)
        elif isinstance(spec, EvalSpec):
            for m in spec.connectors:
                seen.setdefault(cfg.modality(m).eval_shards, 0)
    return list(seen.items())


def _model_path(field: str, path: Optional[str]) -> None:
    if path is not None:
        try:
            check_model_dir(path)
        except MeraError as e:
            raise MeraError(f"{field}: {e}") from None


def _listening(address: str) -> None:
    """A Ray address (host:port or ray://host:port, "auto" excepted) accepts connections."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise MeraError(f"cluster.ray_address {address}: no Ray cluster there "
                        f"({type(e).__name__}: {e})") from None


def check_nodes(cfg: RunConfig, nodes: int) -> None:
    """On a cluster of `nodes` nodes, local paths must be declared shared: a worker on another
    node would otherwise read shards or models that are not there, or write artifacts where the
    next step cannot read them."""
    if nodes < 2 or cfg.cluster.shared_filesystem:
        return
    paths = [("run_dir", cfg.run_dir), ("llm.path", cfg.llm.path)]
    for i, m in enumerate(cfg.modalities):
        paths += [(f"modalities[{i}].train_shards", m.train_shards),
                  (f"modalities[{i}].eval_shards", m.eval_shards),
                  (f"modalities[{i}].encoder.path", m.encoder.path)]
    for field, path in paths:
        if path and is_local_path(path):
            raise MeraError(f"{field} {path}: a local path, and the Ray cluster has {nodes} "
                            f"nodes; use s3://, or a filesystem every node mounts and set "
                            f"cluster.shared_filesystem: true")

