"""Run a command as a child process; measure its wall time and memory high-water marks.

Memory figures, from /proc, sampled every 20 ms over the child and all its descendants:
- hwm_mb: the largest VmHWM of any one process of the tree (the kernel's own RSS high-water mark
  of that process's memory, so no peak between samples is missed; read at the last sample
  before the process exits, so its last 20 ms can be);
- tree_rss_mb: the peak of the summed RSS of the tree (what several worker processes hold
  together; shared pages are counted once per process);
- tree_anon_mb: the same for anonymous RSS only, leaving out pages of mapped files (an mmap'd
  safetensors file counts in RSS while mapped, but is page cache the kernel can drop).
wait4()'s ru_maxrss is not used: a child inherits its parent's value at fork.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass


@dataclass
class Measured:
    seconds: float
    returncode: int
    hwm_mb: float
    tree_rss_mb: float
    tree_anon_mb: float


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and VmHWM of a process, in kB (empty once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "RssAnon", "VmHWM"):
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def run_measured(cmd: list[str], env: dict | None = None, log_path: str | None = None,
                 interval: float = 0.02) -> Measured:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    peak = {"rss": 0, "anon": 0, "hwm": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            todo, rss, anon = [proc.pid], 0, 0
            while todo:
                pid = todo.pop()
                st = _status(pid)
                rss, anon = rss + st.get("VmRSS", 0), anon + st.get("RssAnon", 0)
                peak["hwm"] = max(peak["hwm"], st.get("VmHWM", 0))
                todo += _children(pid)
            peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    returncode = proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if log_path:
        out.close()
    return Measured(seconds, returncode, peak["hwm"] / 1024, peak["rss"] / 1024,
                    peak["anon"] / 1024)
