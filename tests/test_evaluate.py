"""`medm2g evaluate --quick` end to end on a tiny pipeline (phantoms, and a tiny real-like dataset without findings
with a regression baseline), and the model card written from its JSON."""

import json

import numpy as np
import pytest
import torch
import yaml

from medm2g_diffusers.cli import main
from medm2g_diffusers.model_card import model_card_markdown


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from medm2g_diffusers import MedM2GPipeline
    from tiny_pipeline import get_dummy_components

    root = tmp_path_factory.mktemp("evaluate")
    MedM2GPipeline(**get_dummy_components()).save_pretrained(root / "tiny")
    code = main(["evaluate", "--quick", "--model", str(root / "tiny"), "--baseline", f"copy={root / 'tiny'}",
                 "--out", str(root / "out"), "--threads", "1"])
    assert code == 0
    return root, json.loads((root / "out" / "benchmark.json").read_text())


def test_quick_evaluate_writes_every_table(evaluated, capsys):
    root, results = evaluated
    assert results["model"] == "tiny" and results["baselines"] == ["copy"]
    report = results["report_generation"]
    for name in ("tiny", "copy", "nearest_neighbour"):
        assert 0.0 <= report[name]["bleu_4"] <= report[name]["bleu_1"] <= 1.0
        assert 0.0 <= report[name]["finding"]["micro_f1"] <= 1.0
    assert report["labeller_on_references"]["micro_f1"] == 1.0  # the labeller reads phantom reports exactly
    # The baseline is the same folder: identical seeds must give identical scores, task by task.
    assert report["tiny"]["bleu_1"] == report["copy"]["bleu_1"]
    for target, entry in results["text_to_image"].items():
        assert entry["n"] > 0 and 0.0 <= entry["tiny"]["finding"]["exact_set_accuracy"] <= 1.0
        assert entry["tiny"]["finding"] == entry["copy"]["finding"]
        assert entry["classifier_on_vae_ceiling"]["model"] == "tiny" and 0.0 <= entry["classifier_on_vae_ceiling"]["exact_set_accuracy"] <= 1.0
    translations = results["image_to_image"]
    assert "tiny" not in translations["MRI (T1+T2+FLAIR) -> CT"]  # the tiny CT denoiser has no FLAIR slot
    assert translations["T2+PD -> T1"]["tiny"]["psnr_mean"] > 0 and translations["T2+PD -> T1"]["copy_source"]["n"] > 0
    ceiling = translations["T2+PD -> T1"]["vae_ceiling"]  # the target through the model's own VAE
    assert ceiling["model"] == "tiny" and ceiling["n"] == translations["T2+PD -> T1"]["n"] and ceiling["psnr_mean"] > 0
    assert set(results["joint"]) == {"chest", "head"} and "tiny/joint" in results["joint"]["chest"]
    assert results["augmentation"]["n_real"] == 16 and 0 < results["augmentation"]["n_generated"] <= 8
    tables = (root / "out" / "benchmark.md").read_text()
    for heading in ("Report generation", "Text -> image", "Image -> image", "Joint generation", "Data augmentation"):
        assert heading in tables
    assert "| T1+T2+FLAIR -> PD |" in tables and "cannot" in tables
    assert "target through tiny's VAE (ceiling)" in tables


def test_classifiers_are_cached_and_reused(evaluated, tmp_path):
    root, results = evaluated
    cache = root / "out" / "finding_classifiers"
    assert sorted(p.name for p in cache.iterdir()) == ["ct", "mri_t1", "mri_t2", "xray"]
    torch.set_num_threads(2)
    code = main(["evaluate", "--quick", "--model", str(root / "tiny"), "--out", str(tmp_path), "--classifiers", str(cache), "--threads", "1"])
    assert code == 0
    assert torch.get_num_threads() == 2  # --threads held for the command only
    again = json.loads((tmp_path / "benchmark.json").read_text())
    assert again["finding_classifiers"] == results["finding_classifiers"]
    assert again["image_to_image"]["T2+PD -> T1"]["tiny"]["psnr"] == results["image_to_image"]["T2+PD -> T1"]["tiny"]["psnr"]


def test_model_card_is_filled_from_the_results(evaluated):
    _, results = evaluated
    card = model_card_markdown("tiny", results, {"stored_dtype": "float16", "recipe": {"stage 0": 600}})
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "apache-2.0" and "not-for-clinical-use" in header["tags"]
    metrics = header["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["value"] == pytest.approx(results["report_generation"]["tiny"]["bleu_1"], abs=1e-4)
    assert "Not for clinical use" in card and "fabricated" in card.lower() and "stage 0 10 min" in card
    noted = model_card_markdown("tiny", results, {"recipe": {"stage 0": 600}, "notes": ["stage 0 carried over from v1"]})
    assert "- stage 0 carried over from v1" in noted and "- stage 0 carried over from v1" not in card
    with pytest.raises(ValueError, match="wall time in seconds"):
        model_card_markdown("tiny", results, {"recipe": {"stage 0": "ten minutes"}})
    with pytest.raises(ValueError, match="no 'joint'"):
        model_card_markdown("tiny", {k: v for k, v in results.items() if k != "joint"})


def test_evaluate_rejects_a_missing_model(tmp_path, capsys):
    assert main(["evaluate", "--quick", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "--model must be a bundled checkpoint" in capsys.readouterr().err


def test_evaluate_runs_a_subset_of_tasks(evaluated, tmp_path, capsys):
    root, _ = evaluated
    code = main(["evaluate", "--quick", "--model", str(root / "tiny"), "--name", "mine", "--out", str(tmp_path), "--threads", "1",
                 "--tasks", "text_to_image", "--text-to-image-targets", "xray", "--classifiers", str(root / "out" / "finding_classifiers")])
    assert code == 0
    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert results["model"] == "mine" and "mine" in results["text_to_image"]["xray"]
    assert list(results["text_to_image"]) == ["xray"] and "joint" not in results and "report_generation" not in results
    assert list(results["finding_classifiers"]) == ["xray"]
    assert main(["evaluate", "--quick", "--model", str(root / "tiny"), "--out", str(tmp_path), "--tasks", "fid"]) == 2
    assert "tasks must be a non-empty subset" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny real-like dataset (findings and anatomy None; test split empty), the tiny model and a tiny regression
    baseline (mri_t2 -> ct), scored on the validation split with the default image -> image tasks."""
    from medm2g_diffusers import MedM2GPipeline
    from medm2g_diffusers.data.datasets import save_dataset
    from test_regression_baseline import real_like_dataset, tiny_regression_pipeline
    from tiny_pipeline import get_dummy_components

    root = tmp_path_factory.mktemp("evaluate_real")
    save_dataset(real_like_dataset({"train": 16, "validation": 8, "test": 0}), root / "data")
    MedM2GPipeline(**get_dummy_components()).save_pretrained(root / "tiny")
    tiny_regression_pipeline(["mri_t2"], "ct").save_pretrained(root / "reg")
    code = main(["evaluate", "--quick", "--model", str(root / "tiny"), "--baseline", f"regression={root / 'reg'}", "--data", str(root / "data"),
                 "--split", "validation", "--out", str(root / "out"), "--threads", "1"])
    assert code == 0
    return root, json.loads((root / "out" / "benchmark.json").read_text())


def test_real_data_skips_what_needs_findings_and_says_why(real):
    root, results = real
    assert results["split"] == "validation" and results["findings"] is False and results["finding_classifiers"] == {}
    for name in ("finding_classifiers", "report_generation/finding_f1", "text_to_image/finding_accuracy", "joint", "augmentation"):
        assert results["skipped"][name] == "no ground-truth findings in this dataset"
    assert "joint" not in results and "augmentation" not in results
    assert not (root / "out" / "finding_classifiers").exists()
    # Head slices have no reports: no text -> CT/MRI; chest X-rays with notes: text -> X-ray.
    assert list(results["text_to_image"]) == ["xray"]
    assert results["skipped"]["text_to_image/ct"] == "the validation split has no rows with both a report and ct"
    xray = results["text_to_image"]["xray"]
    assert "classifier_on_real" not in xray and "finding" not in xray["tiny"] and xray["split"] == "validation"
    assert 0.0 <= xray["tiny"]["ms_ssim_diversity"]["ms_ssim"] <= 1.0 and "fid" not in xray["tiny"]  # --quick: no FID
    assert xray["skipped"]["regression"] == "cannot generate xray (it generates ['ct'])"
    assert results["pipelines"]["regression"]["class"] == "MedM2GRegressionPipeline"


def test_real_report_generation_scores_against_the_notes(real):
    _, results = real
    report = results["report_generation"]
    # anatomy is None on real rows: the chest-only restriction of the phantoms must not drop them.
    assert report["n"] > 0 and report["split"] == "validation" and "labeller_on_references" not in report
    for name in ("tiny", "nearest_neighbour"):
        assert 0.0 <= report[name]["bleu_4"] <= report[name]["bleu_1"] <= 1.0 and "finding" not in report[name]
        assert report[name]["n"] == report["n"] and "R2Gen" in report[name]["protocol"]
    assert report["nearest_neighbour"]["pool_split"] == "train" and report["nearest_neighbour"]["pool"] > 0
    assert report["skipped"] == {"regression": "cannot generate text (it generates ['ct'])"}


def test_real_image_to_image_tasks_and_skipped_pipelines(real):
    from medm2g_diffusers import MedM2GRegressionPipeline
    from medm2g_diffusers.data.datasets import load_medm2g_dataset
    from medm2g_diffusers.evaluation.benchmark import default_translations, display, native, rows_with
    from medm2g_diffusers.evaluation.image_metrics import psnr_ssim

    root, results = real
    validation = load_medm2g_dataset(root / "data")["validation"]
    translations = results["image_to_image"]
    assert list(translations) == [name for name, _, _ in default_translations(validation)]
    # The rule: the phantom tasks the columns allow, each contrast -> CT, each contrast from all the others.
    assert {"MRI (T1) -> CT", "T1+T2 -> FLAIR", "MRI (T2) -> CT", "MRI (T1c) -> CT", "T1+T2+T1c -> FLAIR"} <= set(translations)
    assert "CT -> X-ray" not in translations and "T2+PD -> T1" not in translations  # no such rows
    for entry in translations.values():
        assert entry["split"] == "validation" and 0 < entry["n"] <= 4 and entry["protocol"].startswith("display range")
    mri_ct = translations["MRI (T2) -> CT"]
    assert set(mri_ct["skipped"]) == set() and mri_ct["tiny"]["n"] == mri_ct["regression"]["n"] == mri_ct["n"]
    assert mri_ct["tiny"]["psnr"] != mri_ct["regression"]["psnr"]
    # The benchmark feeds the baseline native units and scores it in the display range: recompute it by hand.
    rows = rows_with(validation, ["mri_t2", "ct"], mri_ct["n"])
    direct = MedM2GRegressionPipeline.from_pretrained(str(root / "reg"))(conditions={"mri_t2": native(rows, "mri_t2")[:, None]}, output_type="np")
    np.testing.assert_allclose(mri_ct["regression"]["psnr"], psnr_ssim(direct.images["ct"], display(rows, "ct"))["psnr"], rtol=1e-6)
    flair = translations["T1+T2+T1c -> FLAIR"]
    assert "tiny" not in flair and "mri_t1c" in flair["skipped"]["tiny"] and "cannot condition mri_flair" in flair["skipped"]["tiny"]
    assert flair["skipped"]["regression"] == "cannot generate mri_flair (it generates ['ct'])"
    tables = (root / "out" / "benchmark.md").read_text()
    assert "| finding" not in tables and "exact findings" not in tables and "classifier on real" not in tables  # no empty finding columns
    assert "| MRI (T2) -> CT |" in tables and "cannot" in tables and "(validation split)" in tables
    assert "- tiny on T1+T2+T1c -> FLAIR: cannot condition mri_flair on ['mri_t1c']" in tables
    assert "- joint: no ground-truth findings in this dataset" in tables


def test_translations_flag_selects_tasks_and_is_parsed_strictly(real, tmp_path, capsys):
    root, _ = real
    base = ["evaluate", "--quick", "--model", str(root / "tiny"), "--data", str(root / "data"), "--split", "validation",
            "--out", str(tmp_path), "--threads", "1", "--tasks", "image_to_image"]
    assert main([*base, "--translations", "mri_t1+mri_t2->mri_flair", "--translations", "mri_t2->ct"]) == 0
    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert list(results["image_to_image"]) == ["T1+T2 -> FLAIR", "MRI (T2) -> CT"]
    assert results["image_to_image"]["T1+T2 -> FLAIR"]["sources"] == ["mri_t1", "mri_t2"] and "report_generation" not in results
    for bad, message in (("mri_t2-ct", "expects SOURCE[+SOURCE...]->TARGET"), ("mri_t2->pet", "'pet' is not one"),
                         ("mri_t2 ->ct", "'mri_t2 ' is not one"), ("->ct", "'' is not one"), ("mri_t2->ct->xray", "expects"),
                         ("mri_t2+mri_t2->ct", "repeats a source"), ("ct+mri_t2->ct", "target 'ct' among the sources")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, f"--translations={bad}"])  # the = form: "->ct" would read as an option
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --translations" in err and message in err, (bad, err)
    assert main([*base, "--translations", "mri_pd->ct"]) == 2  # a valid task the data has no rows for
    assert "has no rows with all of ['mri_pd', 'ct'] for 'MRI (PD) -> CT'" in capsys.readouterr().err


def test_translation_names_match_the_phantom_benchmark():
    from medm2g_diffusers.evaluation.benchmark import TRANSLATIONS, parse_translation

    for name, sources, target in TRANSLATIONS:
        assert parse_translation("+".join(sources) + "->" + target) == (name, sources, target)


def test_an_empty_held_out_split_is_a_clear_error(real, tmp_path, capsys):
    root, _ = real
    assert main(["evaluate", "--quick", "--model", str(root / "tiny"), "--data", str(root / "data"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the test split of" in err and "is empty" in err and "--split validation" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "--quick", "--model", str(root / "tiny"), "--split", "train", "--out", str(tmp_path)])
    assert main(["evaluate", "--quick", "--model", str(root / "tiny"), "--baseline", f"copy_source={root / 'tiny'}",
                 "--data", str(root / "data"), "--split", "validation", "--out", str(tmp_path)]) == 2
    assert "must not contain '/' or be one of" in capsys.readouterr().err


def test_fid_on_real_rows_states_its_sample_count(real):
    import dataclasses

    from medm2g_diffusers import MedM2GPipeline
    from medm2g_diffusers.evaluation.benchmark import BenchmarkConfig, run_benchmark

    root, _ = real
    pipe = MedM2GPipeline.from_pretrained(str(root / "tiny"))
    pipe.set_progress_bar_config(disable=True)
    cfg = dataclasses.replace(BenchmarkConfig.quick(), fid=True, text_to_image_targets=("xray",))
    results = run_benchmark(pipe, "tiny", cfg, data=root / "data", split="validation", tasks=["text_to_image"], log=lambda _: None)
    entry = results["text_to_image"]["xray"]
    fid = entry["tiny"]["fid"]
    assert fid["n_real"] == fid["n_fake"] == entry["n"] and np.isfinite(fid["fid"]) and fid["fid"] > 0
    assert f"{entry['n']} real vs {entry['n']} generated images" in fid["note"] and "noisy" in fid["note"]


def test_phantom_validation_split(evaluated, tmp_path):
    root, _ = evaluated
    assert main(["evaluate", "--quick", "--model", str(root / "tiny"), "--split", "validation", "--tasks", "image_to_image",
                 "--translations", "mri_t2+mri_pd->mri_t1", "--out", str(tmp_path), "--threads", "1"]) == 0
    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert results["data"].endswith("(held-out validation split)") and results["skipped"] == {}
    entry = results["image_to_image"]["T2+PD -> T1"]
    assert entry["split"] == "validation" and entry["tiny"]["n"] == 4


def test_evaluate_command_is_rebuilt_from_the_recorded_arguments():
    from medm2g_diffusers.evaluation.benchmark_tables import evaluate_command

    results = {"arguments": {"command": "evaluate", "model": "runs/x/lora", "baseline": [["plain_ldm", "runs/x/scratch"]],
                             "quick": False, "split": "validation", "tasks": ["image_to_image"],
                             "translations": [["T1+T2 -> FLAIR", ["mri_t1", "mri_t2"], "mri_flair"]], "seed": None}}
    assert evaluate_command(results) == ("medm2g evaluate --model runs/x/lora --baseline plain_ldm=runs/x/scratch --split validation "
                                         "--tasks image_to_image --translations 'mri_t1+mri_t2->mri_flair'")
