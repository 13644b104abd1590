"""scripts/measure_ldm_recipe.py: every variant is a valid override of the tiny config, and the page's rows."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from medm2g_diffusers.evaluation.benchmark_tables import NOTES_MARKER
from medm2g_diffusers.training_utils import load_config, stage_config
from training_scripts import ROOT, load_script


@pytest.fixture(scope="module")
def recipe():
    return load_script("scripts/measure_ldm_recipe.py")


def test_every_variant_overrides_only_stage_two_keys_that_train_ldm_reads(recipe):
    base = stage_config(load_config(ROOT / "training/configs/tiny.yaml"), "ldm")
    for name, overrides in recipe.VARIANTS.items():
        cfg = stage_config(load_config(ROOT / "training/configs/tiny.yaml", overrides), "ldm")
        assert all(o.startswith("ldm.") for o in overrides), name
        changed = {k for k in cfg if cfg[k] != base[k]}
        assert changed <= {"learning_rate", "snr_gamma", "unet"}, (name, changed)
        if "pooled" in name:
            assert cfg["unet"]["pooled_condition"] is True
    # the recipe tiny.yaml trains now is one of the measured variants, so the page speaks for the default
    assert any(load_config(ROOT / "training/configs/tiny.yaml", o)["ldm"] == load_config(ROOT / "training/configs/tiny.yaml")["ldm"]
               for o in recipe.VARIANTS.values())


def _metrics(exact):
    return {"exact_set_accuracy": exact, "macro_f1": 0.5, "per_type": {"cardiomegaly": {"f1": 0.9}, "nodule": {"f1": None}}}


def test_page_has_one_row_per_variant_and_guidance_and_keeps_the_hand_notes(recipe, tmp_path):
    out = tmp_path / "ldm-recipe.md"
    out.write_text("old tables\n" + NOTES_MARKER + "\nmy reading\n")
    results = {"target": "xray", "guidance": [2.0, 4.0], "n": 10, "seconds": 120.0, "classifier_on_real": _metrics(0.8),
               "variants": {"baseline": {"overrides": ["ldm.learning_rate=5.0e-4"], "train_seconds": 600.0,
                                         "guidance_2": _metrics(0.1), "guidance_4": _metrics(0.2)},
                            "lr2e-3": {"overrides": ["ldm.learning_rate=2.0e-3"], "train_seconds": None,
                                       "guidance_2": _metrics(0.3), "guidance_4": _metrics(0.4)}}}
    args = SimpleNamespace(out=str(out), family="xray", variants=["baseline", "lr2e-3"], jobs=2, n=10, threads=1,
                           config="training/configs/tiny.yaml", components="checkpoints/medm2g-tiny")
    recipe.write_page(args, results)
    page = out.read_text()
    rows = [line for line in page.splitlines() if line.startswith("| baseline") or line.startswith("| lr2e-3")]
    assert rows[0].startswith("| baseline | `ldm.learning_rate=5.0e-4` | 600 | 2 | 0.100 | 0.500 | 0.90 | – |")
    assert rows[3].startswith("| lr2e-3 | `ldm.learning_rate=2.0e-3` | – | 4 | 0.400 |")
    assert len(rows) == 4
    assert "| real test images | | | | 0.800 | 0.500 | 0.90 | – |" in page
    assert "--variants baseline lr2e-3 --jobs 2 --n 10 --guidance 2 4 --threads 1" in page
    assert page.endswith(NOTES_MARKER + "\nmy reading\n") and "old tables" not in page
    assert json.loads(out.with_suffix(".json").read_text())["variants"]["lr2e-3"]["guidance_4"]["exact_set_accuracy"] == 0.4
