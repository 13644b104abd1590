#!/usr/bin/env bash
# The ablation of the paper's Table 5 on text <-> X-ray, every variant retrained (stages 1-3) on one reduced
# budget from medm2g-tiny's stage 0 (tokenizer, image VAE, text VAE: run training/recipes/tiny.sh first):
#   baseline  prompt encoders not aligned (1 alignment step: their initialisation), single-flow LDMs
#   ca        + central alignment (InfoNCE, text as the hub), no visual invariant
#   ca_lcga   + cross-guided generation (stage 3 round text_xray on top of ca's LDMs)
#   ca_vi     + visual invariant (Barlow Twins) in the alignment
#   all       ca_vi + cross-guided generation
# Budgets (training/configs/ablation.yaml): alignment 600 steps; tiny.yaml's stage-2 recipe with the X-ray LDM at
# its 1,000 steps and the text LDM at 3,000 of its 12,000; stage 3 150 steps of V/f/θ_c only. Every variant gets
# the same LDM budget; the two cross-guided ones get their 150 extra steps of the cross-guided sublayers on top
# (the method's own cost). Wall times go to runs/ablation/recipe_times.log.
#   bash training/recipes/ablation.sh      # then: bash training/recipes/ablation.sh evaluate
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${CONFIG:-training/configs/ablation.yaml}
PY=${PY:-.venv/bin/python}
TINY=${TINY:-runs/tiny}
ROOT=${ROOT:-runs/ablation}
LAUNCH="$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
mkdir -p "$ROOT"
timed() { local start=$SECONDS; "$@"; echo "[ablation.sh] $* took $((SECONDS - start)) s" | tee -a "$ROOT/recipe_times.log"; }

if [ "${1:-train}" = "evaluate" ]; then
  # Text -> X-ray and X-ray -> report on the held-out phantom test split, every variant side by side; one sampled
  # report per X-ray, as the published ablation was measured (before report candidates).
  exec .venv/bin/medm2g evaluate --model "$ROOT/baseline/pipeline_single_flow" --name baseline \
    --baseline ca="$ROOT/ca/pipeline_single_flow" --baseline ca_lcga="$ROOT/ca/pipeline" \
    --baseline ca_vi="$ROOT/ca_vi/pipeline_single_flow" --baseline all="$ROOT/ca_vi/pipeline" \
    --tasks report_generation text_to_image --text-to-image-targets xray --report-candidates 1 --classifiers "$TINY/evaluate/finding_classifiers" \
    --out "$ROOT/evaluate" "${@:2}"
fi

# Data: a subset of medm2g-tiny's training and validation patients (never its test split; the "test" split
# here is 8 more validation patients, because a saved DatasetDict cannot hold an empty split).
[ -f "$ROOT/phantoms/dataset_dict.json" ] || $PY - "$TINY/phantoms" "$ROOT/phantoms" <<'PYEOF'
import sys
from datasets import DatasetDict, load_from_disk
source = load_from_disk(sys.argv[1])
DatasetDict({"train": source["train"].select(range(1600)), "validation": source["validation"].select(range(200)),
             "test": source["validation"].select(range(200, 208))}).save_to_disk(sys.argv[2])
PYEOF

for variant in baseline ca ca_vi; do
  dir="$ROOT/$variant"
  mkdir -p "$dir"
  for part in tokenizer vae text_vae; do [ -d "$dir/$part" ] || cp -r "$TINY/$part" "$dir/$part"; done
  case $variant in
    baseline) flags=(--no-vi --set 'alignment.rounds=[{name: hub, pairs: [[text, xray]], trainable: [text, xray], steps: 1}]') ;;
    ca) flags=(--no-vi) ;;
    ca_vi) flags=() ;;
  esac
  [ -d "$dir/prompt_encoders" ] || timed $LAUNCH training/train_alignment.py --config "$CONFIG" --set "output_root=$dir" "${flags[@]}"
  for family in xray text; do
    [ -d "$dir/unet_$family" ] || timed $LAUNCH training/train_ldm.py --config "$CONFIG" --set "output_root=$dir" --family "$family"
  done
  [ -d "$dir/pipeline_single_flow" ] || timed $PY scripts/export_single_flow_pipeline.py --root "$dir" --out "$dir/pipeline_single_flow"
  if [ "$variant" != baseline ]; then
    [ -d "$dir/pipeline" ] || timed $LAUNCH training/train_multiflow.py --config "$CONFIG" --set "output_root=$dir"
  fi
done
