"""RUN/manifest.json: the config a run was started with and the stages it finished.

A stage is recorded, with its outputs and result, after it finished, and the manifest is written
last, so a resumed run skips what is recorded and re-runs the rest. Whatever an interrupted stage
left behind is not recorded, hence not trusted: it is removed before the stage runs again. Used by
the Ray pipeline driver and the single-process MCL benchmark alike.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import time

from mera_ds.config import RunConfig
from mera_ds.errors import MeraError
from mera_ds.layout import RunLayout
from mera_ds.storage import exists, join, read_json, url_to_fs, write_json

log = logging.getLogger("mera_ds.manifest")

# Settings that may change between a run and its resume: where it runs, not what it computes.
NOT_HASHED = {("cluster", "ray_address")}


def _flat(d: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in d.items():
        key = prefix + (k,)
        if isinstance(v, dict):
            out.update(_flat(v, key))
        elif key not in NOT_HASHED:
            out[key] = v
    return out


def _fingerprint(cfg: RunConfig) -> dict:
    return {".".join(k): v for k, v in _flat(cfg.model_dump(mode="json")).items()}


class Manifest:
    """RUN/manifest.json: the config the run was started with and the stages it finished."""

    def __init__(self, url: str, config: dict, stages: dict):
        self.url, self.config, self.stages = url, config, stages
        self.timings: dict[str, float] = {}

    @classmethod
    def open(cls, cfg: RunConfig, resume: bool) -> "Manifest":
        layout = RunLayout.of(cfg)
        url, config = layout.manifest, _fingerprint(cfg)
        if not exists(url):
            if exists(join(layout.run_dir, "stages")):
                if not resume:
                    raise MeraError(f"{layout.run_dir}: holds stages but no manifest; run with "
                                    f"--resume to continue it, or choose another run_dir")
                log.warning("%s: no manifest; every stage runs again", layout.run_dir)
            return cls(url, config, {})
        data = read_json(url)
        if not resume:
            raise MeraError(f"{layout.run_dir}: a run is already there "
                            f"({len(data['stages'])} stages done); add --resume to continue it, "
                            f"or choose another run_dir")
        changed = sorted(k for k in set(config) | set(data["config"])
                         if config.get(k) != data["config"].get(k))
        if changed:
            k = changed[0]
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise MeraError(f"{url}: the config changed since this run started: {k} was "
                            f"{data['config'].get(k)!r}, is {config.get(k)!r}{more}")
        return cls(url, config, data["stages"])

    def record(self, name: str, outputs: list[str], result: dict, seconds: float) -> None:
        self.stages[name] = {"outputs": outputs, "result": result, "seconds": seconds,
                             "finished": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        write_json(self.url, {"version": 1, "config": self.config, "stages": self.stages})

    def run(self, name: str, outputs: list[str], fn, *args, **kwargs) -> dict:
        """Run stage `name` unless it is recorded: first remove whatever an interrupted attempt
        left at `outputs`, then call fn(*args, **kwargs) and record its result (a dict or a
        dataclass). Returns the result, recorded earlier or now; self.timings holds the seconds
        of the stages run now."""
        if name in self.stages:
            log.info("%s: done earlier, skipped", name)
            return self.stages[name]["result"]
        for url in outputs:
            _remove(url)
        t0 = time.time()
        result = fn(*args, **kwargs)
        if dataclasses.is_dataclass(result):
            result = dataclasses.asdict(result)
        self.timings[name] = time.time() - t0
        self.record(name, outputs, result, self.timings[name])
        return result


def _remove(url: str) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        log.warning("removing %s: left by an interrupted stage, not in the manifest", url)
        fs.rm(path, recursive=True)
