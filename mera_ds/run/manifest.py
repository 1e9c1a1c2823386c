"""RUN/manifest.json: what a run is (the modality order, the method, the config it was started
with) and the steps it finished.

It is written when a run starts and again after every step, each time whole, so `mera report`
rebuilds the run's layout from it and a resumed run skips what is recorded. Whatever an
interrupted step left behind is not recorded, hence not trusted: it is removed before the step
runs again. Both executors (in-process and Ray) and the benchmark use it the same way. Under a
launcher every rank runs a step; rank 0 alone clears and records.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import threading
import time
from typing import Any

from mera_ds.config import RunConfig, default_of, parse_config
from mera_ds.errors import MeraError
from mera_ds.run.layout import RunLayout
from mera_ds.storage import exists, read_json, remove, write_json

log = logging.getLogger("mera_ds.manifest")

VERSION = 2


class Manifest:
    def __init__(self, url: str, about: dict, steps: dict):
        self.url, self.about, self.steps = url, about, steps
        self.timings: dict[str, float] = {}  # seconds of the steps run by this process
        self.lock = threading.Lock()

    @classmethod
    def open(cls, layout: RunLayout, cfg: RunConfig, method: str, resume: bool) -> "Manifest":
        """The manifest of a new run (written now), or with `resume` of the run already in
        layout.run_dir, which must have the same config, order and method ("mera" for a run,
        "mcl" for a benchmark)."""
        url = layout.manifest
        about = {"order": list(layout.order), "method": method, "config": cfg.fingerprint()}
        old = read(url) if exists(url) else None
        if old is None or (not old.steps and not resume):  # nothing done yet: start afresh
            if exists(layout.stages_dir) or exists(layout.chains_dir):
                if not resume:
                    raise MeraError(f"{layout.run_dir}: holds stages but no manifest; run with "
                                    f"--resume to continue it, or choose another run_dir")
                log.warning("%s: no manifest; every step runs again", layout.run_dir)
            manifest = cls(url, about, {})
            manifest._write()
            return manifest
        if not resume:
            raise MeraError(f"{layout.run_dir}: a run is already there "
                            f"({len(old.steps)} steps done); add --resume to continue it, "
                            f"or choose another run_dir")
        for field in ("order", "method"):
            if old.about[field] != about[field]:
                raise MeraError(f"{url}: the run's {field} is {old.about[field]!r}, not "
                                f"{about[field]!r}; choose another run_dir")
        # A setting the run's mera-ds did not have yet, at its default, computes what it did.
        was, now = old.about["config"], about["config"]
        changed = sorted(k for k in set(was) | set(now)
                         if was.get(k, default_of(k)) != now.get(k))
        if changed:
            k = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise MeraError(f"{url}: the config changed since this run started: {k} was "
                            f"{was.get(k)!r}, is {now.get(k)!r}{more}")
        return cls(url, about, old.steps)

    def config(self) -> RunConfig:
        """The run config the run was started with (recorded as RunConfig.fingerprint(): flat
        dotted keys), with the defaults for the settings it leaves out (where the run ran:
        cluster.ray_address...)."""
        flat = dict(self.about["config"])
        # The DeepSpeed JSON the run read (a local path where it ran) plans nothing and may not
        # be on this machine: parsed without it, then put back unchecked, so the fingerprint and
        # the digest stay the run's.
        deepspeed = flat.pop("cluster.deepspeed_config", None)
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            *parents, last = key.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        cfg = parse_config(nested, self.url)
        if deepspeed is None:
            return cfg
        return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(
            update={"deepspeed_config": deepspeed})})

    def _write(self) -> None:
        if _recording():
            write_json(self.url, {"version": VERSION, **self.about, "steps": self.steps})

    def run(self, name: str, outputs: tuple[str, ...], fn, *args, **kwargs) -> dict:
        """Run step `name` unless it is recorded: first remove whatever an interrupted attempt
        left at `outputs`, then call fn(*args, **kwargs) and record its result (a dict or a
        dataclass). Returns the result, recorded earlier or now."""
        if name in self.steps:
            log.info("%s: done earlier, skipped", name)
            return self.steps[name]["result"]
        if _recording():
            for url in outputs:
                _remove(url)
        t0 = time.time()
        result = fn(*args, **kwargs)
        if dataclasses.is_dataclass(result):
            result = dataclasses.asdict(result)
        t1 = time.time()
        with self.lock:  # steps that run side by side end in any order
            self.timings[name] = t1 - t0
            self.steps[name] = {"outputs": list(outputs), "result": result,
                                "seconds": t1 - t0, "started": _iso(t0), "finished": _iso(t1)}
            self._write()
        return result


def read(url: str) -> Manifest:
    """A run's manifest as it is on storage (for the report and resumes)."""
    data = read_json(url)
    if not isinstance(data, dict):
        raise MeraError(f"{url}: not a mera-ds manifest (a JSON {type(data).__name__})")
    for key, kind in (("order", list), ("method", str), ("config", dict), ("steps", dict)):
        if key not in data:
            raise MeraError(f"{url}: not a mera-ds manifest of version {VERSION} (no {key!r})")
        if not isinstance(data[key], kind) or (key == "order" and not all(
                isinstance(m, str) for m in data[key])):
            raise MeraError(f"{url}: {key!r} is not a JSON {kind.__name__}"
                            f"{' of modality names' if key == 'order' else ''}")
    return Manifest(url, {k: data[k] for k in ("order", "method", "config")}, data["steps"])


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()


def _recording() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _remove(url: str) -> None:
    if remove(url):
        log.warning("removed %s: left by an interrupted step, not in the manifest", url)
