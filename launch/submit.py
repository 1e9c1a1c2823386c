#!/usr/bin/env python3
"""Submit a MERA run to a Ray cluster with `ray job submit`.

    python launch/submit.py CONFIG [--address http://HEAD:8265] [--resume]
                           [--env KEY=VALUE ...] [--runtime-env-json JSON] [--no-wait]

The repository is the job's working_dir (uploaded by Ray; virtual environments, runs and built
shards excluded), so the cluster runs this checkout's code. Variables for storage, Hugging Face,
NCCL, DeepSpeed and mera-ds (AWS_*, FSSPEC_*, HF_*, NCCL_*, TORCH_*, DS_*, MERA_*) set where this
script runs are passed to the job, but never over a value the user gives with --env or in
--runtime-env-json, and never a secret (keys, tokens, passwords: Ray logs the runtime_env in plain
text and the command line shows in `ps`); the job's processes take those from the cluster nodes'
environment or credential files. Paths in CONFIG are taken from the working_dir on the cluster:
point shards and run_dir at s3:// or a shared file system.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from mera_ds.cluster.connect import is_secret

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASS_THROUGH = ("AWS_", "FSSPEC_", "HF_", "NCCL_", "GLOO_", "TORCH_", "DS_", "MERA_")
EXCLUDES = [".git", ".venv", ".venv-bench", ".whl", "runs", "data_shards/built", "**/__pycache__"]


def runtime_env(user_json: str | None, env_args: list[str], environ: dict) -> dict:
    """The job's runtime_env: the user's, plus working_dir, excludes and passed-through vars."""
    env = json.loads(user_json) if user_json else {}
    env.setdefault("working_dir", ROOT)
    env.setdefault("excludes", EXCLUDES)
    env_vars = env.setdefault("env_vars", {})
    for item in env_args:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"submit: --env {item!r} is not KEY=VALUE")
        if is_secret(key):
            sys.exit(f"submit: --env {key}: a secret is not passed on the command line; set it "
                     f"in the cluster nodes' environment or credential files")
        env_vars[key] = value
    secrets = [k for k in env_vars if is_secret(k)]
    if secrets:
        sys.exit(f"submit: --runtime-env-json: {secrets[0]} is a secret; Ray would log it in "
                 f"plain text; set it in the cluster nodes' environment or credential files")
    for key, value in environ.items():
        if key.startswith(PASS_THROUGH) and not is_secret(key):
            env_vars.setdefault(key, value)
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config, a path inside the repository or absolute")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="the cluster's job server (default: RAY_ADDRESS or local)")
    p.add_argument("--resume", action="store_true", help="continue the run in its run_dir")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runtime-env-json", help="a runtime_env of your own, merged in")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    args = p.parse_args(argv)
    config = os.path.relpath(os.path.abspath(args.config), ROOT) \
        if os.path.abspath(args.config).startswith(ROOT + os.sep) else args.config
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    cmd = [ray, "job", "submit", "--address", args.address,
           "--runtime-env-json", json.dumps(runtime_env(args.runtime_env_json, args.env,
                                                        dict(os.environ)))]
    if args.no_wait:
        cmd.append("--no-wait")
    cmd += ["--", "python", "-m", "mera_ds", "run", config] + (["--resume"] if args.resume else [])
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
