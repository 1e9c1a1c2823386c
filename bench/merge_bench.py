"""Benchmark: mera-ds's merge against mergekit's linear merge, on the same inputs, in one run.

Makes K LLaMA-shaped bf16 checkpoints (random weights, sharded as real ones are, with a
config.json), then for each K merges them with `mera merge --strategy linear` and with
`mergekit-yaml` (merge_method: linear, equal weights, same output shard size), each as a child
process, and records wall time and memory (bench/procmem.py). Measures the disk's sequential read
bandwidth with dd on the same files in the same run. Where the page cache can be dropped (root,
writable /proc/sys/vm/drop_caches) every figure is taken cold (cache dropped just before) and
warm (inputs just read); otherwise warm only, and the table says so.

    .venv/bin/python bench/merge_bench.py                # K = 2 and 4, cold and warm
    .venv/bin/python bench/merge_bench.py --ks 2 --regimes warm --keep

mergekit lives in its own virtual environment (.venv-bench, made by `python3 -m venv .venv-bench
&& .venv-bench/bin/pip install torch==2.13.0 mergekit`, torch first so that pip keeps the CPU
build) so that it cannot change the project's torch or transformers. Data go under --dir
(default runs/merge-bench, ignored by git) and are deleted at the end unless --keep.

This process imports no torch: children inherit nothing from it, and it stays out of the way.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procmem import run_measured  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# TinyLlama-1.1B's shapes with 16 layers instead of 22: 0.84 B parameters, 1.67 GB in bf16.
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)


def llama_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def make_checkpoint(path: str, seed: int, shards: int) -> None:
    """A random bf16 LLaMA-shaped checkpoint in about `shards` HF shards, written with
    safetensors. Values are cut from one random pool at seed-dependent offsets: fast, and
    different per model."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 27, generator=g) * 0.02).to(torch.bfloat16)
    specs = [(name, shape, torch.Size(shape).numel()) for name, shape in llama_tensors(SHAPE)]
    total = sum(n * 2 for _, _, n in specs)
    groups, size = [[]], 0
    for spec in specs:  # close a shard once it reaches total / shards, as HF's sharding does
        groups[-1].append(spec)
        size += spec[2] * 2
        if size >= total / shards and spec is not specs[-1]:
            groups.append([])
            size = 0
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape, n in group:
            start = int(torch.randint(0, pool.numel() - n, (1,), generator=g))
            tensors[name] = pool[start:start + n].reshape(shape).clone()
            weight_map[name] = fname
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = dict(SHAPE, architectures=["LlamaForCausalLM"], model_type="llama",
                  torch_dtype="bfloat16", tie_word_embeddings=False, rms_norm_eps=1e-5,
                  max_position_embeddings=2048, hidden_act="silu")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def compare(a: str, b: str) -> dict:
    """How far apart two merged checkpoints are, over every tensor (bf16 ulps differ when the
    two round fp32 sums in another order)."""
    sys.path.insert(0, REPO)
    from mera_ds.io.reader import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    assert set(ca.names) == set(cb.names), "the outputs hold different tensors"
    worst, differ, total = 0.0, 0, 0
    for name in ca.names:
        x, y = ca.get(name).float(), cb.get(name).float()
        worst = max(worst, (x - y).abs().max().item())
        differ += (x != y).sum().item()
        total += x.numel()
    return {"max_abs_diff": worst, "frac_elements_differ": differ / total}


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def shard_files(model_dirs: list[str]) -> list[str]:
    return [os.path.join(d, f) for d in model_dirs for f in sorted(os.listdir(d))
            if f.endswith(".safetensors")]


def dd_read(files: list[str]) -> float:
    """MB/s reading `files` one after another with dd."""
    nbytes = sum(os.path.getsize(f) for f in files)
    t0 = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M", "status=none"], check=True)
    return nbytes / (time.perf_counter() - t0) / 1e6


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    return int(float(text[:-2]) * units[text[-2:].upper()])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", default=os.path.join(REPO, ".venv-bench/bin/mergekit-yaml"))
    ap.add_argument("--python", default=os.path.join(REPO, ".venv/bin/python"),
                    help="the project's Python (runs mera and the data generator)")
    ap.add_argument("--dir", default=os.path.join(REPO, "runs/merge-bench"))
    ap.add_argument("--ks", default="2,4", help="numbers of models merged")
    ap.add_argument("--shards", type=int, default=5, help="shards per input checkpoint")
    ap.add_argument("--out-shard-size", default="1GB", help="output shard size, both tools")
    ap.add_argument("--workers", default="1,2", help="mera --workers values to run")
    ap.add_argument("--regimes", default="cold,warm")
    ap.add_argument("--keep", action="store_true", help="keep the data")
    ap.add_argument("--make", nargs=3, metavar=("PATH", "SEED", "SHARDS"), help=argparse.SUPPRESS)
    ap.add_argument("--compare", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make:
        make_checkpoint(args.make[0], int(args.make[1]), int(args.make[2]))
        return 0
    if args.compare:
        print(json.dumps(compare(*args.compare)))
        return 0

    ks = [int(k) for k in args.ks.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    os.makedirs(args.dir, exist_ok=True)
    models = [os.path.join(args.dir, f"model{k}") for k in range(max(ks))]
    t0 = time.perf_counter()
    for k, path in enumerate(models):
        if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
            subprocess.run([args.python, __file__, "--make", path, str(k), str(args.shards)],
                           check=True)
    files = shard_files(models[:1])
    print(f"# {len(models)} checkpoints of {sum(map(os.path.getsize, files)) / 1e9:.2f} GB in "
          f"{len(files)} shards, made in {time.perf_counter() - t0:.0f} s", flush=True)
    regimes = args.regimes.split(",")
    if "cold" in regimes and not drop_caches():
        print("# cannot drop the page cache here: warm runs only", flush=True)
        regimes = ["warm"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    out_bytes = parse_size(args.out_shard_size)
    rows = []
    for k in ks:
        inputs = models[:k]
        files = shard_files(inputs)
        input_gb = sum(map(os.path.getsize, files)) / 1e9
        yaml_path = os.path.join(args.dir, f"mergekit-{k}.yaml")
        with open(yaml_path, "w") as f:
            f.write("merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
                f"  - model: {d}\n    parameters:\n      weight: 1.0\n" for d in inputs))
        tools = {f"mera (workers={w})": [
            args.python, "-m", "mera_ds", "merge", "--strategy", "linear", "--prev", inputs[0],
            *sum((["--finetuned", d] for d in inputs[1:]), []), "--shard-size",
            args.out_shard_size, "--workers", str(w), "--out"] for w in workers}
        tools["mergekit"] = [args.mergekit, yaml_path, "--no-copy-tokenizer",
                             "--no-write-model-card", "--out-shard-size", str(out_bytes // 2),
                             "--quiet"]  # mergekit sizes shards in parameters: bf16 is 2 B
        for regime in regimes:
            if regime == "warm":
                dd_read(files)
            else:
                drop_caches()
            dd = dd_read(files)
            outs = {}
            for tool, cmd in tools.items():
                out = os.path.join(args.dir, "out-" + re.sub(r"\W+", "-", tool).strip("-"))
                shutil.rmtree(out, ignore_errors=True)
                if regime == "cold":
                    drop_caches()
                else:
                    dd_read(files)
                before = load()
                log = os.path.join(args.dir, "log.txt")
                # mergekit takes the output path after the config; mera as --out's value
                full = cmd[:2] + [out] + cmd[2:] if tool == "mergekit" else cmd + [out]
                m = run_measured(full, env=env, log_path=log)
                if m.returncode:
                    print(open(log).read()[-3000:])
                    raise SystemExit(f"{tool} failed ({m.returncode})")
                row = dict(K=k, input_gb=input_gb, regime=regime, dd_mb_s=dd, tool=tool,
                           load_before=before, **m.__dict__)
                print(json.dumps(row), flush=True)
                rows.append(row)
                outs[tool] = out
            mera_out = next(o for t, o in outs.items() if t.startswith("mera"))
            diff = subprocess.run([args.python, __file__, "--compare", mera_out,
                                   outs["mergekit"]], check=True, capture_output=True,
                                  text=True, env=env).stdout
            print(f"# K={k} {regime}: mera vs mergekit output: {diff.strip()}", flush=True)
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    print_table(rows)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def print_table(rows: list[dict]) -> None:
    print("\n| K | input GB | cache | dd read MB/s | tool | wall s | input MB/s | % of dd | "
          "peak RSS MB (one process) | peak RSS MB (all processes) | of which anon | "
          "mergekit / this: time, peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mk = next(x for x in rows if x["K"] == r["K"] and x["regime"] == r["regime"]
                  and x["tool"] == "mergekit")
        rate = r["input_gb"] * 1e3 / r["seconds"]
        ratio = "" if r is mk else (f"{mk['seconds'] / r['seconds']:.2f}x, "
                                    f"{mk['tree_rss_mb'] / r['tree_rss_mb']:.2f}x")
        print(f"| {r['K']} | {r['input_gb']:.2f} | {r['regime']} | {r['dd_mb_s']:.0f} | "
              f"{r['tool']} | {r['seconds']:.1f} | {rate:.0f} | {100 * rate / r['dd_mb_s']:.0f} "
              f"| {r['hwm_mb']:.0f} | {r['tree_rss_mb']:.0f} | {r['tree_anon_mb']:.0f} | "
              f"{ratio} |")


if __name__ == "__main__":
    sys.exit(main())
