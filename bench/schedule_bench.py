"""The dependency schedule against the sequential one (cluster.schedule), two ways:

`run`: the whole `mera run` of a config (the embedded default unless given), once per schedule,
one after the other on the same local Ray cluster of --cpus logical CPUs (`ray start`, on
loopback): the wall time of each, and when each step ran (from the run's manifest).

    python -m bench.schedule_bench run [--config launch/configs/default.yaml] [--cpus 4]

`simulate`: a model, not a measurement: run.schedule.simulate (the executor's policy) on the plan
of launch/configs/paper_8b.yaml on 2 nodes x 8 GPUs, each step's cost built from figures measured
elsewhere in BENCHMARKS.md (printed with the result, to be replaced by a cluster's own).

    python -m bench.schedule_bench simulate [--workers 8] [--realign-workers 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SCHEDULES = ("sequential", "dependency")


def run(args) -> dict:
    from mera_ds.config import load_config

    base = load_config(args.config).model_dump(mode="json")
    out = tempfile.mkdtemp(prefix="mera-schedule-")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port = _free_port()
    subprocess.run([os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address",
                    "127.0.0.1", "--port", str(port), "--num-cpus", str(args.cpus),
                    "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir",
                    temp_dir], env=env, check=True, capture_output=True, timeout=180)
    results = {}
    try:
        for schedule in SCHEDULES:
            cfg = dict(base, run_dir=os.path.join(out, schedule))
            cfg["cluster"] = dict(cfg["cluster"], schedule=schedule)
            path = os.path.join(out, f"{schedule}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(cfg, f)
            t0 = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "mera_ds", "run", path,
                                   "--ray-address", f"127.0.0.1:{port}"], cwd=ROOT, env=env,
                                  capture_output=True, text=True)
            wall = time.monotonic() - t0
            if proc.returncode:
                sys.exit(f"{schedule}: mera run failed:\n{proc.stderr[-3000:]}")
            with open(os.path.join(cfg["run_dir"], "manifest.json")) as f:
                steps = json.load(f)["steps"]
            results[schedule] = {"wall_s": wall, "steps": _timeline(steps)}
    finally:
        subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], env=env,
                       capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    for schedule, r in results.items():
        print(f"\n{schedule}: {r['wall_s']:.1f} s wall, {sum(s['seconds'] for s in r['steps']):.1f}"
              f" s of steps")
        for s in r["steps"]:
            print(f"  {s['name']:<22} {s['start']:7.1f} -> {s['end']:7.1f}")
    ratio = results["sequential"]["wall_s"] / results["dependency"]["wall_s"]
    print(f"\nsequential / dependency wall time: {ratio:.2f}x ({args.cpus} logical CPUs, "
          f"{os.cpu_count()} cores)")
    return {"cpus": args.cpus, "config": args.config, "results": results, "ratio": ratio}


def _timeline(steps: dict) -> list[dict]:
    """Each step's start and end in seconds from the first start."""
    when = {n: (datetime.fromisoformat(s["started"]).timestamp(),
                datetime.fromisoformat(s["finished"]).timestamp()) for n, s in steps.items()}
    t0 = min(start for start, _ in when.values())
    return sorted(({"name": n, "start": a - t0, "end": b - t0, "seconds": b - a}
                   for n, (a, b) in when.items()), key=lambda s: s["start"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The model of an 8B run. Every figure is from BENCHMARKS.md or the config; see `costs`.
H100_TOKENS_S_1B = 15_036      # finetune, 1.10 B LLM, ZeRO-3 bf16, one H100 (Finetune job section)
PARAMS_1B, PARAMS_8B = 1.10e9, 8.03e9
TOKENS_PER_SAMPLE = 779        # the finetune benchmark's mean sample
REALIGN_STEP = 0.81            # of a finetune step, ZeRO-3 on the H100 (Realign section)
MERGE_GB_S = 1.0               # GB of input read per second: K = 2, cold, 1 thread (Merge section)
EVAL_S = 600.0                 # evaluating the learned modalities on one GPU: an assumption
REPLAY_S = 120.0               # drawing 10% of a modality's shards: an assumption


def costs(cfg, workers: int, realign_workers: int) -> tuple[dict, dict]:
    """({phase: seconds}, {phase: GPUs}) of paper_8b's steps on H100s: a training step's tokens
    over the measured 1.1 B throughput scaled by parameters (6N FLOPs per token), times the
    workers (linear scaling: optimistic)."""
    per_gpu = H100_TOKENS_S_1B * PARAMS_1B / PARAMS_8B
    st = cfg.stages

    def train(s, factor: float, gpus: int) -> float:
        return s.steps * s.batch_size * TOKENS_PER_SAMPLE / (per_gpu * gpus) * factor

    bytes_in = 2 * PARAMS_8B * 2  # theta_{i-1} and theta_ft_i in bf16
    seconds = {"align": train(st.align, REALIGN_STEP, workers),  # LLM frozen, as in realign
               "finetune": train(st.finetune, 1.0, workers),
               "realign": train(st.realign, REALIGN_STEP, realign_workers),
               "merge": bytes_in / 1e9 / MERGE_GB_S, "evaluate": EVAL_S, "replay": REPLAY_S}
    gpus = {"align": workers, "finetune": workers, "realign": realign_workers, "merge": 0,
            "evaluate": 1, "replay": 0}
    return seconds, gpus


def simulate_8b(args) -> dict:
    from mera_ds.config import load_config
    from mera_ds.run.layout import RunLayout
    from mera_ds.run.plan import Method, plan
    from mera_ds.run.schedule import simulate

    cfg = load_config(os.path.join(ROOT, "launch/configs/paper_8b.yaml"))
    cfg = cfg.model_copy(update={"run_dir": "/tmp/mera-simulated"})
    steps = plan(cfg, Method.of(cfg), RunLayout.of(cfg))
    seconds, gpus = costs(cfg, args.workers or cfg.cluster.num_workers, args.realign_workers)
    result = {"gpus": args.gpus, "seconds": seconds, "step_gpus": gpus}
    print(f"model: {len(steps)} steps of paper_8b.yaml on {args.gpus} GPUs; per step (s, GPUs):")
    for phase in seconds:
        print(f"  {phase:<9} {seconds[phase]:8.0f} s  {gpus[phase]} GPUs")
    for schedule in SCHEDULES:
        spans = simulate(steps, lambda s: seconds[s.phase], lambda s: gpus[s.phase], args.gpus,
                         sequential=schedule == "sequential")
        result[schedule] = max(s.end for s in spans)
        print(f"{schedule}: makespan {result[schedule] / 3600:.2f} h")
    result["ratio"] = result["sequential"] / result["dependency"]
    print(f"sequential / dependency: {result['ratio']:.2f}x")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="both schedules of a real run on a local Ray")
    r.add_argument("--config", default=os.path.join(ROOT, "launch/configs/default.yaml"))
    r.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    s = sub.add_parser("simulate", help="the model of paper_8b on 2 x 8 GPUs")
    s.add_argument("--gpus", type=int, default=16)
    s.add_argument("--workers", type=int, help="GPUs of align and finetune (default: the "
                   "config's cluster.num_workers, 8)")
    s.add_argument("--realign-workers", type=int, default=8)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    result = run(args) if args.what == "run" else simulate_8b(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
