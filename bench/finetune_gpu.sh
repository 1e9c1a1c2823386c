#!/usr/bin/env bash
# Issue 3's figure: the finetune stage (mera-ds: packed rows, flex attention, fused AdamW) and
# HF Trainer + DeepSpeed ZeRO-3 with padded batches and SDPA (the peer, LLaVA's recipe) on the
# same GPU, model and samples, one after the other; prints both and the ratio.
#   bash bench/finetune_gpu.sh [OUT]      (STEPS, MB, SEQ, SIZE override the defaults)
set -euo pipefail
OUT=${1:-/tmp/finetune-bench}
STEPS=${STEPS:-60}; MB=${MB:-8}; SEQ=${SEQ:-2048}; SIZE=${SIZE:-1b}
mkdir -p "$OUT"
run() {
  python3 -m deepspeed.launcher.runner --num_gpus 1 --master_addr 127.0.0.1 \
    bench/finetune_bench.py --out "$OUT" --steps "$STEPS" --seq-len "$SEQ" --size "$SIZE" "$@" \
    2>&1 | grep -E "RESULT|Error|error:" || true
}
run --mode mera --micro-batch "$MB" --attn flex_attention
run --mode hf --micro-batch "$MB" --attn sdpa
run --mode mera --micro-batch $((2 * MB)) --attn flex_attention --tag=_2x
python3 - "$OUT" <<'PY'
import json, os, sys
r = {m: json.load(open(f"{sys.argv[1]}/result-{m}.json")) for m in ("mera", "hf", "mera_2x")
     if os.path.exists(f"{sys.argv[1]}/result-{m}.json")}
for m, x in r.items():
    mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] else "n/a"
    print(f"{m:8s} micro-batch {x['micro_batch']:3d} {x['tokens_per_s']:8.0f} tok/s  MFU {mfu}"
          f"  loss {x['loss']:.3f}  {x['attn']} packing={x['packing']}  {x['device']}")
print(f"ratio mera/hf at the same micro-batch: "
      f"{r['mera']['tokens_per_s'] / r['hf']['tokens_per_s']:.2f}x")
PY
