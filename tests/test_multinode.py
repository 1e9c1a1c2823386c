"""The Slurm launch scripts (launch/slurm/) on two nodes: network namespaces node1 and node2 joined
by a veth pair (tests/netns.py), stubs of `scontrol` and `srun` that run a command in a node's
namespace (tests/slurm_stub/), S3 served by moto inside node1. The batch scripts run unchanged,
inside node1 as Slurm runs them on a job's first node. Needs root and `ip netns`; no traffic
leaves the namespaces' own 10.233.91.0/24 and loopback."""
import itertools
import os
import re
import signal
import subprocess

import pytest

from tests import netns
from tests import slurm_job as sj

ROOT = sj.ROOT
COMMON = os.path.join(ROOT, "launch", "slurm", "common.sh")
NODE_ADDRESSES = [netns.address("node1"), netns.address("node2")]
_job_ids = itertools.count(700000 + os.getpid() % 10000 * 10)

needs_netns = pytest.mark.skipif(netns.unavailable() is not None,
                                 reason=f"multi-node tests: {netns.unavailable()}")


def test_a_job_takes_its_ports_from_its_id():
    """Two jobs on one node get different port blocks (ids apart by less than 60), the same job
    the same block on every node; MERA_PORT_BASE overrides."""
    def ports(job_id, **env):
        out = subprocess.run(
            ["bash", "-c", f"source {COMMON}; mera_job_env; echo $MERA_PORT_BASE "
                           "$MERA_GCS_PORT $MERA_MIN_WORKER_PORT $MERA_MAX_WORKER_PORT"],
            env={"PATH": os.environ["PATH"], "SLURM_JOB_ID": str(job_id), "MERA_IFACE": "lo",
                 **env}, capture_output=True, text=True, check=True).stdout.split()
        return [int(p) for p in out]

    a, b = ports(1001), ports(1002)
    assert a[0] != b[0] and {a[0], b[0]} <= set(range(20000, 32000))
    assert a[1] == a[0] and a[3] - a[2] >= 100 and (a[3] < b[0] or b[3] < a[0])
    assert ports(1001) == a
    assert ports(1001, MERA_PORT_BASE="40000")[:2] == [40000, 40000]


@pytest.fixture(scope="module")
def nodes():
    """node1, node2 and S3 in node1; removed afterwards, also after a failure."""
    cluster = sj.TwoNodes()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def shards(nodes):
    return nodes.shards()


@pytest.fixture
def job_id():
    """A job id of its own; the job's temp dirs are removed afterwards."""
    job = next(_job_ids)
    yield job
    sj.remove_temp_dirs(job)


def assert_nothing_left(nodes, job: int):
    """No process of the job is left: the namespaces hold only the S3 server (which the job did
    not stop: it ends its own processes only), and no command line names its temp dirs."""
    assert netns.pids("node1") == [nodes.moto.pid]
    assert netns.pids("node2") == []
    assert sj.processes_naming(f"/tmp/mera-ray-{job}-") == []


def finish(proc, timeout: int) -> str:
    """The output of a batch script that must succeed; stopped (as scancel would) on timeout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    print(out)  # shown if the test fails
    assert proc.returncode == 0, out[-6000:]
    return out


def training_addresses(manifest: dict) -> dict:
    """{training step: [rank 0's address, rank 1's, ...]} as the run's manifest records them."""
    return {name: step["result"]["addresses"].split() for name, step in manifest["steps"].items()
            if name.endswith(("/finetune", "/realign", "/align"))}


def logged_addresses(out: str) -> dict:
    """{training job: [rank 0's address, rank 1's]} as rank 0 logs them (train.recipe.run_job)."""
    return {name: ranks.split() for name, ranks in
            re.findall(r"(\S+/(?:finetune|realign|align)): ranks 0\.\.1 on ([\d. ]+\d)", out)}


def ray_worker_groups(out: str) -> list:
    """[{world rank: node address}] of each Ray Train worker group, as Ray Train logs them."""
    groups = []
    for line in out.splitlines():
        if "Started training worker group" in line:
            groups.append({})
        found = re.search(r"\(ip=([\d.]+), pid=\d+\) world_rank=(\d+)", line)
        if found and groups:
            groups[-1][int(found[2])] = found[1]
    return groups


@needs_netns
def test_ray_job_runs_a_two_modality_run_on_two_nodes(nodes, shards, job_id, tmp_path):
    """mera-ray.sbatch: a Ray head in node1, a worker node in node2, `mera run` of two stages
    (finetune, merge, realign, evaluate) with one Ray Train worker on each node."""
    run_dir = f"s3://{sj.BUCKET}/runs/{job_id}"
    config = sj.run_config(shards, run_dir, str(tmp_path / "run.yaml"),
                           placement_strategy="STRICT_SPREAD")
    out = finish(sj.sbatch("launch/slurm/mera-ray.sbatch", config,
                           env=sj.job_env(nodes, job_id)), timeout=900)

    # Each node ran its own Ray, on its own address, with a temp dir of its own.
    for node, address in zip(("node1", "node2"), NODE_ADDRESSES):
        assert f"{node}: Ray {'head' if node == 'node1' else 'worker'} on {address} (eth0)" in out
        assert os.path.isdir(f"/tmp/mera-ray-{job_id}-{node}")
    assert "all 2 node(s) joined" in out
    assert nodes.exists(f"{run_dir}/report/report.md")
    assert "BRG after 2 evaluated stages" in out
    manifest = nodes.read_json(f"{run_dir}/manifest.json")
    steps = {f"0{i}-{m}/{p}" for i, m in ((1, "image"), (2, "video"))
             for p in ("finetune", "evaluate")} | {"02-video/merge", "02-video/realign"}
    assert steps <= set(manifest["steps"])
    # Rank 0 and rank 1 of every training job ran on different nodes: each rank's address on the
    # network, gathered by the job and logged by its rank 0; Ray Train's own record agrees.
    # (The console shows steps; the logs are in RUN/logs/: each rank's, and the driver's.)
    training = ["01-image/finetune", "02-video/finetune", "02-video/realign"]
    rank0 = "".join(nodes.read_text(f"{run_dir}/logs/{name.replace('/', '-')}/rank-0.log")
                    for name in training)
    logged = logged_addresses(rank0)
    assert sorted(logged) == sorted(training), rank0[-6000:]
    for name, ranks in logged.items():
        assert sorted(ranks) == NODE_ADDRESSES, (name, ranks)
    groups = ray_worker_groups(nodes.read_text(f"{run_dir}/logs/mera.log"))
    assert len(groups) == len(training) and all(
        sorted(g.values()) == NODE_ADDRESSES and set(g) == {0, 1} for g in groups), groups
    assert training_addresses(manifest) == logged
    assert_nothing_left(nodes, job_id)


@needs_netns
def test_sigterm_ends_every_process_of_the_job_and_nothing_else(nodes, shards, job_id,
                                                                 tmp_path):
    """scancel (SIGTERM to the batch script) while the driver runs: the script stops the driver
    and both nodes' Ray, and exits 143; the S3 server beside them in node1 keeps running. Ray
    and the driver run through MERA_CONTAINER's prefix (a stub that says what it runs)."""
    config = sj.run_config(shards, f"s3://{sj.BUCKET}/runs/{job_id}",
                           str(tmp_path / "run.yaml"))
    env = sj.job_env(nodes, job_id, MERA_CONTAINER=os.path.join(sj.STUB, "container"))
    proc = sj.sbatch("launch/slurm/mera-ray.sbatch", config, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "connecting to the Ray cluster" in line:  # the driver runs
                os.kill(proc.pid, signal.SIGTERM)
                break
        lines += proc.stdout.readlines()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(lines)
    print(out)  # shown if the test fails
    assert proc.returncode == 143, out[-6000:]
    assert "connecting to the Ray cluster" in out
    assert out.count("container: ray\n") == 2 and "container: mera\n" in out  # 2 ray start
    assert_nothing_left(nodes, job_id)
    assert nodes.moto.poll() is None


@needs_netns
def test_torchrun_job_runs_a_finetune_on_two_nodes(nodes, shards, job_id, tmp_path):
    """mera-torchrun.sbatch: one torchrun per node (through MERA_CONTAINER's prefix), the ranks
    meeting at node1, run stage 1's finetune without Ray and record it in the run's manifest."""
    run_dir = f"s3://{sj.BUCKET}/runs/{job_id}"
    config = sj.run_config(shards, run_dir, str(tmp_path / "run.yaml"))
    env = sj.job_env(nodes, job_id, MERA_CONTAINER=os.path.join(sj.STUB, "container"))
    out = finish(sj.sbatch("launch/slurm/mera-torchrun.sbatch", config, "finetune", "image",
                           env=env), timeout=600)
    manifest = nodes.read_json(f"{run_dir}/manifest.json")
    assert out.count("container: torchrun\n") == 2
    assert list(manifest["steps"]) == ["01-image/finetune"]
    assert sorted(training_addresses(manifest)["01-image/finetune"]) == NODE_ADDRESSES
    assert nodes.exists(f"{run_dir}/stages/01-image/finetune/llm/config.json")
    assert_nothing_left(nodes, job_id)
