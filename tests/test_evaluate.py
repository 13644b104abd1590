"""`medm2g evaluate --quick` end to end on a tiny pipeline, and the model card written from its JSON."""

import json

import pytest
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
    translations = results["image_to_image"]
    assert "tiny" not in translations["MRI (T1+T2+FLAIR) -> CT"]  # the tiny CT denoiser has no FLAIR slot
    assert translations["T2+PD -> T1"]["tiny"]["psnr_mean"] > 0 and translations["T2+PD -> T1"]["copy_source"]["n"] > 0
    assert set(results["joint"]) == {"chest", "head"} and "tiny/joint" in results["joint"]["chest"]
    assert results["augmentation"]["n_real"] == 16 and 0 < results["augmentation"]["n_generated"] <= 8
    tables = (root / "out" / "benchmark.md").read_text()
    for heading in ("Report generation", "Text -> image", "Image -> image", "Joint generation", "Data augmentation"):
        assert heading in tables
    assert "| T1+T2+FLAIR -> PD |" in tables and "cannot" in tables


def test_classifiers_are_cached_and_reused(evaluated, tmp_path):
    root, results = evaluated
    cache = root / "out" / "finding_classifiers"
    assert sorted(p.name for p in cache.iterdir()) == ["ct", "mri_t1", "mri_t2", "xray"]
    code = main(["evaluate", "--quick", "--model", str(root / "tiny"), "--out", str(tmp_path), "--classifiers", str(cache), "--threads", "1"])
    assert code == 0
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
