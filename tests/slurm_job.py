"""A two-node Slurm job on one machine, for tests/test_multinode.py and bench/multinode_bench.py:
the nodes are the network namespaces of tests/netns.py, `scontrol` and `srun` are the stubs of
tests/slurm_stub/ (srun -w nodeN CMD = `ip netns exec nodeN env SLURMD_NODENAME=nodeN CMD`), S3 is
a moto server inside node1 on its eth0 address, reached by both nodes. The launch scripts of
launch/slurm/ run as they are, the batch script inside node1 as Slurm runs it on the first node.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import yaml

from tests import netns
from tests.conftest import default_config, two_modalities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STUB = os.path.join(ROOT, "tests", "slurm_stub")
MOTO_PORT = 5000  # in node1's namespace: nothing else listens there
BUCKET = "mera"


class TwoNodes:
    """The namespaces and the S3 server in node1; `start()` and `stop()` (idempotent)."""

    def __init__(self):
        self.endpoint = f"http://{netns.address('node1')}:{MOTO_PORT}"
        self.s3_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": self.endpoint}
        self.moto = None

    def start(self) -> "TwoNodes":
        netns.up()
        self.moto = subprocess.Popen(
            netns.exec_in("node1", os.path.join(BIN, "moto_server"), "-H", netns.address("node1"),
                          "-p", str(MOTO_PORT)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = f"echo > /dev/tcp/{netns.address('node1')}/{MOTO_PORT}"
        deadline = time.time() + 60
        while subprocess.run(netns.exec_in("node2", "bash", "-c", probe),
                             capture_output=True).returncode != 0:
            if self.moto.poll() is not None or time.time() > deadline:
                raise RuntimeError("the moto server in node1 did not start")
            time.sleep(0.2)
        self.python("node1", f"import s3fs; s3fs.S3FileSystem().mkdir({BUCKET!r})")
        return self

    def stop_s3(self) -> None:
        if self.moto is not None and self.moto.poll() is None:
            self.moto.terminate()
            try:
                self.moto.wait(10)
            except subprocess.TimeoutExpired:
                self.moto.kill()
                self.moto.wait()

    def stop(self) -> None:
        self.stop_s3()
        netns.down()

    def env(self, **extra) -> dict:
        """The environment of a process in a node: S3 endpoint and keys, CPU, one thread."""
        return {**os.environ, **self.s3_env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": ROOT, **extra}

    def python(self, node: str, code: str, timeout: float = 300) -> str:
        """Run Python `code` in `node` (with S3 reachable); its stdout."""
        proc = subprocess.run(netns.exec_in(node, sys.executable, "-c", code), cwd=ROOT,
                              env=self.env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"in {node}: {proc.stderr[-3000:]}")
        return proc.stdout

    def shards(self) -> dict:
        """The built-in dataset, small, on S3 (written from node1)."""
        return json.loads(self.python("node1", (
            "import json; from mera_ds.data.synth import synth_dataset; "
            f"print(json.dumps(synth_dataset('s3://{BUCKET}/ds', seed=0, train_per_modality=128, "
            "eval_per_modality=16, samples_per_shard=32)))")))

    def read_text(self, url: str) -> str:
        return self.python("node1", f"import s3fs, sys; sys.stdout.write(s3fs.S3FileSystem()"
                                    f".cat({url.removeprefix('s3://')!r}).decode())")

    def read_json(self, url: str):
        return json.loads(self.read_text(url))

    def exists(self, url: str) -> bool:
        return self.python("node1", f"import s3fs; print(s3fs.S3FileSystem().exists("
                                    f"{url.removeprefix('s3://')!r}))").strip() == "True"


def run_config(shards: dict, run_dir: str, path: str, finetune_steps: int = 4,
               realign_steps: int = 2, **cluster) -> str:
    """The two-modality pipeline config of the tests, shortened (finetune, merge, realign and
    evaluate each run, on few steps), 2 Ray Train workers, written to `path`."""
    cfg = two_modalities(default_config(shards, run_dir))
    cfg["stages"]["finetune"].update(steps=finetune_steps, warmup_steps=1)
    cfg["stages"]["realign"].update(steps=realign_steps)
    cfg["stages"]["eval"].update(max_samples=8, batch_size=8)
    cfg["cluster"].update(num_workers=2, **cluster)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def job_env(cluster: TwoNodes, job_id: int, nodes: str = "node[1-2]", **extra) -> dict:
    """What Slurm puts in a batch script's environment (SLURMD_NODENAME: the first node), with
    the stubs first on PATH and the venv's commands after them."""
    names = subprocess.run([os.path.join(STUB, "scontrol"), "show", "hostnames", nodes],
                           capture_output=True, text=True, check=True).stdout.split()
    n = len(names)
    tmp = f"/tmp/slurm-{job_id}-{names[0]}"  # the batch node's own /tmp, as tests/slurm_stub/srun
    os.makedirs(tmp, exist_ok=True)
    return cluster.env(**{
        "PATH": os.pathsep.join([STUB, BIN, os.environ["PATH"]]), "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NODELIST": nodes, "SLURM_NNODES": str(n), "SLURM_JOB_NUM_NODES": str(n),
        "SLURM_CPUS_ON_NODE": "1", "SLURMD_NODENAME": names[0], "SLURM_SUBMIT_DIR": ROOT,
        "TMPDIR": tmp,
        # Only the two namespaces reach these Ray instances: no token.
        "RAY_AUTH_MODE": "disabled",
        # Every worker's log line reaches the driver's output, none folded into "repeated Nx".
        "RAY_DEDUP_LOGS": "0",
        # DeepSpeed's JIT-built ops under the venv (Makefile's convention), never a shared dir.
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                               os.path.join(BIN, "..", "torch_extensions")),
        **extra})


def sbatch(script: str, *args: str, env: dict) -> subprocess.Popen:
    """Run a launch/slurm script as Slurm runs a batch script: on the first node (node1)."""
    return subprocess.Popen(netns.exec_in("node1", "bash", os.path.join(ROOT, script), *args),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def temp_dirs(job_id: int) -> list[str]:
    """The job's Ray temp dirs and the nodes' /tmp stand-ins."""
    return glob.glob(f"/tmp/mera-ray-{job_id}-*") + glob.glob(f"/tmp/slurm-{job_id}-*")


def processes_naming(text: str) -> list[str]:
    """Command lines of the processes that hold `text` in theirs."""
    hits = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(path.split("/")[2]) != os.getpid():
            hits.append(cmdline)
    return hits


def remove_temp_dirs(job_id: int) -> None:
    for d in temp_dirs(job_id):
        shutil.rmtree(d, ignore_errors=True)
