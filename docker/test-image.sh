#!/usr/bin/env bash
# Check an image end to end: as the image's non-root user (uid 1000), run the embedded default
# cut to its first two modalities (image, video) to its report on a local Ray inside the
# container, then copy the run's report out.
#
#   docker/test-image.sh
#
# Settings (environment):
#   IMAGE    the image                          (localhost/mera-ds:cpu)
#   ENGINE   the container command              (podman; docker works too)
#   OUT      where the report is copied to      (runs/image-test)
#   RUN_OPTS more options for `run`, e.g. "--ulimit nofile=20000:20000 --ulimit nproc=32768:32768"
#            where the engine's default rlimits cannot be set (docker/build-cpu.sh passes them)
#   QUICK=1  the short stages of the pipeline tests (8 finetune and 6 realign steps, 16 eval
#            samples) instead of the default's (300 and 100 steps, the whole eval shard)
set -euo pipefail

cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/mera-ds:cpu}
read -r -a ENGINE <<< "${ENGINE:-podman}"
read -r -a RUN_OPTS <<< "${RUN_OPTS:-}"
OUT=${OUT:-runs/image-test}
QUICK=${QUICK:-0}
NAME=mera-image-test-$$

# Written and run inside the container: the config is the image's own default, cut.
script=$(cat <<'EOF'
set -eu
echo "running as uid $(id -u), gid $(id -g), in $(pwd); DS_ACCELERATOR=$DS_ACCELERATOR"
python - <<'PY'
import os
import yaml
with open("launch/configs/default.yaml") as f:
    cfg = yaml.safe_load(f)
cfg["modalities"] = cfg["modalities"][:2]
cfg["run_dir"] = "runs/two-modalities"
if os.environ.get("QUICK") == "1":   # as tests/conftest.py's two_modalities
    st = cfg["stages"]
    st["finetune"].update(steps=8, warmup_steps=1)
    st["realign"].update(steps=6, batch_size=2, micro_batch_size=1)
    st["eval"].update(max_samples=16, batch_size=16)
with open("/tmp/two-modalities.yaml", "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
PY
mera config check /tmp/two-modalities.yaml
mera run /tmp/two-modalities.yaml
test -s runs/two-modalities/report/report.json
EOF
)

cleanup() { "${ENGINE[@]}" rm --force "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

start=$(date +%s)
# --user: the image's default user, named explicitly so a change of USER cannot pass unnoticed.
# Ray's object store lives in /dev/shm: give it room.
"${ENGINE[@]}" run --name "$NAME" --user 1000 --shm-size=2g -e QUICK="$QUICK" "${RUN_OPTS[@]}" \
    "$IMAGE" bash -c "$script"
echo "container run: $(( $(date +%s) - start )) s"

mkdir -p "$OUT"
rm -rf "$OUT/report"
"${ENGINE[@]}" cp "$NAME:/opt/mera/runs/two-modalities/report" "$OUT/"
echo "report copied to $OUT/report:"
ls -l "$OUT/report"
python3 - "$OUT/report/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("order", r["order"], "P", r["P"], "BRG", r["brg"])
assert r["order"] == ["image", "video"], r["order"]
assert r["brg"] is not None
PY
