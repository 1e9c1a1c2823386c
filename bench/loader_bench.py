"""Benchmark: mera-ds's shard loader against plain webdataset, in samples per second, on the same
shards, local and on S3 (a moto server on 127.0.0.1).

Three paths over the same samples, alternated in each repeat:

- `webdataset`: `wds.WebDataset(urls).decode(...)`, reading the tars and decoding images to uint8
  arrays (`l8`: what mera's decoder gives for these grayscale PNGs) and the json; audio with
  mera's own call (`media.decode_audio`: soundfile). On S3 it opens shards through fsspec (a
  `gopen_schemes["s3"]` handler: the same s3fs client as mera's), and also through `pipe:aws s3
  cp URL -`, the way webdataset's documentation reads S3;
- `mera decode`: `read_samples` (mera's tar reader and `decode_sample`): the peer of the above;
- `mera train`: the training loader as a finetune job builds it (`make_loader`: resampled
  shards, a shuffle buffer of 256, the `Collator` tokenizing and packing micro-batches for the
  embedded default's tiny LLM), i.e. what a training step receives; in this process, or with
  --loader-workers N in N DataLoader worker processes (data.loader_workers).

    .venv/bin/python -m bench.loader_bench                     # 8000 images, 1000 per shard
    .venv/bin/python -m bench.loader_bench --modality audio --samples 2000 --samples-per-shard 250
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

import fsspec
import numpy as np
import webdataset as wds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("webdataset", "webdataset pipe:aws", "mera decode", "mera train")


def make_shards(out: str, modality: str, samples: int, per_shard: int) -> str:
    """The built-in data's training samples of `modality` (mera_ds/data/synth.py), written to
    OUT/<modality>/train-NNNNNN.tar; returns their pattern."""
    from mera_ds.data.synth import synth_samples
    from mera_ds.data.writer import write_shards

    return write_shards(synth_samples(modality, "train", samples, seed=0),
                        os.path.join(out, modality, "train"), per_shard)


def _decode_audio(data: bytes) -> np.ndarray:
    from mera_ds.data.media import decode_audio

    return decode_audio(data)[0]  # the same call as mera's decoder: only the loaders differ


def wds_samples(urls: list[str]) -> Iterator[dict]:
    """Plain webdataset reading and decoding the shards once, in order."""
    return iter(wds.WebDataset(urls, shardshuffle=False)
                .decode(wds.handle_extension("wav flac", _decode_audio), "l8"))


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    # webdataset 1.0 has no s3:// opener of its own; this one is the transport mera reads with.
    return fsspec.open(url, mode).open()


def mera_decode_samples(pattern: str) -> Iterator[dict]:
    from mera_ds.data.loader import read_samples

    return read_samples(pattern)


def mera_train_batches(pattern: str, collate: Callable, batch_size: int, samples: int,
                       workers: int = 0) -> Iterator[dict]:
    """The micro-batches a finetune job of `samples // batch_size` steps receives (its
    setup_data with the config's defaults: a shuffle buffer of 256, `workers` DataLoader
    workers, by default none: all in this process)."""
    from mera_ds.data.loader import make_loader

    return iter(make_loader(pattern, batch_size=batch_size, collate_fn=collate,
                            num_steps=samples // batch_size, seed=0, shuffle_buffer=256,
                            num_workers=workers))


def batch_samples(batch: dict) -> int:
    """The samples in a collated batch (packed rows hold several)."""
    return sum(len(x) for x in batch["inputs"].values())


def paths(pattern: str, urls: list[str], collate: Callable, batch_size: int, samples: int,
          workers: int = 0) -> dict[str, Callable[[], int]]:
    """{path name: a function reading all of it and returning how many samples it saw}."""
    runs = {
        "webdataset": lambda: sum(1 for _ in wds_samples(urls)),
        "mera decode": lambda: sum(1 for _ in mera_decode_samples(pattern)),
        "mera train": lambda: sum(batch_samples(b) for b in mera_train_batches(
            pattern, collate, batch_size, samples, workers)),
    }
    if pattern.startswith("s3://"):
        wds.gopen_schemes["s3"] = _fsspec_gopen
        endpoint = fsspec.config.conf["s3"]["endpoint_url"]
        piped = [f"pipe:aws s3 cp --quiet --endpoint-url {endpoint} {u} -" for u in urls]
        runs["webdataset pipe:aws"] = lambda: sum(1 for _ in wds_samples(piped))
    return {name: runs[name] for name in PATHS if name in runs}


def measure(pattern: str, collate: Callable, batch_size: int, samples: int, repeats: int,
            workers: int = 0) -> dict[str, dict]:
    """{path: {"rates": samples/s of each repeat, "samples": samples seen}}; the paths alternate
    within each repeat, so that a load coming and going hits them all. A first round is not
    timed: it makes each path's S3 client (mera's has its own retry settings) and warms the
    caches, once-per-process costs that are not throughput."""
    from mera_ds.data.tar import expand_shards

    urls = expand_shards(pattern)
    runs = paths(pattern, urls, collate, batch_size, samples, workers)
    out = {name: {"rates": [], "samples": None} for name in runs}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            seen = run()
            if repeat:
                out[name]["rates"].append(seen / (time.perf_counter() - start))
            out[name]["samples"] = seen
    return out


def collator(modality: str) -> Callable:
    """The training Collator (packing) of the embedded default's tiny MLLM for `modality`."""
    from mera_ds.config import load_config
    from mera_ds.model.mllm import Collator, build_mllm

    cfg = load_config(os.path.join(ROOT, "launch/configs/default.yaml"))
    return Collator(build_mllm(cfg, [modality]), train=True, pack=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A ThreadedMotoServer (what tests/conftest.py starts) in a process of its own.
_SERVE = """
import logging, sys, time
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1])).start()
while True:
    time.sleep(3600)
"""


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 in a child process (so that it does not share the readers'
    GIL), set as the endpoint of s3:// URLs for this process and the aws CLI; its URL."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)])
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", FSSPEC_S3_ENDPOINT_URL=endpoint)
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait()


def upload(pattern: str, local_root: str, bucket: str) -> str:
    """Copy the shards of `pattern` (under local_root) to s3://bucket/...; their s3 pattern."""
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    fs.put(local_root.rstrip("/") + "/", f"{bucket}/", recursive=True)
    return "s3://" + bucket + pattern[len(local_root.rstrip("/")):]


def report(where: str, results: dict[str, dict], size_mb: float) -> dict:
    """Print one location's table; return its medians and ratios."""
    medians = {name: statistics.median(r["rates"]) for name, r in results.items()}
    peer = medians["webdataset"]
    print(f"\n{where} ({size_mb:.1f} MB of shards)")
    for name, rate in medians.items():
        rates = ", ".join(f"{r:,.0f}" for r in results[name]["rates"])
        print(f"  {name:20s} {rate:9,.0f} samples/s  {rate / peer:5.2f}x webdataset  "
              f"({results[name]['samples']} samples; runs: {rates})")
    return {"medians": medians, "ratios": {n: m / peer for n, m in medians.items()},
            "runs": {n: r["rates"] for n, r in results.items()},
            "samples": {n: r["samples"] for n, r in results.items()}}


def main() -> None:
    from bench.convert_bench import parallelism

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modality", choices=["image", "audio"], default="image")
    p.add_argument("--samples", type=int, default=8000)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch of `mera train`")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader worker processes of `mera train` (default: none)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-s3", action="store_true", help="local shards only")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--dir", help="where to write the shards (default: a temporary directory)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # the loader runs beside the training step, on one core
    root = tempfile.mkdtemp(prefix="loader-bench-", dir=args.dir)
    try:
        pattern = make_shards(root, args.modality, args.samples, args.samples_per_shard)
        size_mb = sum(e.stat().st_size for e in
                      os.scandir(os.path.join(root, args.modality))) / 1e6
        collate = collator(args.modality)
        print(f"{args.samples} {args.modality} samples in {pattern}; {os.cpu_count()} CPUs; "
              f"mera train with {args.loader_workers} loader workers; "
              f"cores free for 2 processes before: {parallelism():.2f}")
        settings = (collate, args.batch_size, args.samples, args.repeats, args.loader_workers)
        figures = {"local": report("local", measure(pattern, *settings), size_mb)}
        if not args.no_s3:
            with s3_server():
                s3_pattern = upload(pattern, root, "loader-bench")
                figures["s3"] = report("S3 (moto on 127.0.0.1)", measure(s3_pattern, *settings),
                                       size_mb)
        print(f"\ncores free for 2 processes after: {parallelism():.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), **figures}, f, indent=2)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
