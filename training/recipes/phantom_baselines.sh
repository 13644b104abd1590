#!/usr/bin/env bash
# The same-budget plain conditional LDM baseline of every image -> image task of the phantom benchmark, then
# the benchmark's image -> image table per task with medm2g-tiny beside it (docs/results/phantom-baselines.md).
# Per task: training/finetune_lora.py --init scratch with training/configs/phantom_baselines.yaml (the target
# family's denoiser from random weights, trained in full on that task alone; budget and why in the config).
#   bash training/recipes/phantom_baselines.sh [TASK ...]            # train (default: every task, in order)
#   bash training/recipes/phantom_baselines.sh finetune [TASK ...]   # medm2g-tiny fine-tuned in full on the task, same budget
#   FINETUNE_LR=5e-4 bash training/recipes/phantom_baselines.sh finetune [TASK ...]   # the same at another rate (variants/)
#   bash training/recipes/phantom_baselines.sh evaluate [TASK ...]   # score medm2g-tiny, the baseline (and the fine-tune) per task
#   python scripts/write_phantom_baselines_page.py                   # the results page
# The fine-tune (`--full`, from medm2g-tiny, at stage 3's denoiser rate) gets the baseline's steps x batch on the task:
# it asks whether medm2g-tiny's prior helps a translation when the task gets as many samples as the baseline had.
# A model that is already there is not trained again (delete its folder to retrain); each run resumes from its
# latest checkpoint. Needs the tiny recipe's phantoms (runs/tiny/phantoms: bash training/recipes/tiny.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=${CONFIG:-training/configs/phantom_baselines.yaml}
PY=${PY:-.venv/bin/python}
ROOT=$($PY -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['output_root'])" "$CONFIG")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_DATASETS_DISABLE_PROGRESS_BARS=1
# task -> the benchmark's translation (medm2g evaluate --translations), in the benchmark's order.
declare -A TRANSLATION=(
  [phantom_t1_to_ct]="mri_t1->ct" [phantom_t1_t2_flair_to_ct]="mri_t1+mri_t2+mri_flair->ct" [phantom_ct_to_xray]="ct->xray" [phantom_t2_pd_to_t1]="mri_t2+mri_pd->mri_t1"
  [phantom_t1_t2_to_flair]="mri_t1+mri_t2->mri_flair" [phantom_t1_t2_flair_to_pd]="mri_t1+mri_t2+mri_flair->mri_pd"
)
ORDER=(phantom_t2_pd_to_t1 phantom_t1_to_ct phantom_ct_to_xray phantom_t1_t2_to_flair phantom_t1_t2_flair_to_pd phantom_t1_t2_flair_to_ct)
mkdir -p "$ROOT/logs"
timed() { local start=$SECONDS; "$@"; echo "[phantom_baselines.sh] $* took $((SECONDS - start)) s" | tee -a "$ROOT/recipe_times.log"; }

mode=train
case "${1:-}" in evaluate|finetune) mode=$1; shift ;; esac
tasks=("$@")
[ ${#tasks[@]} -gt 0 ] || tasks=("${ORDER[@]}")
for task in "${tasks[@]}"; do
  [ -n "${TRANSLATION[$task]:-}" ] || { echo "unknown task $task; one of ${ORDER[*]}" >&2; exit 2; }
  if [ $mode = train ]; then
    [ -e "$ROOT/$task/scratch" ] && { echo "== $task: $ROOT/$task/scratch exists; skipped"; continue; }
    timed $PY training/finetune_lora.py --config "$CONFIG" --task "$task" --init scratch --resume_from_checkpoint latest \
      > "$ROOT/logs/$task.log" 2>&1
  elif [ $mode = finetune ]; then
    root=$ROOT args=() log=${task}_full
    if [ -n "${FINETUNE_LR:-}" ]; then  # another rate: its own output root, scored as finetuned_lr<rate>
      root=$ROOT/variants/lr$FINETUNE_LR args=(--set "output_root=$root" --set "finetune.learning_rate=$FINETUNE_LR") log=${task}_full_lr$FINETUNE_LR
    fi
    [ -e "$root/$task/full" ] && { echo "== $task: $root/$task/full exists; skipped"; continue; }
    timed $PY training/finetune_lora.py --config "$CONFIG" --task "$task" --full "${args[@]}" --resume_from_checkpoint latest \
      > "$ROOT/logs/$log.log" 2>&1
  else
    finetuned=()  # scored beside the others once trained: the config's rate, then every FINETUNE_LR variant
    [ -e "$ROOT/$task/full" ] && finetuned=(--baseline "finetuned=$ROOT/$task/full")
    for variant in "$ROOT"/variants/lr*; do
      [ -e "$variant/$task/full" ] && finetuned+=(--baseline "finetuned_$(basename "$variant")=$variant/$task/full")
    done
    timed .venv/bin/medm2g evaluate --model medm2g-tiny --baseline "plain_ldm=$ROOT/$task/scratch" "${finetuned[@]}" --tasks image_to_image \
      --translations "${TRANSLATION[$task]}" --threads "$OMP_NUM_THREADS" --out "$ROOT/evaluate/$task" > "$ROOT/logs/evaluate_$task.log" 2>&1
  fi
done
