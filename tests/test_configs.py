"""The shipped training configs: every stage has a section in each, and base.yaml keeps up with tiny.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
STAGES = ("tokenizer", "image_vae", "text_vae", "alignment", "ldm", "multiflow")


@pytest.fixture(scope="module")
def configs():
    return {name: yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()) for name in ("tiny", "base")}


def test_every_stage_has_a_section(configs):
    for name, config in configs.items():
        missing = [s for s in ("defaults", "data", "output_root", *STAGES) if s not in config]
        assert not missing, f"{name}.yaml lacks {missing}"


def test_base_has_every_key_tiny_has(configs):
    for stage in STAGES:
        tiny, base = configs["tiny"][stage], configs["base"][stage]
        missing = sorted(set(tiny) - set(base) - {"families"})  # per-family overrides are optional
        assert not missing, f"base.yaml [{stage}] lacks {missing}"


def test_multiflow_rounds_are_well_formed(configs):
    from training_scripts import load_training_script

    build_rounds = load_training_script("train_multiflow").build_rounds
    for name, config in configs.items():
        rounds = build_rounds(config["multiflow"], None)
        assert [r["kind"] for r in rounds][:3] == ["joint"] * 3, name
        assert rounds[1]["trainable"] == ["ct"] and rounds[2]["trainable"] == ["mri"]  # text frozen, then ct frozen
