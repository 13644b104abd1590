#!/usr/bin/env bash
# Is the adapter short of capacity, or is the phantom prior the problem? On the two paired real tasks
# (Harvard MRI (T2) -> CT, BraTS T1 + T2 -> FLAIR) this trains, on the budget of training/configs/lora.yaml:
#   lora        the default adapter (rank 32, every Linear/Conv2d) on medm2g-tiny      -> $OUT/<task>/lora
#   plain_ldm   the same denoisers from random weights (--init scratch)                   -> $OUT/<task>/scratch
#   lora_r64    rank 64 (alpha 64)                                                        -> $OUT/variants/lora_r64/<task>/lora
#   lora_dora   rank 32 with DoRA's per-output magnitude (finetune.lora.use_dora)         -> $OUT/variants/lora_dora/<task>/lora
#   full        the whole pretrained denoiser (--full at 2e-4, stage 3's denoiser rate)    -> $OUT/variants/full/<task>/full
#   full_lr5e-4 the same at the plain LDM's rate (5e-4): the prior alone against random init -> $OUT/variants/full_lr5e-4/<task>/full
# scores them side by side with `medm2g evaluate` (Harvard: validation and test series; BraTS: validation,
# the only held-out subject) and writes docs/results/real-lora-variants.md. Run from the repository root after
# scripts/real_data/prepare_all.sh (run_all.sh does it):
#
#     bash scripts/real_data/lora_variants.sh        # OUT=runs/real JOBS=2; ~65 min of training per task on one core
#
# The default adapter and the plain LDM are the folders run_all.sh uses, so either script reuses the other's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

OUT=${OUT:-runs/real}
JOBS=${JOBS:-2}
PY=.venv/bin/python
export OMP_NUM_THREADS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
mkdir -p "$OUT/logs"

# TASK SET VARIANT: train one model unless its folder exists; the log goes to $OUT/logs/TASK_VARIANT.log.
train() {
    local task=$1 set=$2 variant=$3 root=$OUT/variants/$3 folder=lora args=()
    case $variant in
        lora) root=$OUT ;;
        plain_ldm) root=$OUT folder=scratch args=(--init scratch) ;;
        lora_r64) args=(--set finetune.lora.rank=64 --set finetune.lora.alpha=64) ;;
        lora_dora) args=(--set finetune.lora.use_dora=true) ;;
        full) folder=full args=(--full --set finetune.learning_rate=2e-4) ;;  # the rate lora.yaml had when the page was made
        full_lr5e-4) folder=full args=(--full --set finetune.learning_rate=5e-4) ;;
    esac
    [[ -e "$root/$task/$folder" ]] && { echo "== $task $variant: $root/$task/$folder exists; skipped"; return; }
    echo "== $task $variant"
    "$PY" training/finetune_lora.py --config training/configs/lora.yaml --task "$task" --dataset "$OUT/$set" \
        --set "output_root=$root" "${args[@]}" --resume_from_checkpoint latest > "$OUT/logs/${task}_${variant}.log" 2>&1
    echo "== $task $variant done"
}

for task_set in "harvard_mri_to_ct harvard_ct_mri" "brats_t1_t2_to_flair brats"; do
    for variant in lora plain_ldm lora_r64 lora_dora full full_lr5e-4; do
        while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
        train $task_set $variant &
    done
done
wait

# NAME TASK SET SPLIT TRANSLATION: every model of TASK on SPLIT of $OUT/SET.
evaluate() {
    local name=$1 task=$2 set=$3 split=$4 translation=$5 v=$OUT/variants
    echo "== evaluate $name"
    .venv/bin/medm2g evaluate --model "$OUT/$task/lora" --name lora --baseline "plain_ldm=$OUT/$task/scratch" \
        --baseline "lora_r64=$v/lora_r64/$task/lora" --baseline "lora_dora=$v/lora_dora/$task/lora" --baseline "full=$v/full/$task/full" \
        --baseline "full_lr5e-4=$v/full_lr5e-4/$task/full" \
        --data "$OUT/$set" --split "$split" --tasks image_to_image --translations "$translation" --threads 2 \
        --out "$OUT/evaluate/variants/$name" > "$OUT/logs/evaluate_variants_$name.log" 2>&1
}
evaluate harvard_validation harvard_mri_to_ct harvard_ct_mri validation "mri_t2->ct"
evaluate harvard_test harvard_mri_to_ct harvard_ct_mri test "mri_t2->ct"
evaluate brats_validation brats_t1_t2_to_flair brats validation "mri_t1+mri_t2->mri_flair"

"$PY" scripts/real_data/write_lora_variants_page.py --root "$OUT"
