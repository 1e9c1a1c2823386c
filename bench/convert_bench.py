"""Benchmark: `mera shards convert` of LLaVA-style image data with 1 and with 2 worker processes.

Writes --images small JPEGs (--size x --size, smooth random gradients with noise, as photos
compress) and a LLaVA JSON of single-turn records about them into a temporary directory, then
converts them --repeats times with --workers 1 and with --workers 2, alternately, each into a fresh
output, and prints the median records per second of each and their ratio, and how many cores a
pure-Python loop gets before and after (the figures are only as good as the machine is idle). Checks that both wrote the same bytes. The
media are read from the page cache (just written): this measures the converter, not the disk.

    .venv/bin/python -m bench.convert_bench                 # 10,000 64x64 JPEGs, 1000 per shard
    .venv/bin/python -m bench.convert_bench --images 2000 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from mera_ds.data.convert import convert_llava
from mera_ds.data.tar import expand_shards


def make_dataset(root: str, images: int, size: int) -> str:
    """JPEGs under root/img and root/llava.json; returns the JSON's path."""
    os.makedirs(f"{root}/img")
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    records = []
    for i in range(images):
        a, b, c = rng.uniform(0, 255, 3)
        pixels = np.stack([a * y + b * x / 2, np.full_like(x, c), (255 - a) * x], axis=-1)
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(f"{root}/img/{i:06d}.jpg", quality=90)
        records.append({"id": f"bench-{i}", "image": f"img/{i:06d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour dominates the picture?"},
            {"from": "gpt", "value": "red" if a > c else "blue"}]})
    path = f"{root}/llava.json"
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def timed_convert(source: str, root: str, out_dir: str, workers: int, per_shard: int) -> tuple:
    """(records per second, pattern) of one conversion into a fresh out_dir."""
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    result = convert_llava(source, root, "image", f"{out_dir}/train-%06d.tar",
                           samples_per_shard=per_shard, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    assert result["skipped"] == 0, result["skipped_records"][:3]
    return result["records"] / seconds, result["pattern"]


def _spin(n: int) -> float:
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - start


def parallelism(n: int = 5_000_000) -> float:
    """How many cores this benchmark gets now: the work two processes do at once over what one
    does alone (2.0 on an idle 2-core machine; less when others use the cores)."""
    alone = _spin(n)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        start = time.perf_counter()
        pool.map(_spin, [n, n])
        together = time.perf_counter() - start
    return 2 * alone / together


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", help="where to write (default: a temporary directory)")
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="convert-bench-", dir=args.dir)
    try:
        start = time.perf_counter()
        source = make_dataset(root, args.images, args.size)
        megabytes = sum(e.stat().st_size for e in os.scandir(f"{root}/img")) / 1e6
        print(f"{args.images} JPEGs of {args.size}x{args.size} ({megabytes:.1f} MB) written in "
              f"{time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs")
        print(f"load average before: {os.getloadavg()[0]:.2f}; cores free for 2 processes "
              f"(a pure-Python loop): {parallelism():.2f}")
        runs, shards = {1: [], 2: []}, {}
        for _ in range(args.repeats):  # alternated, so that a load coming and going hits both
            for workers in (1, 2):
                rate, pattern = timed_convert(source, root, f"{root}/out{workers}", workers,
                                              args.samples_per_shard)
                runs[workers].append(rate)
                shards[workers] = [open(u, "rb").read() for u in expand_shards(pattern)]
        print(f"load average after: {os.getloadavg()[0]:.2f}; cores free for 2 processes: "
              f"{parallelism():.2f}")
        rates = {w: statistics.median(r) for w, r in runs.items()}
        for workers, rate in rates.items():
            print(f"--workers {workers}: {rate:,.0f} records/s (median of {args.repeats}: "
                  f"{', '.join(f'{r:,.0f}' for r in runs[workers])})")
        assert shards[1] == shards[2], "workers 1 and 2 wrote different shards"
        paired = statistics.median(b / a for a, b in zip(runs[1], runs[2]))
        print(f"ratio (2 / 1): {rates[2] / rates[1]:.2f} (median of the runs side by side: "
              f"{paired:.2f}); {len(shards[1])} identical shards")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
