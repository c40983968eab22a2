#!/usr/bin/env bash
# The one-shot GPU check: attention MFU per kernel, training MFU of a GPT-J-1.3B shape, and bf16, int8 and int4
# decode of a GPT-J-6B shape on one H100/H200, each against the hardware limit (see benchmarks/gpu_bench.py).
#
#   benchmarks/gpu.sh                 # the real run (< 10 minutes); results in $OUT or benchmarks/results
#   benchmarks/gpu.sh --dry-run       # shapes shrunk: runs end to end on a CPU in seconds
#   benchmarks/gpu.sh --parts=train --train-batch=4   # any gpu_bench.py flag passes through
#
# Needs only jax (with CUDA), flax, optax and numpy: no network, tensorflow, seqio, clu or ml_collections.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import jax, flax, optax" 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
fi
if [[ -z "${PYTHON:-}" ]]; then
  echo "gpu.sh: no python with jax, flax and optax found (set PYTHON=...)" >&2
  exit 2
fi

args=("$@")
dry_run=0
has_json=0
for a in "$@"; do
  [[ "$a" == "--dry-run" ]] && dry_run=1
  [[ "$a" == --json* ]] && has_json=1
done
out_dir=${OUT:-benchmarks/results}
if [[ $has_json == 0 && $dry_run == 0 ]]; then
  mkdir -p "$out_dir"
  args+=(--json "$out_dir/gpu_results.json")
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
# The 1.3B training state, activations and the 6B decode weights need most of the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}

if [[ $dry_run == 0 ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
fi
# Hard stop well inside the 10-minute budget; results are written after each part.
limit=${GPU_BENCH_TIMEOUT:-560}
if [[ $dry_run == 1 ]]; then
  exec timeout "$limit" "$PYTHON" benchmarks/gpu_bench.py "${args[@]}"
fi
mkdir -p "$out_dir"
set +e
timeout "$limit" "$PYTHON" benchmarks/gpu_bench.py "${args[@]}" 2>&1 | tee "$out_dir/gpu_log.txt"
status=${PIPESTATUS[0]}
[[ $status == 124 ]] && echo "gpu.sh: stopped after ${limit}s; partial results kept" >&2
exit "$status"
