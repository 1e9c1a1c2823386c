"""Benchmark: mera-ds's merge against mergekit's linear merge, on the same inputs, in one run.

Makes K LLaMA-shaped bf16 checkpoints (random weights, sharded as real ones are, with a
config.json), then for each K merges them with `mera merge --strategy linear` and with
`mergekit-yaml` (merge_method: linear, equal weights, same output shard size), each as a child
process, and records wall time, mera's own merge time (from its last line: start-up and `import
torch` excluded) and memory (bench/procmem.py). mera runs with 1 and 2 threads: its process is
given that many cores with taskset, and its threads default to the cores it may use. Measures the
disk's sequential read bandwidth with dd on the same files just before each repeat. Where the page
cache can be dropped (root, writable /proc/sys/vm/drop_caches) every figure is taken cold (cache
dropped just before) and warm (inputs just read); otherwise warm only, and the table says so.
Each figure is the median of --repeats runs.

    .venv/bin/python bench/merge_bench.py                # K = 2 and 4, cold and warm
    .venv/bin/python bench/merge_bench.py --ks 2 --regimes warm --threads 2 --keep

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
import statistics
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
    ap.add_argument("--threads", default="1,2",
                    help="mera's threads: the cores its process is given (taskset)")
    ap.add_argument("--workers", type=int, default=1, help="mera --workers")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each figure (median)")
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
    threads = [int(t) for t in args.threads.split(",")]
    if max(threads) > len(os.sched_getaffinity(0)):
        raise SystemExit(f"--threads {args.threads}: this process may use "
                         f"{len(os.sched_getaffinity(0))} cores")
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
        cores = sorted(os.sched_getaffinity(0))
        tools = {f"mera (threads={t})": [
            "taskset", "-c", ",".join(map(str, cores[:t])), args.python, "-m", "mera_ds",
            "merge", "--strategy", "linear", "--prev", inputs[0],
            *sum((["--finetuned", d] for d in inputs[1:]), []), "--shard-size",
            args.out_shard_size, "--workers", str(args.workers), "--out"] for t in threads}
        tools["mergekit"] = [args.mergekit, yaml_path, "--no-copy-tokenizer",
                             "--no-write-model-card", "--out-shard-size", str(out_bytes // 2),
                             "--quiet"]  # mergekit sizes shards in parameters: bf16 is 2 B
        for regime in regimes:
            runs: dict[str, list[dict]] = {tool: [] for tool in tools}
            dds = []
            for _ in range(args.repeats):
                if regime == "warm":
                    dd_read(files)
                else:
                    drop_caches()
                dds.append(dd_read(files))
                outs = {tool: run_tool(tool, cmd, files, regime, args.dir, env)
                        for tool, cmd in tools.items()}
                for tool, (out, run) in outs.items():
                    runs[tool].append(run)
                    print(json.dumps(dict(K=k, regime=regime, dd_mb_s=dds[-1], tool=tool, **run)),
                          flush=True)
            mera_out = next(o for t, (o, _) in outs.items() if t.startswith("mera"))
            diff = subprocess.run([args.python, __file__, "--compare", mera_out,
                                   outs["mergekit"][0]], check=True, capture_output=True,
                                  text=True, env=env).stdout
            print(f"# K={k} {regime}: mera vs mergekit output: {diff.strip()}", flush=True)
            for out, _ in outs.values():
                shutil.rmtree(out, ignore_errors=True)
            rows += [dict(K=k, input_gb=input_gb, regime=regime, dd_mb_s=statistics.median(dds),
                          tool=tool, **median_run(r)) for tool, r in runs.items()]
    print_table(rows)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def run_tool(tool: str, cmd: list[str], files: list[str], regime: str, root: str,
             env: dict) -> tuple[str, dict]:
    """Run one tool on a cold or warm page cache -> (its output directory, its figures)."""
    out = os.path.join(root, "out-" + re.sub(r"\W+", "-", tool).strip("-"))
    shutil.rmtree(out, ignore_errors=True)
    if regime == "cold":
        drop_caches()
    else:  # the previous run's output written back now, not during this run
        subprocess.run(["sync"], check=True)
        dd_read(files)
    before = load()
    log = os.path.join(root, "log.txt")
    # mergekit takes the output path after the config; mera as --out's value
    full = cmd[:2] + [out] + cmd[2:] if tool == "mergekit" else cmd + [out]
    m = run_measured(full, env=env, log_path=log)
    text = open(log).read()
    if m.returncode:
        print(text[-3000:])
        raise SystemExit(f"{tool} failed ({m.returncode})")
    own = re.search(r"merged .* in ([\d.]+) s \(", text)  # mera's last line
    return out, dict(load_before=before, merge_s=float(own.group(1)) if own else None,
                     **m.__dict__)


def median_run(runs: list[dict]) -> dict:
    """The figures of the run of median wall time (memory and merge time from that run)."""
    return dict(sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2], repeats=len(runs),
                seconds_all=[round(r["seconds"], 2) for r in runs])


def print_table(rows: list[dict]) -> None:
    print("\n| K | input GB | cache | dd read MB/s | tool | wall s (runs) | input MB/s | % of dd | "
          "merge s, start-up excluded | input MB/s | % of dd | peak RSS MB (one process) | "
          "peak RSS MB (all processes) | mergekit / this: time, peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mk = next(x for x in rows if x["K"] == r["K"] and x["regime"] == r["regime"]
                  and x["tool"] == "mergekit")
        rate = r["input_gb"] * 1e3 / r["seconds"]
        own = "| | " if r["merge_s"] is None else (
            f"{r['merge_s']:.2f} | {r['input_gb'] * 1e3 / r['merge_s']:.0f} | "
            f"{100 * r['input_gb'] * 1e3 / r['merge_s'] / r['dd_mb_s']:.0f}")
        ratio = "" if r is mk else (f"{mk['seconds'] / r['seconds']:.2f}x, "
                                    f"{mk['tree_rss_mb'] / r['tree_rss_mb']:.2f}x")
        runs = ", ".join(f"{x:.1f}" for x in r["seconds_all"])
        print(f"| {r['K']} | {r['input_gb']:.2f} | {r['regime']} | {r['dd_mb_s']:.0f} | "
              f"{r['tool']} | {r['seconds']:.1f} ({runs}) | {rate:.0f} | "
              f"{100 * rate / r['dd_mb_s']:.0f} | {own} | {r['hwm_mb']:.0f} | "
              f"{r['tree_rss_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
