"""Weight export from a ZeRO-3 job: rank 0's extra memory is bounded by the gather bucket, not
the model, and the result is an HF directory equal to the parameters."""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_export_memory_is_bounded_by_the_bucket(tmp_path):
    bucket = 8 * 2**20
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "export_job.py"),
                           str(tmp_path), str(bucket)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300,
                          # Large blocks from mmap go back to the system when freed, so RSS
                          # measures live memory, not what glibc's heap keeps for reuse.
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT,
                               "MALLOC_MMAP_THRESHOLD_": str(2**20)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["model_bytes"] > 150 * 2**20
    # A gathered bucket (a parameter larger than the bucket is gathered whole) and the CPU copy
    # handed to the writer: never the model.
    unit = max(bucket, m["largest_param_bytes"])
    assert m["extra_bytes"] < 2 * unit + 8 * 2**20, m
    assert m["extra_bytes"] < m["model_bytes"] / 4, m

    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    assert sum(p.numel() for p in llm.parameters()) * 4 == m["model_bytes"]
    index = json.loads((tmp_path / "llm" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3  # 50 MiB shards of a ~160 MiB model
    stored = {}
    for shard in shards:
        stored.update(load_file(tmp_path / "llm" / shard))
    for name, p in llm.named_parameters():
        assert torch.equal(stored[name], p.detach()), name
