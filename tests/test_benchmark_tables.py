"""The helpers of the results pages (paired differences, the joint table), against hand-computed values."""

from __future__ import annotations

import math

import pytest

from medm2g_diffusers.evaluation.benchmark_tables import guidance_text, joint_table, paired_difference, paired_reading, paired_table


def test_paired_difference_hand_checked():
    mean, se = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert mean == pytest.approx(2.0) and se == pytest.approx(1.0 / math.sqrt(3.0))  # std([1, 2, 3], ddof=1) = 1
    mean, se = paired_difference([5.0], [4.0])
    assert mean == 1.0 and math.isnan(se)


def test_paired_reading():
    assert paired_reading(2.0, 0.5, "A") == "A better"
    assert paired_reading(-2.0, 0.5, "A") == "A worse"
    assert paired_reading(0.9, 0.5, "A") == "within 2 SE"
    assert paired_reading(3.0, float("nan"), "A") == "within 2 SE"


def test_paired_table_rows():
    scores = lambda psnr, ssim: {"psnr": psnr, "ssim": ssim}  # noqa: E731
    results = {"model": "m", "baselines": ["b", "c"], "image_to_image": {
        "T2 -> T1": {"n": 3, "m": scores([20.0, 21.0, 22.0], [0.5, 0.5, 0.5]), "b": scores([19.0, 19.0, 19.0], [0.5, 0.6, 0.7]),
                     "skipped": {"c": "cannot"}}}}
    lines = paired_table(results)
    assert lines[0] == "Paired on the same 3 images (T2 -> T1): m minus each model, mean ± standard error."
    assert lines[4] == "| b | +2.00 ± 0.58 | -0.100 ± 0.058 | m better / within 2 SE |"
    assert len(lines) == 6  # header (4 lines), one row for b (c was not scored), blank
    assert paired_table(results, "b", "B")[4].startswith("| m | -2.00 ± 0.58 | +0.100 ± 0.058 | B worse / within 2 SE")


def test_paired_table_against_only_the_named_models():
    scores = lambda psnr: {"psnr": psnr, "ssim": [0.5, 0.5]}  # noqa: E731
    results = {"model": "m", "baselines": ["b", "c"], "image_to_image": {
        "T2 -> T1": {"n": 2, "m": scores([20.0, 22.0]), "b": scores([19.0, 19.0]), "c": scores([21.0, 21.0])}}}
    assert [line.split(" |")[0] for line in paired_table(results)[4:6]] == ["| b", "| c"]
    lines = paired_table(results, against=["c"])
    assert len(lines) == 6 and lines[4].startswith("| c | +0.00 ± 1.00 |")
    assert paired_table(results, against=["absent"]) == []  # nothing to pair with: no table at all


def test_joint_table_shows_how_many_patients_have_a_shared_finding_beside_the_agreement():
    results = {"model": "m", "baselines": ["b"], "joint": {"head": {"n": 4, "real": {"ct+mri_t2": 0.75}, "pairs": {
        "ct+mri_t2": {"types": ["tumour"], "with_findings": 0.25}},
        "m/joint": {"agreement": {"ct+mri_t2": 0.5}}, "m/uncoupled": {"agreement": {"ct+mri_t2": 0.25}}}}}
    lines = joint_table(results)
    assert "| anatomy | pair | types both classifiers see | patients with one of them | real images (ceiling) | m joint | m uncoupled | b joint | b uncoupled |" in lines
    assert "| head (n=4) | ct+mri_t2 | tumour | 0.250 | 0.750 | 0.500 | 0.250 | – | – |" in lines


def test_the_header_states_the_guidance_a_run_used():
    assert guidance_text(2.0) == "2.0"  # a run that set one scale (every run before per-target defaults)
    assert guidance_text(None) == "2.0 for images and 3.0 for reports"  # the pipeline's per-target defaults
