"""scripts/write_phantom_baselines_page.py: the task fine-tune against the plain LDM, and the budget table."""

from __future__ import annotations

import json

import pytest

from training_scripts import load_script


@pytest.fixture(scope="module")
def page():
    return load_script("scripts/write_phantom_baselines_page.py")


def _scores(psnr):
    return {"psnr": psnr, "ssim": [0.5] * len(psnr)}


def test_finetune_lines_pair_each_fine_tune_with_the_plain_ldm_only(page):
    results = {"model": "medm2g-tiny", "baselines": ["plain_ldm", "finetuned", "finetuned_lr5e-4"], "image_to_image": {
        "T2+PD -> T1": {"n": 3, "medm2g-tiny": _scores([10.0, 10.0, 10.0]), "plain_ldm": _scores([20.0, 21.0, 22.0]),
                        "finetuned": _scores([19.0, 20.0, 21.0]), "finetuned_lr5e-4": _scores([21.0, 22.0, 23.0])}}}
    rows = [line for line in page.finetune_lines(results) if line.startswith("| plain_ldm")]
    assert rows == ["| plain_ldm | -1.00 ± 0.00 | +0.000 ± 0.000 | finetuned worse / within 2 SE |",
                    "| plain_ldm | +1.00 ± 0.00 | +0.000 ± 0.000 | finetuned_lr5e-4 better / within 2 SE |"]
    assert not any(line.startswith("| medm2g-tiny") for line in page.finetune_lines(results))
    assert page.finetune_lines({**results, "baselines": ["plain_ldm"]}) == []  # no fine-tune scored: nothing claimed


def test_budget_lines_read_every_run_that_exists(page, tmp_path):
    def budget(folder, lr, seconds):
        folder.mkdir(parents=True)
        (folder / "budget.json").write_text(json.dumps({"steps": 1500, "train_batch_size": 32, "learning_rate": lr,
                                                         "trainable_parameters": 1865956, "train_seconds": seconds, "torch_threads": 1}))
    task = "phantom_t2_pd_to_t1"
    assert page.budget_lines(tmp_path, task, "mri") == []
    budget(tmp_path / task / "scratch_training", 5e-4, 1200.0)
    budget(tmp_path / "variants" / "lr5e-4" / task / "full_training", 5e-4, None)
    lines = page.budget_lines(tmp_path, task, "mri")
    names = [line.split(" | ")[0].strip("| ") for line in lines[2:-1]]
    assert names == ["medm2g-tiny", "plain_ldm", "finetuned_lr5e-4"]  # the config-rate fine-tune was not trained: no row
    assert "1500 x 32, this task only (lr 0.0005) | 1,865,956 | 20.0 (1 thread)" in lines[3]
    assert lines[4].endswith("| – (1 thread) |")


def test_unknown_task_is_refused_before_anything_loads(page, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["write_phantom_baselines_page.py", "--tasks", "phantom_t2_pd_to_t1", "phantom_nope"])
    with pytest.raises(SystemExit) as exit_info:
        page.main()
    assert exit_info.value.code == 2
    assert "--tasks: unknown ['phantom_nope']" in capsys.readouterr().err
