"""Finetune-job throughput: mera-ds's ZeRO-3 job against the recipe users would otherwise use,
Hugging Face Trainer + DeepSpeed ZeRO-3 (LLaVA's), on the same LLaMA-shaped LLM and the same
samples in the same order.

One mode per launch (each is its own DeepSpeed job); bench/finetune_gpu.sh runs both and prints
the ratio:

    deepspeed --num_gpus 1 bench/finetune_bench.py --mode mera --out /tmp/ftb
    deepspeed --num_gpus 1 bench/finetune_bench.py --mode hf   --out /tmp/ftb

`--size tiny` with DS_ACCELERATOR=cpu checks the script on a CPU in a minute. mera's modes also
print the loader's share of step time (the steps' wait for their batches, `data_wait_s`).

Samples: a precomputed-feature modality (no encoder: the LLM step is what is measured) with
instructions whose lengths follow a log-normal law around 600 tokens, cut at the sequence length,
as instruction-tuning data does. Throughput counts real tokens (no padding); model FLOPs per token
count the LLM's matrix products (6 N) and causal attention (6 L h s for a sample of s tokens).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {
    # Llama-3.2-1B's shape with a 32k vocabulary: about 1.1B parameters.
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, vocab_size=32000),
    # About 100M parameters: the CPU side of the realign comparison.
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, intermediate_size=2048, vocab_size=8000),
    # The embedded default's tiny Llama (launch/configs/default.yaml).
    "default": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, intermediate_size=256, vocab_size=512),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=128, vocab_size=512),
}
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense, per GPU
FEATURE_DIM, FEATURE_TOKENS = 256, 32


def make_shards(out: str, n: int, seq_len: int, seed: int) -> str:
    """Write the benchmark's samples once (rank 0); return their pattern."""
    from mera_ds.data.writer import encode_sample, write_shards
    from mera_ds.model import tiny

    prefix = os.path.join(out, "shards", "train")
    pattern_file = os.path.join(out, "shards", "pattern.txt")
    if os.path.exists(pattern_file):
        return open(pattern_file).read()
    rng = np.random.default_rng(seed)
    words = [w for w in tiny.TASK_WORDS + tiny.LETTERS]
    budget = seq_len - FEATURE_TOKENS - 16  # template, placeholder block and answer

    def samples():
        for i in range(n):
            length = int(np.clip(rng.lognormal(math.log(600), 0.6), 32, budget))
            text = " ".join(rng.choice(words, size=length))
            meta = {"modality": "feat", "instruction": text, "answer": str(rng.choice(words)),
                    "label": 0}
            feats = rng.standard_normal((FEATURE_TOKENS, FEATURE_DIM)).astype(np.float32)
            yield encode_sample(f"feat-{i:06d}", meta, "features", feats)

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    pattern = write_shards(samples(), prefix, samples_per_shard=500)
    with open(pattern_file + ".tmp", "w") as f:
        f.write(pattern)
    os.replace(pattern_file + ".tmp", pattern_file)  # other ranks wait for it whole
    return pattern


def wait_for_shards(out: str) -> str:
    """The pattern rank 0 wrote the shards under (other ranks start before it is done)."""
    pattern_file = os.path.join(out, "shards", "pattern.txt")
    while not os.path.exists(pattern_file):
        time.sleep(0.5)
    return open(pattern_file).read()


def default_config(args, mode: str):
    """The embedded default's run (launch/configs/default.yaml: its tiny MLLM, encoder and
    built-in shards) cut to `--modality`, for `--data default`; the steps and micro-batch of the
    command line, one micro-batch per rank."""
    from mera_ds.config import load_config, parse_config

    data = load_config(os.path.join(ROOT, "launch/configs/default.yaml")).model_dump()
    modality = next((m for m in data["modalities"] if m["name"] == args.modality), None)
    if modality is None:
        raise SystemExit(f"--modality {args.modality}: not one of the embedded default's")
    world = int(os.environ.get("WORLD_SIZE", 1))
    data.update(run_dir=os.path.join(args.out, f"run-{mode}"), modalities=[modality])
    data["stages"]["finetune"].update(steps=args.steps, batch_size=args.micro_batch * world,
                                      micro_batch_size=args.micro_batch, warmup_steps=2)
    data["cluster"]["num_workers"] = world
    return parse_config(data, "bench")


def run_config(args, pattern: str, mode: str):
    from mera_ds.config import parse_config

    gpu = args.size not in ("tiny", "default", "100m")
    world = int(os.environ.get("WORLD_SIZE", 1))  # one sample batch of micro_batch per rank
    return parse_config({
        "run_dir": os.path.join(args.out, f"run-{mode}"),
        "seed": 0,
        "llm": {"tiny": {**SIZES[args.size], "max_position_embeddings": args.seq_len},
                "dtype": "bfloat16" if gpu else "float32", "attn_implementation": args.attn,
                "max_length": args.seq_len},
        "modalities": [{"name": "feat",
                        "encoder": {"type": "precomputed", "feature_dim": FEATURE_DIM,
                                    "num_tokens": FEATURE_TOKENS},
                        "connector": {"type": "mlp2x_gelu"},
                        "train_shards": pattern, "eval_shards": pattern}],
        "stages": {"finetune": {"steps": args.steps, "batch_size": args.micro_batch * world,
                                "micro_batch_size": args.micro_batch, "warmup_steps": 2,
                                "packing": mode != "hf" and not args.no_pack}},
        "data": {"shuffle_buffer": 0},
        "cluster": {"num_workers": world, "use_gpu": gpu, "timeout_s": 600,
                    "deepspeed_config": "ds_configs/zero3_bf16.json" if gpu
                    else "ds_configs/zero3_cpu.json"},
    }, "bench")


def flops_per_token(cfg, pattern: str, n_samples: int, n_params: int) -> tuple[float, float]:
    """(model FLOPs per real token, mean sample length) over the samples the runs consume."""
    from mera_ds.data.loader import sample_stream
    from mera_ds.model import tiny

    tok = tiny.tiny_tokenizer()
    shape = cfg.llm.tiny
    lengths = []
    for i, s in enumerate(sample_stream(pattern, resampled=True, seed=cfg.seed * 1_000_003)):
        if i == n_samples:
            break
        text = f"user : {s['instruction']} assistant : {s['answer']}"
        lengths.append(len(tok(text)["input_ids"]) + FEATURE_TOKENS + 1)
    lengths = np.array(lengths, dtype=np.float64)
    attn = 6 * shape["num_hidden_layers"] * shape["hidden_size"] * lengths
    return float(((6 * n_params + attn) * lengths).sum() / lengths.sum()), float(lengths.mean())


def finetune_step(cfg):
    """The plan's finetune step of the config's (first) modality: what `mera run` would train."""
    from mera_ds.run.layout import RunLayout
    from mera_ds.run.plan import Method, find_step, plan

    return find_step(plan(cfg, Method.of(cfg), RunLayout.of(cfg)), "finetune",
                     cfg.modalities[0].name)


def bench_mera(cfg, realign: str | None = None) -> dict:
    """The finetune job itself (run_job), without the export; with `realign` (a
    stages.realign.mode), the same job as the realign phase runs it: LLM frozen (no gradients,
    no optimizer state), connector trained, same model, batches and steps."""
    from mera_ds.train.recipe import run_job

    spec = dataclasses.replace(finetune_step(cfg).spec, export_llm=None,
                               export_connectors={}, tensorboard=None)
    if realign:
        ft = cfg.stages.finetune
        settings = cfg.stages.realign.model_copy(update=dict(
            mode=realign, steps=ft.steps, batch_size=ft.batch_size,
            micro_batch_size=ft.micro_batch_size, warmup_steps=ft.warmup_steps,
            packing=ft.packing))
        spec = dataclasses.replace(spec, phase="realign", train_llm=False, settings=settings,
                                   lr_connector=cfg.stages.realign.lr)
    m = run_job(cfg, spec)
    # The loader's share of step time: how long the steps waited in next() for their batches.
    return {"tokens_per_s": m["tokens_per_s"], "loss": m["loss"],
            "data_wait_s": m["data_wait_s"], "loop_s": m["loop_s"],
            "data_wait_share": m["data_wait_s"] / m["loop_s"]}


def bench_hf(cfg) -> dict:
    """HF Trainer + DeepSpeed ZeRO-3 on the same MLLM and the same sample stream, padded
    batches (LLaVA's collator pads to the longest sample of the batch)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from mera_ds.data.loader import sample_stream
    from mera_ds.model.llm import DTYPES, build_llm
    from mera_ds.model.mllm import Collator, build_mllm, set_trainable
    from mera_ds.train.runtime import deepspeed_config, init_distributed

    init_distributed(cfg)
    ds = deepspeed_config(cfg, cfg.stages.finetune)
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 - the LLM is created partitioned, as in LLaVA
    llm, tok = build_llm(cfg.llm)
    mllm = build_mllm(cfg, ["feat"], llm=llm, tokenizer=tok)
    set_trainable(mllm, llm=True, connectors=["feat"])
    mllm.to(dtype=DTYPES[cfg.llm.dtype])
    collate = Collator(mllm, train=True)
    ft = cfg.stages.finetune

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.tokens = 0

        def forward(self, **batch):
            self.tokens += int(batch["num_tokens"])
            return self.inner(batch)

    class Samples(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(sample_stream(ft_pattern, resampled=True, seed=cfg.seed * 1_000_003))

    ft_pattern = cfg.modalities[0].train_shards
    model = Wrapped(mllm)
    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), model.tokens))

    targs = TrainingArguments(
        output_dir=os.path.join(cfg.run_dir, "hf"), per_device_train_batch_size=ft.micro_batch_size,
        max_steps=ft.steps, learning_rate=ft.lr_llm, lr_scheduler_type="cosine",
        warmup_steps=ft.warmup_steps, weight_decay=0.0, max_grad_norm=ft.grad_clip,
        bf16=cfg.llm.dtype == "bfloat16", deepspeed=ds, logging_steps=max(1, ft.steps // 10),
        save_strategy="no", report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=not cfg.cluster.use_gpu,
        accelerator_config={"dispatch_batches": False})  # batches carry modality names
    trainer = Trainer(model=model, args=targs, train_dataset=Samples(), data_collator=collate,
                      callbacks=[Clock()])
    out = trainer.train()
    warm = max(1, len(marks) // 5)
    (t0, n0), (t1, n1) = marks[warm - 1], marks[-1]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0), "loss": float(out.training_loss)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["mera", "hf", "realign"], required=True)
    p.add_argument("--realign-mode", choices=["zero3", "data_parallel"], default="zero3",
                   help="--mode realign: where the frozen LLM lives")
    p.add_argument("--out", required=True)
    p.add_argument("--data", choices=["features", "default"], default="features",
                   help="features: long instructions of precomputed features at --size; "
                        "default: the embedded default's model and built-in shards (make shards)")
    p.add_argument("--modality", default="image", help="--data default: which modality")
    p.add_argument("--size", choices=list(SIZES), default="1b")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--attn", default="sdpa", help="attention implementation of both runs")
    p.add_argument("--no-pack", action="store_true", help="mera: pad like the peer")
    p.add_argument("--tag", default="", help="suffix of the result file")
    p.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = p.parse_args()
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.makedirs(args.out, exist_ok=True)
    if args.data == "default":
        if args.mode == "hf":
            raise SystemExit("--data default: --mode mera or realign")
        cfg = default_config(args, args.mode)
        result = bench_mera(cfg, args.realign_mode if args.mode == "realign" else None)
        result.update(mode=args.mode, data="default", modality=args.modality,
                      micro_batch=args.micro_batch, steps=args.steps)
        report(args, result)
        return
    if int(os.environ.get("RANK", "0")) == 0:
        make_shards(args.out, args.samples, args.seq_len, seed=0)
    pattern = wait_for_shards(args.out)
    cfg = run_config(args, pattern, args.mode)
    result = (bench_hf(cfg) if args.mode == "hf" else
              bench_mera(cfg, args.realign_mode if args.mode == "realign" else None))

    from transformers import LlamaConfig

    shape = LlamaConfig(**cfg.llm.tiny)
    h, L, i, v = (shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size,
                  shape.vocab_size)
    kv = h * shape.num_key_value_heads // shape.num_attention_heads
    n_params = L * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * v * h
    fpt, mean_len = flops_per_token(cfg, pattern, args.steps * args.micro_batch, n_params)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    result.update(mode=args.mode, device=name, attn=args.attn, packing=cfg.stages.finetune.packing, params=n_params, seq_len=args.seq_len,
                  micro_batch=args.micro_batch, steps=args.steps, mean_sample_tokens=mean_len,
                  model_flops_per_token=fpt,
                  mfu=result["tokens_per_s"] * fpt / peak if peak else None)
    report(args, result)


def report(args, result: dict) -> None:
    """Rank 0 prints the result (and the loader's share of step time) and writes it to
    OUT/result-MODE[TAG].json."""
    import torch

    if int(os.environ.get("RANK", "0")) != 0:
        return
    result.setdefault("device", torch.cuda.get_device_name() if torch.cuda.is_available()
                      else "cpu")
    if "data_wait_share" in result:
        print(f"loader share of step time: {100 * result['data_wait_share']:.1f}% "
              f"({result['data_wait_s']:.2f} s of {result['loop_s']:.1f} s waiting for "
              "batches)")
    print("RESULT " + json.dumps(result))
    with open(os.path.join(args.out, f"result-{args.mode}{args.tag}.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
