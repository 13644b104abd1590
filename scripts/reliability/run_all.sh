#!/usr/bin/env bash
# Runs every reliability check at full size and rewrites docs/reliability.md from their results
# (docs/results/reliability/*.json and tests.xml). About 30 minutes on 2 CPU cores. Stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=docs/results/reliability
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
PY=.venv/bin/python
$PY scripts/reliability/fuzz_readers.py --cases 10000 --quiet --out "$OUT/fuzz_readers.json" > /dev/null
$PY scripts/reliability/kill_resume.py --trials 12 --out "$OUT/kill_resume.json" > /dev/null
$PY scripts/reliability/demo_load.py --requests 50 --clients 8 --out "$OUT/demo_load.json" > /dev/null
$PY benchmarks/watermark_robustness.py --n 30 --size 256 --out "$OUT/watermark.json" > /dev/null
$PY -m pytest -q -p no:cacheprovider --junitxml "$OUT/tests.xml" \
  tests/test_checkpoint_safety.py tests/test_kill_resume.py tests/test_pipeline_properties.py tests/test_fuzz_readers.py \
  tests/test_patient_data.py tests/test_demo_load.py tests/test_verify.py tests/test_determinism.py
$PY scripts/reliability/write_page.py --results "$OUT" --out docs/reliability.md
