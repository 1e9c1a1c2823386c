#!/usr/bin/env bash
# A realign step (LLM frozen, connectors trained), with the LLM partitioned (zero3) and whole on
# every GPU (data_parallel), against a finetune step (LLM and connector trained) of the same job,
# model and batches; prints each and the ratios.
#   bash bench/realign_bench.sh [OUT]   (STEPS, MB, SEQ, SIZE, GPUS, ATTN, DATA: see below)
# On CPU, 2 gloo ranks:
#   DS_ACCELERATOR=cpu LAUNCH="torchrun --nproc_per_node 2 --master_addr 127.0.0.1" \
#     SIZE=default SEQ=512 ATTN=sdpa bash bench/realign_bench.sh /tmp/rb
# DATA=default runs the embedded default's own model and image shards (make shards) instead of
# long precomputed-feature samples at SIZE (SEQ, SIZE and ATTN are then unused).
set -euo pipefail
OUT=${1:-/tmp/realign-bench}
STEPS=${STEPS:-60}; MB=${MB:-8}; SEQ=${SEQ:-2048}; SIZE=${SIZE:-1b}; GPUS=${GPUS:-1}
ATTN=${ATTN:-flex_attention}; DATA=${DATA:-features}
LAUNCH=${LAUNCH:-"python3 -m deepspeed.launcher.runner --num_gpus $GPUS --master_addr 127.0.0.1"}
mkdir -p "$OUT"
for args in "--mode mera" "--mode realign --realign-mode zero3 --tag=-zero3" \
            "--mode realign --realign-mode data_parallel --tag=-data_parallel"; do
  # shellcheck disable=SC2086  # $LAUNCH and $args: several words each
  $LAUNCH bench/finetune_bench.py --out "$OUT" --steps "$STEPS" --seq-len "$SEQ" \
    --size "$SIZE" --micro-batch "$MB" --attn "$ATTN" --data "$DATA" $args 2>&1 | grep -E "RESULT|Error" || true
done
python3 - "$OUT" <<'PY'
import json, sys
r = {m: json.load(open(f"{sys.argv[1]}/result-{f}.json")) for m, f in (
    ("finetune", "mera"), ("zero3", "realign-zero3"), ("data_parallel", "realign-data_parallel"))}
for name, x in r.items():
    print(f"{name:14s} {x['tokens_per_s']:8.0f} tok/s  {x['device']}")
for m in ("zero3", "data_parallel"):
    print(f"realign step ({m}) / finetune step: "
          f"{r['finetune']['tokens_per_s'] / r[m]['tokens_per_s']:.2f}")
PY
