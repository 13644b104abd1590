"""The helpers of the results pages (paired differences, the joint and image -> image tables, the VAE ceiling), against
hand-computed values."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from medm2g_diffusers.evaluation.benchmark import vae_ceiling
from medm2g_diffusers.evaluation.benchmark_tables import (
    guidance_text,
    image_to_image_table,
    joint_table,
    paired_difference,
    paired_reading,
    paired_table,
    report_table,
    text_to_image_table,
)


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


def test_image_to_image_table_has_the_vae_ceiling_column_when_the_run_measured_it():
    scores = lambda psnr, ssim: {"psnr_mean": psnr, "ssim_mean": ssim}  # noqa: E731
    entry = {"n": 2, "protocol": "display range", "m": scores(19.5, 0.76), "copy_source": scores(17.6, 0.49), "skipped": {}}
    results = {"model": "m", "baselines": [], "image_to_image": {"T2+PD -> T1": dict(entry)}}
    assert "| task | n | m | copy the source |" in image_to_image_table(results)  # an older run: no ceiling column
    results["image_to_image"]["T2+PD -> T1"]["vae_ceiling"] = {**scores(24.2, 0.9), "model": "m"}
    lines = image_to_image_table(results)
    assert "| task | n | m | copy the source | target through m's VAE (ceiling) |" in lines
    assert "| T2+PD -> T1 | 2 | 19.50 / 0.760 | 17.60 / 0.490 | 24.20 / 0.900 |" in lines
    assert any("Ceiling: the target images through m's image VAE" in line for line in lines)


class _IdentityVAE(torch.nn.Module):
    """encode/decode that return their input: the ceiling of a perfect autoencoder."""

    def encode(self, x):
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=x))

    def decode(self, z):
        return types.SimpleNamespace(sample=z)


def test_vae_ceiling_uses_the_first_pipeline_with_a_vae_and_none_without_one():
    real = np.random.default_rng(0).uniform(0, 1, (3, 8, 8)).astype(np.float32)
    pipes = {"regression": types.SimpleNamespace(), "m": types.SimpleNamespace(vae=_IdentityVAE())}
    ceiling = vae_ceiling(pipes, real)
    assert ceiling["model"] == "m" and ceiling["n"] == 3
    assert ceiling["ssim_mean"] == pytest.approx(1.0) and ceiling["psnr_mean"] > 60  # a perfect VAE scores at float precision
    assert vae_ceiling({"regression": types.SimpleNamespace()}, real) is None


def test_text_to_image_table_has_the_classifier_through_the_vae_beside_the_classifier_on_real():
    finding = lambda exact, macro: {"exact_set_accuracy": exact, "macro_f1": macro}  # noqa: E731
    entry = {"n": 64, "classifier_on_real": finding(0.797, 0.774), "skipped": {},
             "m": {"finding": finding(0.281, 0.297), "ms_ssim_diversity": {"ms_ssim": 0.884, "protocol": "p"}}}
    results = {"model": "m", "baselines": [], "text_to_image": {"ct": dict(entry)}}
    assert "ceiling" not in "".join(text_to_image_table(results))  # an older run: the old columns
    results["text_to_image"]["ct"]["classifier_on_vae_ceiling"] = {**finding(0.42, 0.5), "model": "m"}
    lines = text_to_image_table(results)
    assert any(line.endswith("| classifier on real: exact / macro F1 | classifier on real through m's VAE (ceiling) |") for line in lines)
    assert "| ct | m | 64 | – | 0.884 | 0.281 | 0.297 | 0.797 / 0.774 | 0.420 / 0.500 |" in lines


def test_report_table_says_how_many_candidates_each_report_was_chosen_from():
    scores = {**{f"bleu_{n}": 0.5 for n in range(1, 5)}, "rouge_l": 0.4, "protocol": "R2Gen",
              "finding": {"micro_f1": 0.7, "macro_f1": 0.6, "exact_match": 0.5}}
    results = {"model": "m", "baselines": ["b", "c"], "report_generation": {
        "n": 3, "m": {**scores, "report_candidates": 8}, "b": {**scores, "report_candidates": 8}, "c": {**scores, "report_candidates": 1}}}
    sampling = [line for line in report_table(results) if line.startswith("Sampling: ")]
    assert sampling == ["Sampling: m, b: the consensus of 8 sampled reports per X-ray (minimum Bayes risk: the candidate closest on "
                        "average to the others in the text prompt encoder's space; `report_candidates`); c: one sampled report per X-ray."]
    for name in ("m", "b", "c"):  # a run from before report candidates renders as it did
        del results["report_generation"][name]["report_candidates"]
    assert not any(line.startswith("Sampling: ") for line in report_table(results))
