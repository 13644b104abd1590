"""scripts/real_data/write_lora_variants_page.py: the paired fine-tune-minus-plain-LDM table and the budget table."""

from __future__ import annotations

import json

import pytest

from training_scripts import load_script


@pytest.fixture(scope="module")
def page():
    return load_script("scripts/real_data/write_lora_variants_page.py")


def test_versus_baseline_pairs_each_fine_tune_with_the_plain_ldm(page):
    results = {"image_to_image": {"MRI (T2) -> CT": {
        "n": 3,
        "plain_ldm": {"psnr": [10.0, 12.0, 14.0], "ssim": [0.5, 0.5, 0.5]},
        "lora": {"psnr": [11.0, 13.0, 15.0], "ssim": [0.4, 0.5, 0.6]},    # +1 dB on every image: SE 0
        "full": {"psnr": [9.0, 12.0, 14.0], "ssim": [0.5, 0.5, 0.5]},     # -1/3 dB, SE 1/3: within 2 SE
    }}}
    lines = page.versus_baseline(results)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| lora") or line.startswith("| full")}
    assert rows["lora"] == "| lora | +1.00 ± 0.00 | +0.000 ± 0.058 | lora better / within 2 SE |"
    assert rows["full"] == "| full | -0.33 ± 0.33 | +0.000 ± 0.000 | within 2 SE / within 2 SE |"
    assert "lora_dora" not in rows  # a variant the run did not score is left out, not invented


def test_budget_table_reads_each_runs_budget(page, tmp_path):
    folder = tmp_path / "harvard_mri_to_ct" / "lora_training"
    folder.mkdir(parents=True)
    (folder / "budget.json").write_text(json.dumps({"steps": 1500, "train_batch_size": 16, "learning_rate": 0.002,
                                                     "trainable_parameters": 1274752, "train_seconds": 600.0}))
    table = page.budget_table(tmp_path, "harvard_mri_to_ct")
    assert table[2].startswith("| lora | LoRA rank 32") and table[2].endswith("| 1500 x 16 | 0.002 | 1,274,752 | 10.0 |")
    assert len(table) == 4  # header, rule, the one run present, blank
    assert page.budget_table(tmp_path, "brats_t1_t2_to_flair") == []
