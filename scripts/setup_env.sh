#!/usr/bin/env bash
# Creates .venv with the CPU build of PyTorch and this package. Idempotent: a second run only checks.
# torch is installed first, pinned, so the package's torch range is already satisfied and pip never
# reaches for the multi-GB CUDA wheel. On a GPU machine, install the torch build you want first instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade pip
  # Elsewhere, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU wheel from PyTorch's index.
  .venv/bin/pip install --quiet "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
.venv/bin/pip install --quiet -e ".[test${EXTRAS:+,$EXTRAS}]"
