"""scripts/write_recipe_page.py: reading tiny.sh's recipe_times.log."""

from __future__ import annotations

import pytest
from training_scripts import load_script

from medm2g_diffusers.evaluation import benchmark_tables as tables

LOG = """[tiny.sh] .venv/bin/python -m medm2g_diffusers.cli phantoms --n 40 --seed 0 --size 64 --out runs/x/phantoms took 38 s
[tiny.sh] launch 2 training/train_autoencoders.py --config runs/x/tiny.yaml --component tokenizer took 12 s
[tiny.sh] launch 1 training/train_ldm.py --family xray --config runs/x/tiny.yaml --resume_from_checkpoint latest took 779 s
[tiny.sh] lanes lane1 | lane2 took 3477 s
[tiny.sh] recipe took 4700 s
"""


@pytest.fixture(scope="module")
def page():
    return load_script("scripts/write_recipe_page.py")


def test_times_are_read_in_order_without_the_launcher_noise(page):
    assert page.recipe_times(LOG) == [("medm2g phantoms --n 40 --seed 0 --size 64", 38), ("train_autoencoders.py --component tokenizer", 12), ("train_ldm.py --family xray", 779),
                                      ("lanes lane1 | lane2", 3477), ("recipe", 4700)]


def test_an_unfinished_recipe_is_refused(page):
    with pytest.raises(ValueError, match="did not finish"):
        page.recipe_times(LOG.replace("[tiny.sh] recipe took 4700 s\n", ""))


def test_the_lanes_line_does_not_break_the_table(page, monkeypatch):
    results = {"model": "rerun", "baselines": [], "image_to_image": {}}
    monkeypatch.setattr(tables, "markdown_tables", lambda results: "(tables)")  # the benchmark tables have their own tests
    monkeypatch.setattr(tables, "evaluate_command", lambda results: "medm2g evaluate ...")
    lines = page.page_lines(page.recipe_times(LOG), results, "times.log", "results.json")
    assert "| lanes lane1 \\| lane2 | 3477 |" in lines and "## Wall time: 78.3 min" in lines


def test_further_comparisons_follow_under_their_own_headings(page, monkeypatch):
    monkeypatch.setattr(tables, "markdown_tables", lambda results: f"(tables of {results['model']})")
    monkeypatch.setattr(tables, "evaluate_command", lambda results: "medm2g evaluate ...")
    monkeypatch.setattr(tables, "paired_table", lambda results, model: [])
    lines = page.page_lines(page.recipe_times(LOG), {"model": "new"}, "times.log", "results.json", title="T", heading="A",
                            also=[("B", {"model": "rerun"})])
    assert lines[0] == "# T"
    assert lines.index("## A") < lines.index("(tables of new)") < lines.index("## B") < lines.index("(tables of rerun)")


def test_previous_run_times_sit_beside_each_step_with_their_ratio(page, monkeypatch):
    monkeypatch.setattr(tables, "markdown_tables", lambda results: "(tables)")
    monkeypatch.setattr(tables, "evaluate_command", lambda results: "medm2g evaluate ...")
    previous = page.recipe_times(LOG.replace("took 779 s", "took 700 s").replace("[tiny.sh] lanes lane1 | lane2 took 3477 s\n", ""))
    lines = page.page_lines(page.recipe_times(LOG), {"model": "rerun", "baselines": [], "image_to_image": {}}, "times.log",
                            "results.json", previous=previous, previous_path="old.log")
    assert "| train_ldm.py --family xray | 779 | 700 | 1.11 |" in lines
    assert "| lanes lane1 \\| lane2 | 3477 | – | – |" in lines  # a step the earlier run did not log
    assert "--previous_times old.log` from" in lines[2]
