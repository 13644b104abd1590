#!/usr/bin/env bash
# Writes a folder ready to push as a Hugging Face Space: app.py, its card (README.md) and requirements.txt
# at the top, the package source (src/) and the bundled checkpoint (checkpoints/medm2g-tiny) beside them,
# where app.py and medm2g_diffusers.checkpoints look for them.
# Usage: bash space/assemble.sh OUT_DIR
set -euo pipefail
out=${1:?usage: bash space/assemble.sh OUT_DIR}
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
rm -rf "$out/src" "$out/checkpoints"
mkdir -p "$out/src" "$out/checkpoints"
cp "$root/space/app.py" "$root/space/README.md" "$root/space/requirements.txt" "$out/"
cp -r "$root/src/medm2g_diffusers" "$out/src/"
cp -r "$root/checkpoints/medm2g-tiny" "$out/checkpoints/"
find "$out/src" -name __pycache__ -prune -exec rm -rf {} +
echo "wrote $out; publish it with: huggingface-cli upload <user>/<space> $out . --repo-type space"
