"""Connecting to Ray: a given cluster address, RAY_ADDRESS (set by `ray job submit`), or a local
instance on loopback."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("mera_ds.cluster")

# Passed to every Ray worker unless the user's environment already sets them. Never secrets: Ray
# writes a runtime_env in plain text to its logs on every node and keeps it with the job, so keys
# and tokens reach workers from their node's environment or credential files (a local instance's
# workers inherit this process's environment).
# The socket interfaces name the network gloo and NCCL use between nodes (the same name on every
# node, as on most clusters: ib0, eth0); without them gloo binds to whatever the host name
# resolves to, which on many nodes is 127.0.1.1 and unreachable from the others.
WORKER_ENV = ("DS_ACCELERATOR", "FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
              "HF_HOME", "HF_HUB_OFFLINE", "PYTHONPATH", "MERA_EXPORT_BUCKET", "MERA_CACHE_DIR",
              "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA")
SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "ACCESS_KEY", "API_KEY")


def is_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (a cloud key, a session or
    hub token, a password). Such values are never passed to Ray or put on a command line."""
    return any(m in name.upper() for m in SECRET_MARKERS)


def connect(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    if address is None and os.environ.get("RAY_ADDRESS"):
        # A driver started by `ray job submit`: the job's runtime_env (launch/submit.py) already
        # reaches the workers, and Ray refuses a second one.
        log.info("connecting to the Ray cluster of this job")
        ray.init(log_to_driver=True)
        return
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                 log_to_driver=True)
        return
    log.info("starting a local Ray instance on 127.0.0.1")
    # Ray swaps 127.0.0.1 for the host's outward address unless it is told the instance is one
    # node; a local run must stay on loopback. The env var reaches Ray's own processes, the
    # constant this one (Ray reads it at import).
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray Train's placement-group cleaner asks "the" state API of the machine: with no address
    # it scans `ps` for Ray instances (and fails beside another `mera` command's) or asks
    # 127.0.0.1:8265 (which another instance's dashboard may answer, about the wrong cluster).
    # A local instance runs no dashboard; port 1 refuses at once and the cleaner just waits.
    env["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:1"
    # "local": always a new instance, never one that `ray start` left in /tmp/ray.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
             num_cpus=num_cpus, runtime_env={"env_vars": env}, log_to_driver=True)
