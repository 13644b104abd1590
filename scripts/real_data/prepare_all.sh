#!/usr/bin/env bash
# Prepares every shared real data set the way the real-data fine-tune reads it: canonical HF datasets at 64 px
# (the bundled model's image size), split by patient, each with prepare_info.json (arguments, intensity
# conventions, split patients). Run from the repository root:
#
#     bash scripts/real_data/prepare_all.sh          # DATA=../shared/data OUT=runs/real
#
# Rerunnable: `medm2g prepare` writes a dataset into a temp folder and renames it into place, so a folder that
# exists is complete and is skipped. To prepare one again: rm -rf "$OUT/<name>".
set -euo pipefail

DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/real}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MEDM2G="$ROOT/.venv/bin/medm2g"
PYTHON="$ROOT/.venv/bin/python"
SIZE=64
export HF_DATASETS_DISABLE_PROGRESS_BARS=1  # the summary counts are printed instead

if [[ ! -d "$DATA" ]]; then
    echo "prepare_all.sh: DATA=$DATA is not a folder (the shared real data sets; see ../shared/data/README.md)" >&2
    exit 2
fi
mkdir -p "$OUT"

# prepare NAME ARG...: `medm2g prepare ARG... --size $SIZE --out $OUT/NAME`, timed; skipped when done before.
prepare() {
    local name=$1
    shift
    if [[ -f "$OUT/$name/prepare_info.json" ]]; then
        echo "== $name: $OUT/$name is complete; skipped (rm -rf $OUT/$name to prepare it again)"
        return
    fi
    if [[ -e "$OUT/$name" ]]; then
        echo "prepare_all.sh: $OUT/$name exists without prepare_info.json (not written by this script?); remove it first" >&2
        exit 2
    fi
    echo "== $name"
    local start=$EPOCHREALTIME
    "$MEDM2G" prepare "$@" --size "$SIZE" --out "$OUT/$name"
    echo "== $name took $(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $start}") s"
}

# Harvard CT-MRI: CT/ and MRI/ pair by file name; the patient is the series (the digits before the last three).
# The MRI is T2 except series 2, whose slices are FLAIR (dark CSF, grey matter brighter than white): it is left
# out rather than trained on as T2. Validation 16 and test 32 are the series the seed-0 hash held out before,
# so earlier numbers stay comparable; the other four train. The CT PNGs are brain-window display images whose
# HU window is unknown: [-1000, 1000] (the model's CT window) maps them 1:1 onto the model range.
prepare harvard_ct_mri \
    --images "$DATA/harvard-ct-mri" --modality-map MRI=mri_t2 --patient-regex '^(\d+)\d{3}$' \
    --exclude-patients 2 --validation-patients 16 --test-patients 32 --split-fractions 1,0,0 \
    --png-ct-window=-1000,1000 \
    --remark "CT: brain-window display PNGs (skull saturated at 255); their HU window is unknown, so [-1000, 1000] is a convention that maps the 8-bit image 1:1 onto the model's CT range, not physical HU" \
    --remark "MRI series 2 is FLAIR, not T2 (dark CSF): excluded"

# BraTS-GLI-00001-000 (t1n/t1c/t2w/t2f) and TCGA-DU-7294 (t1/t1c/t2/fla): one folder per subject, files named
# by contrast. Every second axial slice (stored axis 2, S in LPS) that is at least 10 % brain in all four
# contrasts: 52 and 46 slices. One subject trains, the other validates; no test subject is left.
prepare brats \
    --images "$DATA/brain-mri-multicontrast" --layout subjects --nifti-slices 0:155:2 --min-foreground 0.1 \
    --validation-patients TCGA-DU-7294 --split-fractions 1,0,0 \
    --remark "two subjects only: train on BraTS-GLI-00001-000, validate on TCGA-DU-7294; the test split is empty"

# COVID chest X-rays: the CSV's clinical_notes (case notes, not radiology reports) cleaned of boilerplate; the
# CT rows dropped; 0.8/0.1/0.1 of the patients by the seed-0 hash.
prepare covid_cxr \
    --images "$DATA/covid-chestxray" --reports "$DATA/covid-chestxray/metadata.csv" \
    --csv-columns report=clinical_notes,patient_id=patientid --modalities xray --clean-notes \
    --split-fractions 0.8,0.1,0.1 \
    --remark "reports are case notes from papers and teaching sites, not radiology reports; cleaned with clean_clinical_note"

# SynthRAD CT slices: no text exists, so each slice gets a caption derived from its file name (region code).
# The 8-bit values fit [-1000, 2000] HU (air 0; pelvic fat peak 75-76 = -118..-106 HU, muscle 88-89 = +35..+47
# HU, brain 87 = +24 HU; [-1000, 1000] would put them at -400 and -300 HU). The model's [-1000, 1000] window then
# clips bone above 1000 HU (5 % of head pixels, 0.2 % of pelvis pixels). Validation and test: per region the
# first two patients of the seed-0 hash order.
if [[ ! -f "$OUT/synthrad_ct/prepare_info.json" ]]; then
    "$PYTHON" "$ROOT/scripts/real_data/synthrad_captions.py" --images "$DATA/synthrad-ct-slices" --out "$OUT/synthrad_ct_captions.csv"
fi
prepare synthrad_ct \
    --images "$DATA/synthrad-ct-slices" --reports "$OUT/synthrad_ct_captions.csv" --png-ct-window=-1000,2000 \
    --validation-patients 1BB007 1PA009 --test-patients 1BB002 1PA030 --split-fractions 1,0,0 \
    --remark "captions ('Axial CT slice of the brain.' / '... of the pelvis.') are derived from file names, not radiology reports" \
    --remark "png_ct_window [-1000, 2000] from the tissue peaks of the 8-bit histogram (fat, muscle, brain); the model's [-1000, 1000] window clips the densest bone"

echo "== all sets are in $OUT"
