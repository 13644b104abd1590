#!/usr/bin/env bash
# Trains medm2g-tiny from nothing but the phantom generator (and the IU X-ray report text when
# ../shared/data is present), every stage, on the CPU. Each stage is resumable: rerunning this script after an
# interruption continues from the latest checkpoints.
#   bash training/recipes/tiny.sh            # outputs in runs/tiny (see training/configs/tiny.yaml)
#
# Stages that do not read each other's outputs run side by side in two lanes of one torch thread each (two
# one-thread jobs outpace one two-thread job on these small models; docs/decisions.md):
#   stage 0-1:  image VAE                 | text VAE, then alignment (it needs only the tokenizer)
#   stage 2:    X-ray LDM, then CT LDM    | MRI LDM, then text LDM
#   stage 3:    the multi-flow rounds, alone, on every core
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${CONFIG:-training/configs/tiny.yaml}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-$(nproc)}
launch() { local threads=$1; shift; OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$PY" -m accelerate.commands.launch \
  --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process "$threads" "$@"; }
ROOT=$($PY -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['output_root'])" "$CONFIG")
DATA=$($PY -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['data']['dataset'])" "$CONFIG")
mkdir -p "$ROOT"
LOG="$ROOT/recipe_times.log"

timed() { local start=$SECONDS; "$@"; echo "[tiny.sh] $* took $((SECONDS - start)) s" | tee -a "$LOG"; }
# Runs two lanes (each a shell function) at once; fails if either fails.
lanes() {
  local start=$SECONDS
  "$1" & local a=$!
  "$2" & local b=$!
  local status=0
  wait "$a" || status=$?
  wait "$b" || status=$?
  echo "[tiny.sh] lanes $1 | $2 took $((SECONDS - start)) s" | tee -a "$LOG"
  return "$status"
}
stage() { timed launch 1 training/"$@" --config "$CONFIG" --resume_from_checkpoint latest; }
ldm() { stage train_ldm.py --family "$1"; }

stage01_images() { stage train_autoencoders.py --component vae; }
stage01_text() { stage train_autoencoders.py --component text_vae && stage train_alignment.py; }
stage2_a() { ldm xray && ldm ct; }
stage2_b() { ldm mri && ldm text; }

recipe_start=$SECONDS
# Data: 4,000 virtual patients at 64 px (deterministic; skipped when already written).
[ -f "$DATA/dataset_dict.json" ] || timed .venv/bin/medm2g phantoms --n 4000 --seed 0 --size 64 --out "$DATA"
# Stage 0: the tokenizer (seconds), which the text VAE and the alignment read.
timed launch "$THREADS" training/train_autoencoders.py --config "$CONFIG" --component tokenizer
lanes stage01_images stage01_text
lanes stage2_a stage2_b
# Stage 3: cross-guided multi-flow rounds and image -> image source slots; writes $ROOT/pipeline.
timed launch "$THREADS" training/train_multiflow.py --config "$CONFIG" --resume_from_checkpoint latest
echo "[tiny.sh] recipe took $((SECONDS - recipe_start)) s" | tee -a "$LOG"
