#!/usr/bin/env bash
# Train the bundled byte-level model on the GPU test machine (one device call), or
# measure the training throughput of candidate settings first.
#
#   bash benchmarks/train_log/device_train.sh calibrate
#   bash benchmarks/train_log/device_train.sh train [mamba-train flags...]
#
# Needs, carried with the working tree: .whl (the beartype wheel) and .train_data/stdlib.npz,
# the corpus built on the CI machine's Python 3.11 by `mamba-train --save-corpus` (the
# standard library's files differ between Python versions; the device runs 3.12).
# Writes under $OUT: gpu.txt, train_stdout.txt and, every 20 s while training, the
# latest checkpoint's model files and log (ckpt/), so a timeout still returns a model.
set -uo pipefail
mode=${1:?usage: device_train.sh calibrate|train [flags]}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:packages/mamba-ssm-core/src PYTHONUNBUFFERED=1
OUT=${OUT:?OUT must name the folder that comes back}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt"
python3 - <<'EOF' | tee -a "$OUT/gpu.txt"
import jax, optax
from mamba_ssm_core import ScanSpec, auto_implementation
print("jax", jax.__version__, "optax", optax.__version__, jax.devices())
spec = ScanSpec(64, 512, 512, 16, 1, "bfloat16", True, False)
print("auto scan implementation:", auto_implementation(spec))
EOF
train=(python3 -m mamba_ssm_core._train_cli --corpus .train_data/stdlib.npz)

if [ "$mode" = calibrate ]; then
  # 30 steps each; tokens/s over steps 11-30 (the first step compiles and is not timed).
  for setting in "auto 6 --remat" "auto 6 --no-remat" "chunked 6 --remat" "auto 8 --remat"; do
    set -- $setting
    dir=/tmp/cal-$1-$2$3
    if "${train[@]}" --out "$dir" --impl "$1" --num-hidden-layers "$2" "$3" --steps 1000 \
        --stop-after 30 --batch-size 64 --compute-dtype bfloat16 --log-every 10 \
        --eval-every 0 --eval-tokens 0 --save-every 0 --quiet >"$dir.txt" 2>&1; then
      python3 -c "import json,sys; r=[json.loads(l) for l in open('$dir/train_log.jsonl')]; \
print('$setting', 'loss', r[-1]['loss'], 'tokens/s', r[-1]['tokens_per_s'], \
'wall', r[-1]['elapsed_s'])" | tee -a "$OUT/train_stdout.txt"
    else
      echo "$setting FAILED" | tee -a "$OUT/train_stdout.txt"; tail -20 "$dir.txt" | tee -a "$OUT/train_stdout.txt"
    fi
  done
  exit 0
fi

ckpt=/tmp/ckpt
mkdir -p "$OUT/ckpt"
files="config.json model.safetensors byte_tokenizer.json train_log.jsonl trainer_state.json"
copy_back() {
  for f in $files; do
    if [ -f "$ckpt/$f" ]; then cp "$ckpt/$f" "$OUT/ckpt/.$f" && mv "$OUT/ckpt/.$f" "$OUT/ckpt/$f"; fi
  done
}
( while sleep 20; do copy_back; done ) &
watcher=$!
"${train[@]}" --out "$ckpt" "$@" 2>&1 | tee "$OUT/train_stdout.txt"
status=${PIPESTATUS[0]}
kill "$watcher"
wait "$watcher" 2>/dev/null
copy_back
exit "$status"
