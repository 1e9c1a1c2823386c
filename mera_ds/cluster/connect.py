"""Connecting to Ray: a given cluster address, RAY_ADDRESS (set by `ray job submit`), or a local
instance on loopback; and the relay from a step's processes on the cluster back to this driver's
console (mera_ds.run.console): their progress and warnings."""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from typing import Callable, Iterator

from mera_ds.run.console import tell

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
RELAY_EVENTS = 1000      # held by the relay between two polls of the driver; older ones dropped
RELAY_PENDING = 100      # a process's calls to the relay not yet taken; more are dropped
RELAY_POLL_S = 0.5


def is_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (a cloud key, a session or
    hub token, a password). Such values are never passed to Ray or put on a command line."""
    return any(m in name.upper() for m in SECRET_MARKERS)


def connect(address: str | None, num_cpus: int | None = None, quiet: bool = False) -> None:
    """ray.init. `quiet`: Ray's own logs and its workers' output go to this process's log
    (RUN/logs/mera.log), not the console."""
    import ray

    if ray.is_initialized():
        return
    if quiet:
        _ray_logs_to_root()
    _init(address, num_cpus)
    if quiet:
        _ray_logs_to_root()
        _worker_output_to_log()


def _init(address: str | None, num_cpus: int | None) -> None:
    import ray

    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    if address is None and os.environ.get("RAY_ADDRESS"):
        # A driver started by `ray job submit`: the job's runtime_env (launch/submit.py) already
        # reaches the workers, and Ray refuses a second one.
        tell("connecting to the Ray cluster of this job")
        ray.init(log_to_driver=True)
        return
    if address:
        tell(f"connecting to the Ray cluster at {address}")
        ray.init(address=address, runtime_env={"env_vars": env} if env else None,
                 log_to_driver=True)
        return
    tell("starting a local Ray instance on 127.0.0.1")
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


def _ray_logs_to_root() -> None:
    """Ray's loggers print to the console themselves: through the root logger's handlers
    instead (a quiet console leaves them to the log)."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name == "ray" or name.startswith("ray.")) and isinstance(logger, logging.Logger):
            for h in logger.handlers[:]:
                if isinstance(h, logging.StreamHandler) and not isinstance(
                        h, logging.FileHandler):
                    logger.removeHandler(h)
            logger.propagate = True


def _worker_output_to_log() -> None:
    """What Ray forwards of its processes' output (its controllers', its workers' before their
    step's log file takes it) goes to the logger "ray.output", not the console. Ray has no public
    hook for this: the handler of its dispatcher is swapped."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    from ray._private.worker import filter_autoscaler_events

    out = logging.getLogger("ray.output")

    def to_log(data: dict) -> None:
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its status every few seconds: its events only
            lines = filter_autoscaler_events(lines)
        who = data.get("actor_name") or data.get("task_name") or ""
        for line in lines:
            out.info("(%s pid=%s) %s", who, data.get("pid"), line)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("mera", to_log)


class Relay:
    """Events from a step's processes on the cluster (progress, warnings) to the driver, which
    takes them every RELAY_POLL_S: a small actor the driver creates, reachable from any node."""

    def __init__(self):
        self.events = collections.deque(maxlen=RELAY_EVENTS)

    def put(self, event: tuple) -> None:
        self.events.append(event)

    def take(self) -> list:
        events = list(self.events)
        self.events.clear()
        return events


def start_relay():
    """A Relay actor owned by this driver (it ends with it)."""
    import ray

    return ray.remote(num_cpus=0)(Relay).options(max_pending_calls=RELAY_PENDING).remote()


def send(relay, *event) -> None:
    """An event to the driver, from any process of the cluster: never waits (the call is not
    awaited) and never fails; dropped when RELAY_PENDING calls of this process are pending."""
    from ray.exceptions import PendingCallsLimitExceeded

    with contextlib.suppress(PendingCallsLimitExceeded):
        relay.put.remote(event)


@contextlib.contextmanager
def relaying(relay, deliver: Callable[[tuple], None]) -> Iterator[None]:
    """While the block runs, a thread of this driver takes the relay's events to `deliver`;
    those that came before the block ends are delivered when it ends."""
    import ray

    stop = threading.Event()

    def poll() -> None:
        while True:
            stopping = stop.wait(RELAY_POLL_S)
            try:
                events = ray.get(relay.take.remote())
            except Exception as e:  # noqa: BLE001 - progress is best effort; never the step
                log.debug("relay: %s", e)
                return
            for event in events:
                deliver(event)
            if stopping:
                return

    thread = threading.Thread(target=poll, name="mera-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
