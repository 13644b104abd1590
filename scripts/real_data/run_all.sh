#!/usr/bin/env bash
# Every number of docs/results/real-data.md, from the shared real data sets: prepare them, train each task's
# models on one budget (training/configs/lora.yaml, training/configs/regression.yaml), score them on the real
# validation splits (and the Harvard test series) with `medm2g evaluate`, and write the page. Run from the repository root:
#
#     bash scripts/real_data/run_all.sh           # DATA=../shared/data OUT=runs/real JOBS=2
#
# Per task, in runs/real/<task>/: lora/ (the adapter on medm2g-tiny), scratch/ (the plain conditional LDM: the
# same denoisers from random weights, trained in full), regression/ (image -> image tasks: a pix2pix-style UNet
# without the adversary), each with its *_training/budget.json. A model that is already there is not trained
# again (delete its folder to retrain). JOBS trainings run side by side, one torch thread each (the tiny
# denoisers gain little from a second thread; see docs/performance.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/real}
JOBS=${JOBS:-2}
PY=.venv/bin/python
export OMP_NUM_THREADS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
mkdir -p "$OUT/logs"

DATA="$DATA" OUT="$OUT" bash scripts/real_data/prepare_all.sh

# TASK SET MODE: train one model of TASK on $OUT/SET unless its folder exists; the log goes to $OUT/logs/TASK_MODE.log.
train() {
    local task=$1 set=$2 mode=$3 args=()
    [[ -e "$OUT/$task/$mode" ]] && { echo "== $task $mode: $OUT/$task/$mode exists; skipped"; return; }
    case $mode in
        lora) args=(training/finetune_lora.py --config training/configs/lora.yaml --task "$task") ;;
        scratch) args=(training/finetune_lora.py --config training/configs/lora.yaml --task "$task" --init scratch) ;;
        regression) args=(training/train_regression_baseline.py --config training/configs/regression.yaml --task "$task") ;;
    esac
    echo "== $task $mode"
    "$PY" "${args[@]}" --dataset "$OUT/$set" --set "output_root=$OUT" --resume_from_checkpoint latest > "$OUT/logs/${task}_${mode}.log" 2>&1
    echo "== $task $mode done ($(grep -ho '"train_seconds": [0-9.]*' "$OUT/$task/${mode}_training/budget.json" || echo '?'))"
}

JOBLIST=(
    "harvard_mri_to_ct harvard_ct_mri lora" "harvard_mri_to_ct harvard_ct_mri scratch" "harvard_mri_to_ct harvard_ct_mri regression"
    "brats_t1_t2_to_flair brats lora" "brats_t1_t2_to_flair brats scratch" "brats_t1_t2_to_flair brats regression"
    "brats_t1_t1c_t2_to_flair brats lora" "brats_t1_t1c_t2_to_flair brats scratch" "brats_t1_t1c_t2_to_flair brats regression"
    "covid_report_xray covid_cxr lora" "covid_report_xray covid_cxr scratch"
    "synthrad_text_to_ct synthrad_ct lora" "synthrad_text_to_ct synthrad_ct scratch"
)
for job in "${JOBLIST[@]}"; do
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
    train $job &
done
wait

# NAME SET ARG...: score a task's models on the validation split of $OUT/SET (SPLIT=test for its test split), beside the
# unfine-tuned medm2g-tiny.
evaluate() {
    local name=$1 data=$2
    shift 2
    echo "== evaluate $name"
    .venv/bin/medm2g evaluate --data "$OUT/$data" --split "${SPLIT:-validation}" --threads 2 --name lora \
        --out "$OUT/evaluate/$name" "$@" > "$OUT/logs/evaluate_$name.log" 2>&1
}
evaluate harvard_mri_to_ct harvard_ct_mri --model "$OUT/harvard_mri_to_ct/lora" --tasks image_to_image \
    --translations "mri_t2->ct" --baseline "unfine-tuned=medm2g-tiny" --baseline "plain_ldm=$OUT/harvard_mri_to_ct/scratch" \
    --baseline "regression=$OUT/harvard_mri_to_ct/regression"
# The Harvard test series: the LoRA defaults were chosen on the validation series, never on this one.
SPLIT=test evaluate harvard_mri_to_ct_test harvard_ct_mri --model "$OUT/harvard_mri_to_ct/lora" --tasks image_to_image \
    --translations "mri_t2->ct" --baseline "unfine-tuned=medm2g-tiny" --baseline "plain_ldm=$OUT/harvard_mri_to_ct/scratch" \
    --baseline "regression=$OUT/harvard_mri_to_ct/regression"
evaluate brats_t1_t2_to_flair brats --model "$OUT/brats_t1_t2_to_flair/lora" --tasks image_to_image \
    --translations "mri_t1+mri_t2->mri_flair" --baseline "unfine-tuned=medm2g-tiny" \
    --baseline "plain_ldm=$OUT/brats_t1_t2_to_flair/scratch" --baseline "regression=$OUT/brats_t1_t2_to_flair/regression"
evaluate brats_t1_t1c_t2_to_flair brats --model "$OUT/brats_t1_t1c_t2_to_flair/lora" --tasks image_to_image \
    --translations "mri_t1+mri_t1c+mri_t2->mri_flair" --baseline "unfine-tuned=medm2g-tiny" \
    --baseline "plain_ldm=$OUT/brats_t1_t1c_t2_to_flair/scratch" --baseline "regression=$OUT/brats_t1_t1c_t2_to_flair/regression"
evaluate covid_report_xray covid_cxr --model "$OUT/covid_report_xray/lora" --tasks report_generation text_to_image \
    --text-to-image-targets xray --baseline "unfine-tuned=medm2g-tiny" --baseline "plain_ldm=$OUT/covid_report_xray/scratch"
evaluate synthrad_text_to_ct synthrad_ct --model "$OUT/synthrad_text_to_ct/lora" --tasks text_to_image \
    --text-to-image-targets ct --baseline "unfine-tuned=medm2g-tiny" --baseline "plain_ldm=$OUT/synthrad_text_to_ct/scratch"

"$PY" scripts/real_data/write_results_page.py --root "$OUT"
