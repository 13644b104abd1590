"""Results-page scripts: measure_report_guidance.py (the scale is chosen on validation
only), probe_xray_findings.py, measure_report_sources.py and write_benchmark_page.py's ablation times; each page
comes from its JSON."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from training_scripts import load_script

REPO = Path(__file__).resolve().parents[1]

TYPES = ("pleural_effusion", "cardiomegaly", "nodule", "mass", "pneumothorax", "consolidation", "pacemaker")


@pytest.fixture(scope="module")
def guidance():
    return load_script("scripts/measure_report_guidance.py")


@pytest.fixture(scope="module")
def probes():
    return load_script("scripts/probe_xray_findings.py")


def finding(micro: float) -> dict:
    return {"micro_f1": micro, "macro_f1": micro - 0.05, "exact_match": 0.5, "per_type": {t: {"f1": micro} for t in TYPES}}


def row(split: str, scale: float, micro: float) -> dict:
    return {"split": split, "guidance_scale": scale, "n": 150,
            "scores": {"bleu_1": 0.6, "bleu_4": 0.3, "rouge_l": 0.4, "finding": finding(micro)}}


def test_the_scale_is_chosen_on_validation_never_on_test(guidance):
    rows = [row("validation", 2.0, 0.60), row("validation", 3.0, 0.70), row("validation", 4.0, 0.70),
            row("test", 2.0, 0.90), row("test", 3.0, 0.50)]
    assert guidance.select_scale(rows) == 3.0  # the tie at 0.70 goes to the smaller scale; test rows never count
    with pytest.raises(ValueError, match="validation"):
        guidance.select_scale([row("test", 2.0, 0.9)])


def test_guidance_page_marks_the_chosen_scale(guidance):
    record = {"command": "python scripts/measure_report_guidance.py", "model": "medm2g-tiny", "machine": "x86_64", "threads": 1,
              "seconds": 120.0, "chosen_scale": 3.0, "rows": [row("validation", 2.0, 0.6), row("validation", 3.0, 0.7), row("test", 3.0, 0.65)]}
    text = "\n".join(guidance.page_lines(record))
    assert "chosen on the validation split" in text and "**3**" in text
    assert "| validation | 3 (chosen) | 150 | 0.600 | 0.300 | 0.400 | 0.700 | 0.650 | 0.500 |" in text
    assert "| test | 3 (chosen) | 150 |" in text and "| validation | 2 | 0.60 | 0.60 |" in text


def test_probe_page_lists_every_representation_and_type(probes):
    record = {"command": "python scripts/probe_xray_findings.py --root r", "root": "r", "machine": "x86_64", "threads": 1,
              "seconds": 60.0, "n_train": 1610, "n_test": 208,
              "rows": [{"representation": name, "probe": probe, "finding": finding(0.5 + i / 10)}
                       for i, (name, probe) in enumerate((n, p) for n in probes.REPRESENTATIONS for p in ("linear", "MLP 256"))]}
    text = "\n".join(probes.page_lines(record))
    assert "| prompt-encoder tokens | linear | 0.500 | 0.500 | 0.50 |" in text
    assert "| pixels | MLP 256 | 1.000 |" in text and "1610 chest X-rays" in text and " | ".join(TYPES) in text


def test_report_sources_page_has_both_splits_of_every_variant(tmp_path, monkeypatch):
    sources = load_script("scripts/measure_report_sources.py")
    scores = lambda micro: {"xray": {"n": 150, "bleu_4": 0.3, "finding": finding(micro)},  # noqa: E731
                            "ct": {"n": 100, "finding": finding(0.4)}, "mri_t2": {"n": 100, "finding": finding(0.6)}}
    record = {"command": "python scripts/measure_report_sources.py --root r", "root": "r", "steps": 1000, "machine": "x86_64",
              "threads": 1, "seconds": 600.0,
              "rows": [{"variant": name, "train_seconds": None if trains is None else 100.0,
                        "scores": {"validation": scores(0.7), "test": scores(0.65)}} for name, trains in sources.VARIANTS.items()]}
    text = "\n".join(sources.page_lines(record))
    assert "| tokens only | - | validation | 0.700 | 0.500 | 0.300 | 0.400 | 0.600 |" in text
    assert "| θ_c route + denoiser | 100 | test | 0.650 |" in text and "X-ray 150, CT 100, MRI 100" in text
    monkeypatch.setattr(sys, "argv", ["m", "--root", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="has no"):  # nothing trains on a root without stages 0-2
        sources.main()


def test_ablation_times_are_tabulated_per_variant_and_stage():
    page = load_script("scripts/write_benchmark_page.py")
    log = "\n".join([
        "[ablation.sh] python -m accelerate.commands.launch training/train_alignment.py --config c.yaml --set output_root=runs/ablation/ca --no-vi took 356 s",
        "[ablation.sh] python -m accelerate.commands.launch training/train_ldm.py --config c.yaml --set output_root=runs/ablation/ca --family xray took 868 s",
        "[ablation.sh] python scripts/export_single_flow_pipeline.py --root runs/ablation/ca --out runs/ablation/ca/pipeline_single_flow took 10 s",
        "[ablation.sh] python -m accelerate.commands.launch training/train_multiflow.py --config c.yaml --set output_root=runs/ablation/ca took 140 s",
        "a line that is not a timing",
    ])
    table = "\n".join(page.ablation_time_table(log))
    assert "| ca | train_alignment | 356 |" in table and "| ca | train_ldm --family xray | 868 |" in table
    assert "| ca | export_single_flow_pipeline | 10 |" in table and "| ca | train_multiflow | 140 |" in table
    assert "| every variant | total | 1,374 (23 min) |" in table
    assert page.ablation_time_table("nothing timed") == []


def test_write_record_makes_the_folder_and_keeps_the_notes(tmp_path):
    import json

    from medm2g_diffusers.evaluation.benchmark_tables import NOTES_MARKER
    from medm2g_diffusers.evaluation.measure_scripts import write_record

    page = tmp_path / "new" / "page.md"
    write_record(page, {"value": 1}, lambda record: [f"# value {record['value']}"])
    assert json.loads(page.with_suffix(".json").read_text()) == {"value": 1} and page.read_text().startswith("# value 1\n")
    page.write_text(page.read_text() + "my reading\n")
    write_record(page, {"value": 2}, lambda record: [f"# value {record['value']}"])
    assert page.read_text().startswith("# value 2\n" + NOTES_MARKER) and page.read_text().endswith("my reading\n")


def test_benchmark_page_writer_takes_a_title_and_more_runs(tmp_path, monkeypatch):
    page = load_script("scripts/write_benchmark_page.py")
    results = Path(__file__).resolve().parents[1] / "docs" / "results" / "benchmark.json"
    out = tmp_path / "page.md"
    monkeypatch.setattr(sys, "argv", ["w", "--main", str(results), "--title", "A probe", "--heading", "test split",
                                      "--also", f"validation split={results}", "--out", str(out)])
    page.main()
    text = out.read_text()
    assert text.startswith("# A probe\n") and "## test split\n" in text and "## validation split\n" in text
    assert text.count("```bash\nmedm2g evaluate --model ") == 2  # each run with the command that made it
    monkeypatch.setattr(sys, "argv", ["w", "--main", str(results), "--also", str(results), "--out", str(out)])
    with pytest.raises(SystemExit):  # --also needs a heading
        page.main()


def test_benchmark_page_writer_adds_the_ablation_run_and_its_times(tmp_path, monkeypatch):
    page = load_script("scripts/write_benchmark_page.py")
    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    out = tmp_path / "page.md"
    monkeypatch.setattr(sys, "argv", ["w", "--main", str(results / "benchmark.json"), "--ablation", str(results / "ablation.json"),
                                      "--ablation_times", str(results / "ablation-times.log"), "--out", str(out)])
    page.main()
    text = out.read_text()
    ablation = text[text.index("## Ablation"):]
    assert "bash training/recipes/ablation.sh && bash training/recipes/ablation.sh evaluate\n# = medm2g evaluate" in ablation
    assert "| baseline |" in ablation and "| ca_vi |" in ablation  # the variants' tables
    assert "| ca | train_alignment |" in ablation and "| every variant | total |" in ablation  # and their wall times
    # the published page is this writer's output (its hand-written notes aside)
    published = (results / "benchmark.md").read_text()
    assert published.startswith(text.split("<!-- notes")[0].rstrip("\n"))


def test_per_type_f1_table_prints_a_dash_for_a_type_a_row_lacks():
    from medm2g_diffusers.evaluation.measure_scripts import per_type_f1_table

    lines = per_type_f1_table(["split", "guidance"], [(["test", "3"], {"nodule": {"f1": 0.5}})], ["nodule", "mass"])
    assert lines == ["| split | guidance | nodule | mass |", "| --- | --- | --- | --- |", "| test | 3 | 0.50 | - |"]


@pytest.fixture(scope="module")
def candidates_script():
    return load_script("scripts/measure_report_candidates.py")


def candidates_row(split: str, k: int, micro: float) -> dict:
    return {"split": split, "candidates": k, "n": 150, "scores": {"bleu_1": 0.6, "bleu_4": 0.3, "rouge_l": 0.4, "finding": finding(micro)},
            "micro_f1_minus_one": micro - 0.6, "micro_f1_minus_one_se": 0.02}


def test_report_candidates_are_chosen_on_validation_and_the_page_marks_them(candidates_script):
    rows = [candidates_row("validation", 1, 0.60), candidates_row("validation", 8, 0.75), candidates_row("validation", 16, 0.75),
            candidates_row("test", 1, 0.90), candidates_row("test", 8, 0.70)]
    assert candidates_script.select_candidates(rows) == 8  # the tie goes to fewer candidates; test rows never count
    with pytest.raises(ValueError, match="validation"):
        candidates_script.select_candidates(rows[3:])
    record = {"command": "python scripts/measure_report_candidates.py", "model": "medm2g-tiny", "machine": "x86_64", "threads": 2,
              "seconds": 600.0, "chosen_candidates": 8, "rows": rows}
    text = "\n".join(candidates_script.page_lines(record))
    assert "**8**" in text and "| validation | 8 (chosen) | 150 | 0.600 | 0.300 | 0.400 | 0.750 | +0.150 ± 0.020 | 0.700 | 0.500 |" in text
    assert "| test | 1 | 150 | 0.600 | 0.300 | 0.400 | 0.900 | – |" in text and "Each X-ray gets 16 sampled candidate reports" in text


def test_bootstrap_difference_is_zero_for_a_model_against_itself_and_positive_otherwise(candidates_script):
    truth = [{"cardiomegaly"}, set(), {"pneumothorax"}, {"mass"}] * 5
    worse = [set() if i % 3 == 0 else t for i, t in enumerate(truth)]  # a third of the findings missed
    assert candidates_script.bootstrap_difference(truth, truth, truth) == 0.0
    assert 0.0 < candidates_script.bootstrap_difference(truth, worse, truth) < 0.2


def test_the_candidates_scored_are_those_a_report_candidates_call_chooses_from(candidates_script):
    import dataclasses

    import torch

    from medm2g_diffusers.data.datasets import build_phantom_split
    from medm2g_diffusers.evaluation.benchmark import BenchmarkConfig

    from tiny_pipeline import SIZE, get_dummy_pipeline

    pipe = get_dummy_pipeline()
    held_out = build_phantom_split(12, "train", seed=0, size=SIZE)
    cfg = dataclasses.replace(BenchmarkConfig(), n_reports=2, num_inference_steps=2, batch_size=1, max_text_tokens=64, seed=3)
    candidates, references, truth = candidates_script.sample_candidates(pipe, held_out, cfg, 4)
    assert len(candidates) == len(references) == len(truth) == 2 and all(len(c) == 4 for c in candidates)
    for row, xray in enumerate(candidates_script.benchmark.native(
            candidates_script.benchmark.rows_with(held_out, ["xray", "report"], 2, anatomy="chest"), "xray")):
        call = pipe(conditions={"xray": torch.from_numpy(xray)[None, None]}, targets=["text"], report_candidates=4,
                    generator=candidates_script.benchmark.row_generators(cfg, [row]), num_inference_steps=2, max_text_tokens=64)
        assert call.text == [candidates[row][int(pipe.choose_reports(candidates[row], 4)[0])]]


def test_run_report_sweep_writes_the_page_and_json_with_the_validation_choice(tmp_path, monkeypatch):
    import argparse
    import json

    from medm2g_diffusers.evaluation.measure_scripts import run_report_sweep, select_on_validation

    from tiny_pipeline import get_dummy_pipeline

    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the sweep sets them; later tests must not inherit it
    get_dummy_pipeline().save_pretrained(tmp_path / "model")
    seen = []

    def measure(pipe, data, values, split):
        seen.append((split, list(values), list(pipe.multiflow.unets)))
        return [candidates_row(split, k, 0.6 + (0.1 if k == 4 else 0.0) + (0.3 if split == "test" and k == 2 else 0.0)) for k in values]

    args = argparse.Namespace(model=str(tmp_path / "model"), threads=1, data=None, page=tmp_path / "sweep.md")
    record = run_report_sweep(args, "sweep.py", measure, [1, 2, 4], ["validation", "test"], "chosen_candidates",
                              lambda rows: select_on_validation(rows, "candidates"), lambda r: ["# sweep", f"chosen {r['chosen_candidates']}"])
    assert [s[:2] for s in seen] == [("validation", [1, 2, 4]), ("test", [1, 2, 4])] and seen[0][2] == ["text"]
    assert record["chosen_candidates"] == 4 and record["command"].startswith("python scripts/sweep.py")
    assert json.loads((tmp_path / "sweep.json").read_text())["chosen_candidates"] == 4
    assert "chosen 4" in (tmp_path / "sweep.md").read_text()


def test_classifier_noise_page_tabulates_call_rates_against_the_reports():
    probe = load_script("scripts/probe_classifier_noise.py")
    truth = [{"haemorrhage"}, {"tumour", "midline_shift"}, set(), {"pleural_effusion"}]
    called = probe.rates([{"haemorrhage"}, {"haemorrhage", "tumour"}, set(), set()], truth)
    assert called["called"] == {"haemorrhage": 0.5, "midline_shift": 0.0, "tumour": 0.25}
    assert called["exact"] == 0.75  # only head types count: the chest finding of the last patient is ignored
    rates_noisier = probe.rates([set(), set(), set(), set()], truth)
    record = {"command": "python scripts/probe_classifier_noise.py", "model": "m", "classifiers": "c", "machine": "x86_64",
              "threads": 1, "seconds": 30.0, "n": 4, "reports": {"haemorrhage": 0.25, "midline_shift": 0.25, "tumour": 0.25},
              "classifier_probes": [
                  {"classifier": "the benchmark's (c)", "real_validation": None, "rows": [{"images": "real CTs", **called}]},
                  {"classifier": "training noise up to 0.02 (20 HU)",
                   "real_validation": {"n": 400, "exact_set_accuracy": 0.7, "macro_f1": 0.72,
                                       "f1": {"haemorrhage": 0.5, "midline_shift": 0.92, "tumour": 0.81}},
                   "rows": [{"images": "real CTs", **rates_noisier}]}]}
    text = "\n".join(probe.page_lines(record))
    assert text.count("| the reports | 0.25 | 0.25 | 0.25 | – |") == 2 and "| real CTs | 0.50 | 0.00 | 0.25 | 0.750 |" in text
    assert "### training noise up to 0.02 (20 HU)" in text and "| real CTs | 0.00 | 0.00 | 0.00 | 0.500 |" in text
    assert "exact-set accuracy 0.700, macro F1 0.720; F1 haemorrhage 0.50, midline_shift 0.92, tumour 0.81." in text
    assert probe.real_accuracy({"n": 4, "exact_set_accuracy": 0.5, "macro_f1": 0.4, "per_type": {
        "haemorrhage": {"f1": None}, "midline_shift": {"f1": 1.0}, "tumour": {"f1": 0.5}, "nodule": {"f1": 0.1}}})["f1"] == {
        "haemorrhage": 0.0, "midline_shift": 1.0, "tumour": 0.5}


def test_retrieval_ceiling_counts_what_a_blind_encoder_cannot_tell_apart():
    ceiling = load_script("scripts/measure_retrieval_ceiling.py")
    nodule = frozenset({("nodule", "left", "upper")})
    effusion = frozenset({("pleural_effusion", "left", None)})
    # One report with a nodule, two normal ones, one effusion: blind to nodules, the first three look alike.
    signatures = [("chest", nodule), ("chest", frozenset()), ("chest", frozenset()), ("chest", effusion)]
    assert ceiling.agreement_ceiling(signatures, ())["mean"] == 1.0
    blind = ceiling.agreement_ceiling(signatures, ("nodule",))
    assert blind["text_to_image"] == pytest.approx(((1 + 4) / 3 + 1) / 4)  # a random look-alike: 1/3 and 2/3 right
    assert blind["image_to_text"] == pytest.approx((2 + 1) / 4)  # the most common look-alike report
    assert blind["mean"] == pytest.approx((blind["text_to_image"] + blind["image_to_text"]) / 2)
    # The anatomy is part of the signature: a normal head never stands in for a normal chest.
    assert ceiling.agreement_ceiling([("chest", frozenset()), ("head", frozenset())], ("nodule",))["mean"] == 1.0


def test_retrieval_ceiling_page_shows_every_row():
    ceiling = load_script("scripts/measure_retrieval_ceiling.py")
    rows = [{"split": "test", "pair": "text-xray", "hidden": hidden, "n": 208, "text_to_image": 0.5, "image_to_text": 0.7,
             "mean": 0.6} for hidden in ([], ["nodule", "mass"])]
    page = "\n".join(ceiling.page_lines({"command": "python scripts/measure_retrieval_ceiling.py", "machine": "x86_64",
                                         "seconds": 3.0, "rows": rows}))
    assert "| test | text-xray | 208 | none | 0.500 | 0.700 | 0.600 |" in page
    assert "| test | text-xray | 208 | nodule, mass |" in page


def test_alignment_page_summarises_each_variants_last_round():
    alignment = load_script("scripts/measure_alignment.py")

    def scores(agreement):
        return {"mean": {"recall@1": 0.1, "recall@5": 0.3, "finding_agreement": agreement, "finding_agreement_chance": 0.07, "n": 400}}

    results = {name: {"train_wall_time_s": 600.0, "steps": 1000, "final_round": "ct_mri",
                      "rounds": {"hub": {"text-ct": scores(0.9)}, "ct_mri": {"text-ct": scores(agreement), "text-xray": scores(0.5)}}}
               for name, agreement in (("central_vi", 0.2), ("central_vi_mild_aug", 0.38))}
    meta = {"command": "python scripts/measure_alignment.py", "machine": "x86_64", "dataset": "d", "split": "test", "test_patients": 400}
    page = alignment.render_markdown(meta, results)
    assert "| central_vi_mild_aug | 0.500 | 0.380 | – | – | – | – |" in page  # the last round, not the hub's 0.9
    assert "| text-ct | after hub | 0.100 | 0.300 | 0.900 | 0.070 | 400 |" in page
    single = alignment.render_markdown(meta, {"central_vi": results["central_vi"]})
    assert "after each variant's last round" not in single and "own gallery" not in single
    results["central_vi"]["by_anatomy"] = {"ct_mri": {"chest": {"text-ct": scores(0.6)}, "head": {"text-ct": scores(0.05), "ct-mri": scores(0.4)}}}
    page = alignment.render_markdown(meta, results)
    assert "| central_vi | 0.600 (0.070) | 0.050 (0.070) | – | – | – | 0.400 (0.070) |" in page


def test_alignment_page_names_the_commit_its_variants_ran_at():
    alignment = load_script("scripts/measure_alignment.py")
    meta = {"command": "python scripts/measure_alignment.py", "machine": "x86_64", "dataset": "d", "split": "test",
            "test_patients": 400, "commit": "abc1234"}
    results = {"central_vi": {"train_wall_time_s": 1.0, "steps": 2, "final_round": "hub",
                              "rounds": {"hub": {"text-ct": {"mean": {"recall@1": 0.1, "recall@5": 0.3, "finding_agreement": 0.2,
                                                                      "finding_agreement_chance": 0.07, "n": 400}}}}}}
    assert "` at commit abc1234 on x86_64" in alignment.render_markdown(meta, results)
    del meta["commit"]  # the JSON of pages made before the commit was recorded
    assert " at commit " not in alignment.render_markdown(meta, results)


def test_strong_aug_variant_is_tiny_yaml_before_the_r34_retrain():
    """The pages made before the retrain call this setting central_vi; the variant keeps them rerunnable."""
    import subprocess

    from medm2g_diffusers.training_utils import load_config

    alignment = load_script("scripts/measure_alignment.py")
    old = subprocess.run(["git", "show", "5be7207:training/configs/tiny.yaml"], cwd=REPO, capture_output=True, text=True)
    if old.returncode != 0:
        pytest.skip("a shallow clone without commit 5be7207")
    args = alignment.VARIANTS["central_vi_strong_aug"]
    sets = [args[i + 1] for i in range(0, len(args), 2) if args[i] == "--set"]
    new = load_config(REPO / "training/configs/tiny.yaml", sets)["alignment"]
    old = yaml.safe_load(old.stdout)["alignment"]
    new["model"].pop("input_windows")
    assert new == old


def test_stages_page_tabulates_retrieval_of_each_saved_encoder():
    from types import SimpleNamespace

    stages = load_script("scripts/measure_stages.py")

    def scores(agreement):
        return {"mean": {"recall@1": 0.1, "recall@5": 0.3, "finding_agreement": agreement, "finding_agreement_chance": 0.07, "n": 400}}

    results = {"image_vae": {}, "text_vae": None, "report_samples": [], "ldm_diagnostics": {}, "montage": "m.png",
               "montage_reports": [], "seconds": 1.0, "machine": "x86_64, 1 threads",
               "retrieval": {"after the hub round": {"text-ct": scores(0.5)},
                             "final (prompt_encoders)": {"text-ct": scores(0.6), "ct-mri": scores(0.7)}}}
    args = SimpleNamespace(root="r", dataset="d", unet_root=None, skip=[], note="", steps=50, guidance=2.0, seed=0)
    page = stages.render(results, args)
    assert "| text-ct | 0.100 | 0.300 | 0.500 | 0.100 | 0.300 | 0.600 | 0.070 |" in page
    assert "| ct-mri | – | – | – | 0.100 | 0.300 | 0.700 | 0.070 |" in page  # no ct-mri score before its round
