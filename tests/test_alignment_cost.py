"""Smoke test of `benchmarks/alignment_cost.py` at a toy size: it runs and its JSON has the documented fields.

No speed thresholds (timing belongs to the benchmark run, not to the tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
import yaml

from test_train_alignment import make_dataset, write_config

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("alignment_cost", ROOT / "benchmarks" / "alignment_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["alignment_cost"] = module
    spec.loader.exec_module(module)
    return module


def write_budget_config(tmp_path: Path) -> Path:
    """test_train_alignment's toy dataset and config, with a 10-step central budget (8 hub + 2 ct_mri)."""
    path = write_config(tmp_path, make_dataset(tmp_path / "data"))
    config = yaml.safe_load(path.read_text())
    config["alignment"]["rounds"][0]["steps"] = 8
    path.write_text(yaml.safe_dump(config))
    return path


def test_quick_run_writes_the_documented_fields(tmp_path):
    config = write_budget_config(tmp_path)
    out = tmp_path / "alignment_cost.json"
    bench = load_benchmark()
    threads = torch.get_num_threads()
    try:
        summary = bench.main(["--config", str(config), "--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets its own thread count
    written = json.loads(out.read_text())
    assert written["command"].startswith("python benchmarks/alignment_cost.py")
    assert set(written["variants"]) == {"hub", "ct_mri", "pairwise", "hub_no_vi", "ct_mri_no_vi", "pairwise_no_vi"}
    for name, variant in written["variants"].items():
        assert len(variant["ms_per_step_all"]) == 2 and len(variant["ms_per_step_block_medians"]) == 2
        assert variant["ms_per_step_median"] > 0
        assert set(variant["phases_ms_median"]) == {"forward_ms", "backward_ms", "optimizer_ms"}
    counts = {name: v["counts"] for name, v in written["variants"].items()}
    # Each family is encoded once per step (twice for trainable image families with VI: a second view).
    assert counts["hub_no_vi"]["encoder_forwards_per_step"] == {"text": 1, "xray": 1, "ct": 1, "mri": 1}
    assert counts["pairwise_no_vi"]["encoder_forwards_per_step"] == {"text": 1, "xray": 1, "ct": 1, "mri": 1}
    assert counts["ct_mri_no_vi"]["encoder_forwards_per_step"] == {"ct": 1, "mri": 1}
    assert counts["hub"]["encoder_forwards_per_step"] == {"text": 1, "xray": 2, "ct": 2, "mri": 2}
    assert counts["hub"]["infonce_terms_per_step"] == 3 and counts["pairwise"]["infonce_terms_per_step"] == 6
    assert counts["ct_mri"]["infonce_terms_per_step"] == 1 and counts["ct_mri"]["barlow_twins_terms_per_step"] == 2
    assert counts["ct_mri"]["trainable_parameters"] < counts["hub"]["trainable_parameters"] == counts["pairwise"]["trainable_parameters"]
    for key in ("vi", "no_vi"):
        budget = written["whole_run_for_config_budget"][key]
        assert budget["central"]["steps"] == budget["pairwise"]["steps"] == 10
        assert budget["central"]["rounds"]["hub"]["steps"] == 8 and budget["central"]["rounds"]["ct_mri"]["steps"] == 2
        assert budget["ratio_pairwise_over_central"] > 0 and len(budget["ratio_per_repeat"]) == 2
        model = budget["cost_model_n_modalities"]
        assert model["label"].startswith("ANALYTIC")
        rows = {row["n_modalities"]: row for row in model["rows"]}
        assert rows[4]["infonce_pairs"] == {"central_hub": 3, "pairwise": 6}
        assert rows[6]["encoder_passes_per_step_per_pair_encoding"] == {"central_hub": 10, "pairwise": 30}
    assert written["end_to_end"] is None
    assert written["machine"]["torch_threads"] >= 1
    assert summary["variants"].keys() == written["variants"].keys()
