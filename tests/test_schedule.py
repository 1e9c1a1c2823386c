"""The dependency schedule (run.schedule, run.local.execute(concurrent=True)): which steps wait on
which, that a step starts only once the steps writing its inputs are recorded, that steps of a
stage overlap the next stage's finetune, a failure and the resume after it, and the model of a
cluster that `simulate` runs."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

import pytest
import yaml

from mera_ds.config import parse_config
from mera_ds.errors import MeraError
from mera_ds.run.layout import RunLayout
from mera_ds.run.local import execute
from mera_ds.run.manifest import Manifest
from mera_ds.run.plan import Method, plan
from mera_ds.run.schedule import Schedule, dependencies, simulate

from .conftest import ROOT, free_port, mera_env
from .test_pipeline import artifacts

BIN = os.path.dirname(sys.executable)


@pytest.fixture
def steps(tiny_config):
    """The embedded default's plan: four modalities, MERA with realign."""
    cfg = parse_config(tiny_config)
    return cfg, plan(cfg, Method.of(cfg), RunLayout.of(cfg))


def test_a_step_depends_on_the_steps_that_write_what_it_reads(steps):
    _, steps = steps
    deps = dependencies(steps)
    assert deps["01-image/replay"] == deps["01-image/finetune"] == set()
    # theta_1 is stage 1's finetune: stage 2 starts from it, not from stage 1's realign.
    assert deps["02-video/finetune"] == {"01-image/finetune"}
    assert deps["02-video/merge"] == {"01-image/finetune", "02-video/finetune"}
    assert deps["03-audio/finetune"] == {"02-video/merge"}
    # No realign at stage 1: stage 2's starts the image connector from its finetune.
    assert "01-image/realign" not in deps
    assert deps["02-video/realign"] == {"01-image/finetune", "01-image/replay", "02-video/replay",
                                        "02-video/finetune", "02-video/merge"}
    assert deps["01-image/evaluate"] == {"01-image/finetune"}
    assert deps["02-video/evaluate"] == {"02-video/merge", "02-video/realign"}


def test_the_next_finetune_starts_before_a_realign_ready_with_it(steps):
    _, steps = steps
    schedule = Schedule(steps, done={"01-image/replay", "02-video/replay", "03-audio/replay",
                                     "04-depth/replay"})
    assert [s.name for s in schedule.ready()] == ["01-image/finetune"]
    assert schedule.ready() == []
    schedule.finish("01-image/finetune")
    assert [s.name for s in schedule.ready()] == ["02-video/finetune", "01-image/evaluate"]
    schedule.finish("02-video/finetune")
    assert [s.name for s in schedule.ready()] == ["02-video/merge"]
    schedule.finish("02-video/merge")
    assert [s.name for s in schedule.ready()] == ["03-audio/finetune", "02-video/realign"]


class FakeCluster:
    """An executor that takes `seconds[phase]` per step, records when each ran, and fails the
    steps named in `fail`."""

    def __init__(self, seconds: dict, fail=()):
        self.seconds, self.fail = seconds, set(fail)
        self.spans: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()
        self.prepared_in = None

    def prepare(self, cfg):
        self.prepared_in = (threading.current_thread(), len(self.spans))

    def __call__(self, cfg, step):
        t0 = time.monotonic()
        time.sleep(self.seconds[step.phase])
        if step.name in self.fail:
            raise MeraError(f"{step.name}: failed on purpose")
        with self.lock:
            self.spans[step.name] = (t0, time.monotonic())
        return {"phase": step.phase}


SECONDS = {"replay": 0.05, "finetune": 0.6, "merge": 0.05, "realign": 0.4, "evaluate": 0.1}


def assert_in_dependency_order(cluster: FakeCluster, steps):
    deps = dependencies(steps)
    for name, (start, _) in cluster.spans.items():
        for d in deps[name]:
            if d in cluster.spans:
                assert cluster.spans[d][1] <= start, (d, name)


def test_steps_overlap_the_next_finetune_and_wait_for_their_inputs(steps):
    cfg, steps = steps
    manifest = Manifest.open(RunLayout.of(cfg), cfg, "mera", resume=False)
    cluster = FakeCluster(SECONDS)
    t0 = time.monotonic()
    execute(cfg, steps, manifest, cluster, concurrent=True)
    wall = time.monotonic() - t0
    assert set(manifest.steps) == {s.name for s in steps}
    assert_in_dependency_order(cluster, steps)
    # Prepared (Ray connected) before any step, in the calling thread: a local Ray instance's
    # processes die with the thread that started them.
    assert cluster.prepared_in == (threading.main_thread(), 0)
    # Stage 2's realign and evaluate ran while stage 3's finetune did (stage 1's evaluate
    # while stage 2's).
    for name, beside in (("01-image/evaluate", "02-video/finetune"),
                         ("02-video/realign", "03-audio/finetune"),
                         ("02-video/evaluate", "03-audio/finetune")):
        (start, end), ft = cluster.spans[name], cluster.spans[beside]
        assert ft[0] < end and start < ft[1], name
    # The path through the stages: 4 finetunes, 3 merges, the last realign and evaluate.
    path = 4 * 0.6 + 3 * 0.05 + 0.4 + 0.1
    assert wall < path + 1.2 < sum(SECONDS[s.phase] for s in steps)
    # The manifest holds when each step started and ended.
    entry = manifest.steps["02-video/finetune"]
    assert entry["started"] < entry["finished"]


def test_a_failed_step_lets_the_running_ones_finish_and_resume_runs_the_rest(steps):
    cfg, steps = steps
    layout = RunLayout.of(cfg)
    manifest = Manifest.open(layout, cfg, "mera", resume=False)
    cluster = FakeCluster(SECONDS, fail={"02-video/realign"})
    with pytest.raises(MeraError, match="02-video/realign: failed on purpose"):
        execute(cfg, steps, manifest, cluster, concurrent=True)
    done = set(manifest.steps)
    # Stage 3's finetune was running when the realign failed: it finished and was recorded;
    # nothing started after the failure.
    assert "03-audio/finetune" in done
    assert not done & {"02-video/realign", "02-video/evaluate", "03-audio/merge"}
    failed_at = cluster.spans["03-audio/finetune"][0] + SECONDS["realign"]
    assert all(start < failed_at for start, _ in cluster.spans.values())

    resumed = Manifest.open(layout, cfg, "mera", resume=True)
    again = FakeCluster(SECONDS)
    execute(cfg, steps, resumed, again, concurrent=True)
    assert set(again.spans) == {s.name for s in steps} - done
    assert set(resumed.steps) == {s.name for s in steps}
    assert_in_dependency_order(again, steps)


def test_simulate_keeps_to_the_cluster_and_to_the_dependencies(steps):
    _, steps = steps
    cost = {"replay": 1, "finetune": 10, "merge": 2, "realign": 4, "evaluate": 2}
    gpus = {"replay": 0, "merge": 0, "finetune": 8, "realign": 4, "evaluate": 1}
    sequential = simulate(steps, lambda s: cost[s.phase], lambda s: gpus[s.phase], 16,
                          sequential=True)
    assert max(s.end for s in sequential) == sum(cost[s.phase] for s in steps) == 70
    spans = {s.name: s for s in simulate(steps, lambda s: cost[s.phase],
                                         lambda s: gpus[s.phase], 16)}
    for name, deps in dependencies(steps).items():
        assert all(spans[d].end <= spans[name].start for d in deps), name
    times = sorted({t for s in spans.values() for t in (s.start, s.end)})
    for t in times:
        assert sum(gpus[s.name.split("/")[1]] for s in spans.values()
                   if s.start <= t < s.end) <= 16
    # Finetune, then merge, stage after stage; the last realign and evaluate after them.
    assert max(s.end for s in spans.values()) == 4 * 10 + 3 * 2 + 4 + 2
    # On a cluster as large as one finetune, a realign waits for the finetune beside it.
    small = simulate(steps, lambda s: cost[s.phase], lambda s: gpus[s.phase], 8)
    assert max(s.end for s in small) > 52
    with pytest.raises(ValueError, match="needs 8 of a cluster of 4"):
        simulate(steps, lambda s: cost[s.phase], lambda s: gpus[s.phase], 4)


def test_on_ray_the_steps_overlap_and_leave_the_sequential_schedules_artifacts(resumed_run,
                                                                               tmp_path):
    """The two-modality run of `resumed_run` (the sequential schedule) again under the
    dependency schedule, on a local Ray of 4 logical CPUs (two 2-worker jobs at once): stage 1's
    evaluate ran beside stage 2's finetune, and every artifact is the same, byte for byte."""
    cfg = dict(resumed_run["cfg"], run_dir=str(tmp_path / "run"))
    cfg["cluster"] = dict(cfg["cluster"], schedule="dependency")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**mera_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    start = subprocess.run(
        [os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "4", "--include-dashboard", "false",
         "--disable-usage-stats", "--temp-dir", temp_dir],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        proc = subprocess.run([sys.executable, "-m", "mera_ds", "run", str(path),
                               "--ray-address", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], env=env,
                       capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    steps = json.loads((tmp_path / "run" / "manifest.json").read_text())["steps"]
    when = {n: (datetime.fromisoformat(s["started"]), datetime.fromisoformat(s["finished"]))
            for n, s in steps.items()}
    evaluate, finetune = when["01-image/evaluate"], when["02-video/finetune"]
    assert evaluate[0] < finetune[1] and finetune[0] < evaluate[1], when

    reference = resumed_run["layout"].run_dir
    files = artifacts(tmp_path / "run")
    assert files == artifacts(reference)
    differ = [f for f in sorted(files) if not f.endswith(".json") and
              (tmp_path / "run" / f).read_bytes() != open(os.path.join(reference, f), "rb").read()]
    assert differ == []
    for m in ("image", "video"):
        layout = resumed_run["layout"]
        ours = json.loads(open(layout.eval_metrics(m).replace(reference, str(tmp_path / "run")))
                          .read())
        assert ours["scores"] == json.loads(open(layout.eval_metrics(m)).read())["scores"]


def test_a_training_phase_may_have_its_own_number_of_workers(tiny_config):
    """stages.<phase>.num_workers: realign on fewer workers than finetune; the replay writes a
    shard for every rank of the largest job, and the preflight counts each job's ranks."""
    from mera_ds.run.preflight import preflight

    tiny_config["stages"]["realign"].update(num_workers=1)
    cfg = parse_config(tiny_config)
    assert (cfg.workers("realign"), cfg.workers("finetune"), cfg.max_workers) == (1, 2, 2)
    tiny_config["stages"]["finetune"].update(num_workers=8, micro_batch_size=2)
    cfg = parse_config(tiny_config)
    steps = plan(cfg, Method.of(cfg), RunLayout.of(cfg))
    assert {s.spec.num_shards for s in steps if s.phase == "replay"} == {8}
    with pytest.raises(MeraError, match=r"train-\{000000..000003\}.tar: 4 shard\(s\) for 8 "
                                        r"training ranks"):
        preflight(cfg, steps)
