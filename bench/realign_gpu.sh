#!/usr/bin/env bash
# Issue 5's figure: a realign step (LLM frozen, connectors trained) against a finetune step (LLM
# and connector trained) of the same job, model and batches; prints both and the ratio.
#   bash bench/realign_gpu.sh [OUT]      (STEPS, MB, SEQ, SIZE override the defaults)
set -euo pipefail
OUT=${1:-/tmp/realign-bench}
STEPS=${STEPS:-60}; MB=${MB:-8}; SEQ=${SEQ:-2048}; SIZE=${SIZE:-1b}
mkdir -p "$OUT"
for mode in mera realign; do
  python3 -m deepspeed.launcher.runner --num_gpus 1 --master_addr 127.0.0.1 \
    bench/finetune_bench.py --out "$OUT" --steps "$STEPS" --seq-len "$SEQ" --size "$SIZE" \
    --mode "$mode" --micro-batch "$MB" --attn flex_attention 2>&1 | grep -E "RESULT|Error" || true
done
python3 - "$OUT" <<'PY'
import json, sys
f, r = (json.load(open(f"{sys.argv[1]}/result-{m}.json")) for m in ("mera", "realign"))
for name, x in (("finetune", f), ("realign", r)):
    ms = 1000 * f["micro_batch"] * x["mean_sample_tokens"] / x["tokens_per_s"]
    print(f"{name:9s} {x['tokens_per_s']:8.0f} tok/s  {ms:6.0f} ms/step  {x['device']}")
print(f"realign step / finetune step: {f['tokens_per_s'] / r['tokens_per_s']:.2f}")
PY
