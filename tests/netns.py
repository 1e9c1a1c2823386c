"""Two "nodes" on one machine: network namespaces node1 and node2 joined by a veth pair, eth0 in
each (10.233.91.1/24 and 10.233.91.2/24, lo up, no other route). What the multi-node tests and
the measurements of bench/multinode_bench.py run on; needs root and `ip netns`.

    python -m tests.netns up      # create them (stale ones of the same names removed first)
    python -m tests.netns down    # kill what runs in them, remove them

Nothing here touches the root namespace's interfaces or routes: both ends of the veth are inside
the namespaces, so no traffic of theirs leaves them.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

NODES = ("node1", "node2")
SUBNET = "10.233.91"
IFACE = "eth0"


def address(node: str) -> str:
    return f"{SUBNET}.{NODES.index(node) + 1}"


def unavailable() -> Optional[str]:
    """Why network namespaces cannot be used here (None if they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is not available"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def pids(node: str) -> list[int]:
    """The processes whose network namespace is `node`'s."""
    out = _ip("netns", "pids", node, check=False).stdout
    return [int(p) for p in out.split()]


def kill_all(node: str, timeout: float = 10) -> list[int]:
    """SIGTERM then SIGKILL every process in `node`; returns those it found."""
    found = pids(node)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids(node):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while pids(node) and time.time() < deadline:
            time.sleep(0.1)
        if not pids(node):
            break
    return found


def up(nodes: tuple[str, ...] = NODES) -> None:
    """Create the namespaces, removing stale ones of the same names first."""
    down(nodes)
    a, b = nodes
    for n in nodes:
        _ip("netns", "add", n)
    # Temporary names in the root namespace, unique to this process; eth0 once inside.
    va, vb = f"mv{os.getpid()}a", f"mv{os.getpid()}b"
    _ip("link", "add", va, "type", "veth", "peer", "name", vb)
    for n, v in ((a, va), (b, vb)):
        _ip("link", "set", v, "netns", n)
        _ip("-n", n, "link", "set", v, "name", IFACE)
        _ip("-n", n, "addr", "add", f"{address(n)}/24", "dev", IFACE)
        _ip("-n", n, "link", "set", IFACE, "up")
        _ip("-n", n, "link", "set", "lo", "up")


def down(nodes: tuple[str, ...] = NODES) -> None:
    """Kill whatever runs in the namespaces and remove them (the veth goes with them)."""
    existing = _ip("netns", "list", check=False).stdout.split()
    for n in nodes:
        if n in existing:
            kill_all(n)
            _ip("netns", "del", n, check=False)


def exec_in(node: str, *cmd: str) -> list[str]:
    """A command line that runs `cmd` in `node`."""
    return ["ip", "netns", "exec", node, *cmd]


def counters(node: str) -> dict[str, int]:
    """{"tx": bytes, "rx": bytes} of `node`'s eth0."""
    out = subprocess.run(exec_in(node, "cat", f"/sys/class/net/{IFACE}/statistics/tx_bytes",
                                 f"/sys/class/net/{IFACE}/statistics/rx_bytes"),
                         capture_output=True, text=True, check=True).stdout.split()
    return {"tx": int(out[0]), "rx": int(out[1])}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("up", "down"):
        sys.exit("usage: python -m tests.netns up|down")
    reason = unavailable()
    if reason:
        sys.exit(f"netns: {reason}")
    (up if sys.argv[1] == "up" else down)()
