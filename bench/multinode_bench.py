"""Measures the two-modality run of tests/test_multinode.py (launch/slurm/mera-ray.sbatch, S3 in
node1) on 2 nodes (one Ray Train worker on each, STRICT_SPREAD) and on 1 node (both workers in
node1, 2 CPUs): seconds of each step of the run, and the bytes that cross the veth between the
nodes. Each layout runs twice, with two finetune step counts, so that the difference cancels
everything else (set-up, exports, checkpoints, merge, realign, evaluation, S3 reads of models):

    bytes per finetune step = (bytes of the S2 run - bytes of the S1 run) / (2 stages x (S2 - S1))

Bytes are counted in node2 (every byte between the nodes passes its eth0): the interface's
counters (/sys/class/net/eth0/statistics, Ethernet frames) and nftables counters in node2's
namespace that split them into S3 (to and from the moto server, port 5000 in node1) and the rest
(Ray's control plane and objects, gloo's collectives). Seconds per optimizer step come from the
arrival times of rank 0's step lines in the driver's output. Needs root and `ip netns`; the two
namespaces share this machine's CPUs, so 2 nodes against 1 shows the cost of the network path,
not more compute.

    python -m bench.multinode_bench [--steps 8 40] [--layouts 2,1] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from tests import netns
from tests import slurm_job as sj

NFT_RULES = """
table inet mera_acct {
  chain out {
    type filter hook output priority 0;
    oifname "eth0" tcp dport 5000 counter comment "s3_tx"
    oifname "eth0" tcp dport != 5000 counter comment "other_tx"
  }
  chain in {
    type filter hook input priority 0;
    iifname "eth0" tcp sport 5000 counter comment "s3_rx"
    iifname "eth0" tcp sport != 5000 counter comment "other_rx"
  }
}
"""


def nft_counters(node: str) -> dict[str, int]:
    """Bytes (IP packets) of each counting rule in `node`, by its comment."""
    out = subprocess.run(netns.exec_in(node, "nft", "-j", "list", "table", "inet", "mera_acct"),
                         capture_output=True, text=True, check=True).stdout
    counters = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule and "comment" in rule:
            counters[rule["comment"]] = next(e["counter"]["bytes"] for e in rule["expr"]
                                             if "counter" in e)
    return counters


def snapshot() -> dict[str, int]:
    c = netns.counters("node2")
    return {"eth0_tx": c["tx"], "eth0_rx": c["rx"], **nft_counters("node2")}


def run(cluster: sj.TwoNodes, shards: dict, layout: int, steps: int, job_id: int,
        workdir: str) -> dict:
    run_dir = f"s3://{sj.BUCKET}/bench/{job_id}"
    config = sj.run_config(shards, run_dir, os.path.join(workdir, f"{job_id}.yaml"),
                           finetune_steps=steps, realign_steps=6,
                           placement_strategy="STRICT_SPREAD" if layout == 2 else "PACK")
    env = sj.job_env(cluster, job_id, nodes="node[1-2]" if layout == 2 else "node1",
                     SLURM_CPUS_ON_NODE=str(2 if layout == 1 else 1))
    before, t0 = snapshot(), time.time()
    proc = sj.sbatch("launch/slurm/mera-ray.sbatch", config, env=env)
    lines = []  # (seconds since the start, line): when each line reached the driver's output
    try:
        with open(os.path.join(workdir, f"{job_id}.log"), "w") as f:
            for line in proc.stdout:
                lines.append((time.time() - t0, line))
                f.write(f"{lines[-1][0]:8.2f} {line}")
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: the job stops its own processes on SIGTERM
            proc.terminate()
            proc.wait()
        sj.remove_temp_dirs(job_id)
    wall = time.time() - t0
    after = snapshot()
    out = "".join(line for _, line in lines)
    if proc.returncode != 0:
        raise RuntimeError(f"job {job_id} failed ({proc.returncode}): {out[-3000:]}")
    manifest = cluster.read_json(f"{run_dir}/manifest.json")
    return {"layout": layout, "finetune_steps": steps, "job_id": job_id, "wall_s": wall,
            "bytes": {k: after[k] - before[k] for k in after},
            "steps": {name: s["seconds"] for name, s in manifest["steps"].items()},
            "seconds_per_step": step_rates(lines),
            "ranks": re.findall(r"(\S+/(?:finetune|realign)): ranks 0\.\.1 on ([\d. ]+\d)", out)}


def step_rates(lines: list) -> dict:
    """{training job: seconds per optimizer step} from the arrival times of rank 0's step lines,
    from the second logged step to the last (the first holds the warm-up)."""
    seen: dict[str, list] = {}
    for t, line in lines:
        found = re.search(r"(\S+/(?:finetune|realign)) step (\d+)/\d+ loss", line)
        if found:
            seen.setdefault(found[1], []).append((int(found[2]), t))
    return {job: round((pts[-1][1] - pts[1][1]) / (pts[-1][0] - pts[1][0]), 3)
            for job, pts in seen.items() if len(pts) >= 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[8, 40], metavar=("S1", "S2"))
    parser.add_argument("--layouts", default="2,1", help="nodes per run, in order (2,1)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    reason = netns.unavailable()
    if reason:
        sys.exit(f"multinode_bench: {reason}")
    cluster = sj.TwoNodes()
    results = []
    workdir = tempfile.mkdtemp(prefix="mera-bench-")
    try:
        cluster.start()
        subprocess.run(netns.exec_in("node2", "nft", "-f", "-"), input=NFT_RULES, text=True,
                       check=True)
        shards = cluster.shards()
        job_id = 800000 + os.getpid() % 10000 * 10
        for layout in (int(x) for x in args.layouts.split(",")):
            for steps in args.steps:
                job_id += 1
                r = run(cluster, shards, layout, steps, job_id, workdir)
                results.append(r)
                print(json.dumps(r), flush=True)
    finally:
        cluster.stop()
    summary = summarize(results, args.steps)
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": results, "summary": summary, "logs": workdir}, f, indent=2)


def summarize(results: list[dict], steps: list[int]) -> dict:
    """Per layout: seconds of each step of the run (S2's run) and, from the difference of the two
    runs, seconds and bytes per finetune step."""
    s1, s2 = steps
    out = {}
    for layout in sorted({r["layout"] for r in results}):
        a = next(r for r in results if r["layout"] == layout and r["finetune_steps"] == s1)
        b = next(r for r in results if r["layout"] == layout and r["finetune_steps"] == s2)
        finetunes = [n for n in b["steps"] if n.endswith("/finetune")]
        extra = len(finetunes) * (s2 - s1)
        out[f"{layout} node(s)"] = {
            "wall_s": {s1: round(a["wall_s"], 1), s2: round(b["wall_s"], 1)},
            f"step_seconds_at_{s2}": {n: round(v, 1) for n, v in b["steps"].items()},
            "seconds_per_step_from_log": {s1: a["seconds_per_step"], s2: b["seconds_per_step"]},
            "bytes_per_finetune_step": {k: round((b["bytes"][k] - a["bytes"][k]) / extra)
                                        for k in b["bytes"]},
        }
    return out


if __name__ == "__main__":
    main()
