#!/usr/bin/env bash
# Trains medm2g-tiny from nothing but the phantom generator (and the IU X-ray report text when
# ../shared/data is present), every stage in order, on the CPU. Each stage is resumable: rerunning this
# script after an interruption continues from the latest checkpoints.
#   bash training/recipes/tiny.sh            # outputs in runs/tiny (see training/configs/tiny.yaml)
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${CONFIG:-training/configs/tiny.yaml}
PY=${PY:-.venv/bin/python}
LAUNCH="$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
ROOT=$($PY -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['output_root'])" "$CONFIG")
DATA=$($PY -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['data']['dataset'])" "$CONFIG")

timed() { local start=$SECONDS; "$@"; echo "[tiny.sh] $* took $((SECONDS - start)) s" | tee -a "$ROOT/recipe_times.log"; }
mkdir -p "$ROOT"

# Data: 4,000 virtual patients at 64 px (deterministic; skipped when already written).
[ -f "$DATA/dataset_dict.json" ] || timed .venv/bin/medm2g phantoms --n 4000 --seed 0 --size 64 --out "$DATA"
# Stage 0: tokenizer, image VAE, text VAE.
timed $LAUNCH training/train_autoencoders.py --config "$CONFIG" --component all --resume_from_checkpoint latest
# Stage 1: prompt encoders, central alignment + visual invariant.
timed $LAUNCH training/train_alignment.py --config "$CONFIG" --resume_from_checkpoint latest
# Stage 2: single-flow LDMs.
for family in xray ct mri text; do
  timed $LAUNCH training/train_ldm.py --config "$CONFIG" --family "$family" --resume_from_checkpoint latest
done
# Stage 3: cross-guided multi-flow rounds and image -> image source slots; writes $ROOT/pipeline.
timed $LAUNCH training/train_multiflow.py --config "$CONFIG" --resume_from_checkpoint latest
