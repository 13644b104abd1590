#!/usr/bin/env bash
# Trains medm2g-tiny from nothing but the phantom generator (and the IU X-ray report text when
# ../shared/data is present), every stage, on the CPU. Each stage is resumable: rerunning this script after an
# interruption continues from the latest checkpoints.
#   bash training/recipes/tiny.sh            # outputs in runs/tiny (see training/configs/tiny.yaml)
#
# Stages 0-2 run in two lanes of one torch thread each (two one-thread jobs outpace one two-thread job on these
# small models; docs/decisions.md). A lane waits only where it needs the other lane's output:
#   lane 1:  image VAE -> [alignment done?] X-ray LDM -> MRI LDM
#   lane 2:  alignment -> text VAE -> text LDM -> [image VAE done?] CT LDM
#   then stage 3, the multi-flow rounds, alone on every core.
# The split balances the lanes (about 4,030 s each from the stage times measured so far; docs/decisions.md).
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

timed() { local start=$SECONDS; "$@" || return; echo "[tiny.sh] $* took $((SECONDS - start)) s" | tee -a "$LOG"; }
# Lane hand-offs: a stage that finished leaves $ROOT/.tiny_sh/NAME; a lane that failed leaves .tiny_sh/failed, so
# the other lane stops waiting instead of hanging.
MARKS="$ROOT/.tiny_sh"
done_() { touch "$MARKS/$1"; }
await() {
  until [ -e "$MARKS/$1" ]; do
    [ -e "$MARKS/failed" ] && { echo "[tiny.sh] the other lane failed; not waiting for $1" >&2; return 1; }
    sleep 5
  done
}
# Runs two lanes (each a shell function) at once; fails if either fails.
lanes() {
  local start=$SECONDS
  { "$1" || { touch "$MARKS/failed"; false; }; } & local a=$!
  { "$2" || { touch "$MARKS/failed"; false; }; } & local b=$!
  local status=0
  wait "$a" || status=$?
  wait "$b" || status=$?
  echo "[tiny.sh] lanes $1 | $2 took $((SECONDS - start)) s" | tee -a "$LOG"
  return "$status"
}
stage() { timed launch 1 training/"$@" --config "$CONFIG" --resume_from_checkpoint latest; }
ldm() { stage train_ldm.py --family "$1"; }

lane1() { stage train_autoencoders.py --component vae && done_ vae && await alignment && ldm xray && ldm mri; }
lane2() { stage train_alignment.py && done_ alignment && stage train_autoencoders.py --component text_vae && ldm text \
          && await vae && ldm ct; }

recipe_start=$SECONDS
# Data: 4,000 virtual patients at 64 px (deterministic; skipped when already written).
[ -f "$DATA/dataset_dict.json" ] || timed "$PY" -m medm2g_diffusers.cli phantoms --n 4000 --seed 0 --size 64 --out "$DATA"
# Stage 0: the tokenizer (seconds), which the text VAE and the alignment read.
timed launch "$THREADS" training/train_autoencoders.py --config "$CONFIG" --component tokenizer
rm -rf "$MARKS" && mkdir -p "$MARKS"
lanes lane1 lane2
# Stage 3: cross-guided multi-flow rounds and image -> image source slots; writes $ROOT/pipeline.
timed launch "$THREADS" training/train_multiflow.py --config "$CONFIG" --resume_from_checkpoint latest
echo "[tiny.sh] recipe took $((SECONDS - recipe_start)) s" | tee -a "$LOG"
