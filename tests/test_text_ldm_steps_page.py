"""scripts/measure_text_ldm_steps.py: runs are reused, bad arguments are refused, and the page comes from its JSON."""

from __future__ import annotations

import json
import sys

import pytest

from medm2g_diffusers.evaluation.benchmark_tables import NOTES_MARKER
from training_scripts import ROOT, load_script


@pytest.fixture(scope="module")
def probe():
    return load_script("scripts/measure_text_ldm_steps.py")


def scores(f1: float) -> dict:
    per_type = {"pleural_effusion": {"f1": f1}, "nodule": {"f1": 0.125}}
    return {"bleu_1": 0.6, "bleu_4": 0.3, "rouge_l": 0.4,
            "finding": {"micro_f1": f1, "macro_f1": f1 - 0.01, "exact_match": 0.5, "per_type": per_type}}


def fake_run(folder, steps: int, f1: float) -> None:
    """A step count's folder as measure() leaves it, with its evaluation."""
    (folder / "unet_text").mkdir(parents=True)
    (folder / "pipeline_single_flow").mkdir()
    (folder / "evaluate").mkdir()
    (folder / "times.json").write_text(json.dumps({"train_seconds": steps / 10}))
    report = {"n": 150, "text_ldm": scores(f1), "nearest_neighbour": scores(0.5)}
    (folder / "evaluate" / "benchmark.json").write_text(json.dumps({"report_generation": report}))


def test_measured_step_counts_are_read_back_not_retrained(probe, tmp_path, monkeypatch):
    root = tmp_path / "root"
    for name in (*probe.STAGE_01, "unet_xray", "unet_text"):
        (root / name).mkdir(parents=True)
    fake_run(tmp_path / "out" / "100", 100, 0.5)
    fake_run(tmp_path / "out" / "400", 400, 0.625)
    monkeypatch.setattr(probe, "run", lambda *a, **k: pytest.fail(f"nothing should run: {a}"))
    page = tmp_path / "page.md"
    monkeypatch.setattr(sys, "argv", ["m", "--root", str(root), "--steps", "400", "100", "--out", str(tmp_path / "out"),
                                      "--page", str(page)])
    probe.main()
    text = page.read_text()
    assert text.index("| 100 | 10 | 0.600 | 0.300 | 0.400 | 0.500 | 0.490 | 0.500 |") < text.index("| 400 | 40 |")
    assert "| 400 | 0.62 | 0.12 |" in text  # per-type F1
    # the stage 0-1 folders and the image denoisers are linked in; the root's own text denoiser is not
    assert (tmp_path / "out" / "100" / "vae").is_symlink() and (tmp_path / "out" / "100" / "unet_xray").is_symlink()
    assert not (tmp_path / "out" / "100" / "unet_text").is_symlink()
    record = json.loads(page.with_suffix(".json").read_text())
    assert [row["steps"] for row in record["rows"]] == [100, 400]


def test_a_root_without_stage_0_1_outputs_or_a_bad_step_count_is_refused(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["m", "--root", str(tmp_path), "--page", str(tmp_path / "p.md")])
    with pytest.raises(FileNotFoundError, match="no tokenizer/"):
        probe.main()
    for name in probe.STAGE_01:
        (tmp_path / name).mkdir()
    monkeypatch.setattr(sys, "argv", ["m", "--root", str(tmp_path), "--steps", "0", "--page", str(tmp_path / "p.md")])
    with pytest.raises(ValueError, match="--steps and --variant_steps must be positive"):
        probe.main()


def test_page_only_keeps_the_notes_and_the_committed_page_matches_its_json(probe, tmp_path, monkeypatch):
    record = json.loads((ROOT / "docs/results/text-ldm-steps.json").read_text())
    assert "\n".join(probe.page_lines(record)) in (ROOT / "docs/results/text-ldm-steps.md").read_text()
    page = tmp_path / "p.md"
    page.with_suffix(".json").write_text(json.dumps(record))
    page.write_text("old\n" + NOTES_MARKER + "\nmy reading\n")
    monkeypatch.setattr(sys, "argv", ["m", "--root", "unused", "--page_only", "--page", str(page)])
    probe.main()
    assert page.read_text().endswith("my reading\n") and "old" not in page.read_text()


def test_variants_are_parsed_and_named_by_their_overrides(probe):
    assert probe.parse_variant("deep:ldm.text_unet.num_blocks=6,ldm.text_unet.dropout=0.1") == (
        "deep", ["ldm.text_unet.num_blocks=6", "ldm.text_unet.dropout=0.1"])
    for bad in ("deep", "deep:", ":a=1", "de ep:a=1", "deep:num_blocks"):
        with pytest.raises(ValueError, match="--variant must be"):
            probe.parse_variant(bad)
    assert probe.row_name({"steps": 12000, "overrides": ["ldm.text_unet.num_blocks=6"]}) == "12,000 (`ldm.text_unet.num_blocks=6`)"
    assert probe.row_name({"steps": 12000}) == "12,000"  # rows written before variants existed
