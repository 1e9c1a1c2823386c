"""Fault injection: the two-stage run of test_pipeline with its shards and run directory on S3,
reached through a proxy that answers a seeded share of requests with 503s, throttling, 500s,
connection resets and slow answers, while a chaos thread SIGKILLs a Ray Train worker in each
stage's finetune and the merge actor during the merge. Nothing is lost: every step is recorded,
nothing half-written or temporary is left, and the performance matrix is the clean run's, to
the bit (resumes are exact)."""
import json
import os
import signal
import subprocess
import threading
import time

import pytest
import s3fs
import yaml

from mera_ds.config import parse_config
from mera_ds.run.layout import RunLayout
from tests.conftest import (ancestors, default_config, mera_env, mera_run, ray_train_worker_of,
                            two_modalities)
from tests.fault_proxy import FaultProxy

FAULT_RATE = 0.05


class Chaos(threading.Thread):
    """Kills, in order: a training worker of stage 1's finetune and of stage 2's, each once its
    first checkpoint is registered (Ray's snapshot exists), then the merge actor once the merge
    has written its first shard. Watches S3 directly, not through the proxy."""

    def __init__(self, driver: int, fs, layout: RunLayout, merge_out: str):
        super().__init__(daemon=True)
        self.driver, self.fs = driver, fs
        self.targets = [
            ("train worker, 01-image/finetune", _snapshot(layout, "image"), self._train_worker),
            ("train worker, 02-video/finetune", _snapshot(layout, "video"), self._train_worker),
            ("merge actor, 02-video/merge", merge_out.removeprefix("s3://") +
             "/model-00001-of-*.safetensors", self._merge_actor)]
        self.killed: list[str] = []
        self.stop = threading.Event()

    def run(self):
        for what, watch, victim in self.targets:
            while not self.stop.is_set():
                self.fs.invalidate_cache()
                if self.fs.glob(watch):
                    pid = victim()
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(what)
                        break
                time.sleep(0.02)

    def _train_worker(self):
        try:
            return ray_train_worker_of(self.driver)
        except AssertionError:
            return None

    def _merge_actor(self):
        pids = subprocess.run(["pgrep", "-f", "ray::MergeActor"], capture_output=True,
                              text=True).stdout.split()
        return next((int(p) for p in pids if self.driver in ancestors(int(p))), None)


def _snapshot(layout: RunLayout, modality: str) -> str:
    state = layout.train_state(modality, "finetune").removeprefix("s3://")
    return f"{state}/ray/checkpoint_manager_snapshot.json"


@pytest.fixture
def s3_shards(builtin_shards, s3_bucket):
    """The built-in test shards copied to the bucket: {modality: {"train", "eval"}}."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    out = {}
    for m, patterns in builtin_shards.items():
        local = os.path.dirname(patterns["train"])
        fs.put(local + "/", f"{s3_bucket.removeprefix('s3://')}/shards/{m}/", recursive=True)
        out[m] = {k: f"{s3_bucket}/shards/{m}/{os.path.basename(p)}"
                  for k, p in patterns.items()}
    return out


def test_run_on_faulty_s3_with_killed_workers_and_merge_actor_loses_nothing(
        resumed_run, s3_shards, s3_bucket, s3_endpoint, tmp_path):
    cfg = two_modalities(default_config(s3_shards, f"{s3_bucket}/run"))
    cfg["stages"]["merge"]["shard_size"] = "100KB"  # many shards: the merge takes a while
    assert {k: v for k, v in cfg["stages"].items() if k != "merge"} == {
        k: v for k, v in resumed_run["cfg"]["stages"].items() if k != "merge"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    layout = RunLayout.of(parse_config(cfg))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)

    with FaultProxy(s3_endpoint, rate=FAULT_RATE, seed=0, slow_s=0.3) as proxy:
        proc = mera_run(path, "--checkpoint-every", "1",
                        env=mera_env(FSSPEC_S3_ENDPOINT_URL=proxy.url))
        chaos = Chaos(proc.pid, fs, layout, layout.merge_llm("video"))
        chaos.start()
        try:
            out, _ = proc.communicate(timeout=900)
        finally:
            chaos.stop.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        requests, faults = proxy.requests, dict(proxy.faults)
    print(f"\nreliability: {requests} S3 requests, {sum(faults.values())} faulted {faults}; "
          f"killed: {chaos.killed}")
    assert proc.returncode == 0, out[-5000:]
    assert len(chaos.killed) == 3, (chaos.killed, out[-3000:])
    assert all(faults[k] > 0 for k in ("503", "throttle", "500", "reset", "slow")), faults
    # The two killed training jobs were restarted from their checkpoints, once each.
    assert out.count("restarting from its latest checkpoint") == 2, out[-5000:]

    run = cfg["run_dir"].removeprefix("s3://")
    steps = json.loads(fs.cat(f"{run}/manifest.json"))["steps"]
    reference = json.loads(open(resumed_run["layout"].manifest).read())["steps"]
    assert list(steps) == list(reference)
    leftovers = [p for p in fs.find(run) if ".tmp-" in p or "/_state/" in p]
    assert leftovers == []
    for m in ("image", "video"):
        scores = json.loads(fs.cat(layout.eval_metrics(m).removeprefix("s3://")))["scores"]
        clean = json.loads(open(resumed_run["layout"].eval_metrics(m)).read())["scores"]
        assert scores == clean, m
