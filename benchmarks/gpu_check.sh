#!/usr/bin/env bash
# Base-config throughput on a GPU: text -> X-ray images/s (batch 8, 50 DDIM steps, random weights) and stage-2
# training samples/s (train_ldm.py --family xray at base.yaml sizes), recorded with the card's name.
#
#   bash benchmarks/gpu_check.sh [--out runs/perf/gpu_check.json] [more options of benchmarks/gpu_check.py]
#   bash benchmarks/gpu_check.sh --dry-run     # no GPU needed: the same code on CPU at tiny.yaml sizes, a few steps
#
# Without a GPU (no nvidia-smi, or torch sees no CUDA device) it says so and exits 0. Method: gpu_check.py's docstring.
# Needs about 25 GB of disk in the temporary folder (the random pipeline, 7 GB, and train_ldm's final checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    exec "$PYTHON" benchmarks/gpu_check.py "$@"
  fi
done
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "no GPU: nvidia-smi is not on PATH; nothing measured (bash benchmarks/gpu_check.sh --dry-run checks the code on CPU)"
  exit 0
fi
if ! card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1) || [[ -z "$card" ]]; then
  echo "no GPU: nvidia-smi lists no device; nothing measured"
  exit 0
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no GPU: nvidia-smi lists '$card' but torch.cuda is not available (a CPU build of torch?); nothing measured"
  exit 0
fi
echo "card: $card"
exec "$PYTHON" benchmarks/gpu_check.py --card "$card" "$@"
