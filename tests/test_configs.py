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


@pytest.mark.parametrize("name", ["lora", "phantom_baselines"])
def test_finetune_tasks_are_valid(name):
    from training_scripts import load_training_script

    finetune = load_training_script("finetune_lora")
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    for task in config["tasks"]:
        cfg = finetune.task_config(config, task)
        assert int(cfg["max_train_steps"]) > 0 and int(cfg["train_batch_size"]) > 0, task


def test_phantom_baselines_match_the_benchmark_translations():
    """Every baseline task trains one of the benchmark's image -> image rows, and the recipe scores it on that row."""
    import re

    from medm2g_diffusers.evaluation.benchmark import TRANSLATIONS, parse_translation

    config = yaml.safe_load((CONFIGS / "phantom_baselines.yaml").read_text())
    recipe = (CONFIGS.parent / "recipes" / "phantom_baselines.sh").read_text()
    scored = dict(re.findall(r"\[(\w+)\]=\"([^\"]+)\"", recipe))
    assert sorted(scored) == sorted(config["tasks"])
    benchmark = {(tuple(s), t) for _, s, t in TRANSLATIONS}
    for task, spec in config["tasks"].items():
        _, sources, target = parse_translation(scored[task])
        assert (sources, target) == (spec["sources"], spec["target"]), task
        assert (tuple(sources), target) in benchmark, task
