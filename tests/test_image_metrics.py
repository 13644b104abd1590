"""PSNR / SSIM, MS-SSIM diversity and FID against values computed by hand."""

from __future__ import annotations

import math
import socket
import sys

import numpy as np
import pytest
import torch

from medm2g_diffusers.evaluation import (
    MS_SSIM_BETAS_64,
    frechet_distance,
    frechet_inception_distance,
    ms_ssim_diversity,
    psnr_ssim,
)


def test_psnr_of_constant_offsets_by_hand():
    target = np.full((2, 1, 16, 16), 0.25)
    offsets = np.array([0.1, 0.01])[:, None, None, None]
    m = psnr_ssim(target + offsets, target)
    # MSE = offset^2 -> PSNR = 10 log10(1 / MSE) = 20 dB and 40 dB; mean 30, sample std sqrt(2 * 10^2 / 1) = 14.142.
    assert m["psnr"] == pytest.approx([20.0, 40.0], abs=1e-4)
    assert m["psnr_mean"] == pytest.approx(30.0, abs=1e-4)
    assert m["psnr_std"] == pytest.approx(math.sqrt(200.0), abs=1e-4)
    assert m["n"] == 2 and m["data_range"] == 1.0 and "[0, 1]" in m["normalisation"]


def test_ssim_identical_is_one_and_constants_by_hand():
    image = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    m = psnr_ssim(image, image)
    assert m["ssim_mean"] == pytest.approx(1.0) and m["ssim_std"] == pytest.approx(0.0, abs=1e-12)
    assert math.isinf(m["psnr_mean"]) and math.isnan(m["psnr_std"])
    # Two constant images: sigma terms vanish, SSIM = luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    # with C1 = (0.01 * data_range)^2 = 1e-4: (0.6 + 1e-4) / (0.25 + 0.36 + 1e-4) = 0.983609.
    m = psnr_ssim(np.full((24, 24), 0.5), np.full((24, 24), 0.6))
    assert m["ssim"] == pytest.approx([(0.6 + 1e-4) / (0.61 + 1e-4)], abs=1e-9)


def test_data_range_is_explicit():
    # The same pair on a range twice as wide: MSE is unchanged, PSNR gains 20 log10(2) = 6.0206 dB.
    a, b = np.full((1, 16, 16), 0.5), np.full((1, 16, 16), 0.6)
    assert (psnr_ssim(a, b, data_range=2.0)["psnr_mean"] - psnr_ssim(a, b)["psnr_mean"]) == pytest.approx(
        20 * math.log10(2), abs=1e-4
    )


def test_refuses_native_units_and_mismatched_shapes():
    hu = np.full((1, 16, 16), -1000.0)
    with pytest.raises(ValueError, match=r"predictions must be in the display range \[0, 1\]"):
        psnr_ssim(hu, np.zeros((1, 16, 16)))
    with pytest.raises(ValueError, match="same shape"):
        psnr_ssim(np.zeros((2, 16, 16)), np.zeros((1, 16, 16)))


def test_ms_ssim_diversity_of_identical_images_is_one():
    image = np.random.default_rng(0).random((64, 64))
    m = ms_ssim_diversity([np.stack([image] * 3), np.stack([image[::-1]] * 2)])
    assert m["ms_ssim"] == pytest.approx(1.0) and m["ms_ssim_std"] == pytest.approx(0.0, abs=1e-9)
    # 3 images -> 3 pairs, 2 images -> 1 pair.
    assert (m["n_prompts"], m["n_pairs"], m["n_images"]) == (2, 4, 5)
    assert "3 scales" in m["protocol"]


def test_ms_ssim_diversity_of_independent_noise_is_low():
    noise = np.random.default_rng(1).random((2, 4, 1, 64, 64))
    assert ms_ssim_diversity(noise)["ms_ssim"] < 0.2


def test_ms_ssim_betas_fit_64_px():
    # Wang et al.'s first three weights, renormalised: same ratios, sum 1.
    assert sum(MS_SSIM_BETAS_64) == pytest.approx(1.0)
    assert MS_SSIM_BETAS_64[1] / MS_SSIM_BETAS_64[0] == pytest.approx(0.2856 / 0.0448)
    five = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    with pytest.raises(ValueError):  # the standard 5 scales do not fit 64 px
        ms_ssim_diversity([np.random.default_rng(0).random((2, 64, 64))], betas=five)
    with pytest.raises(ValueError, match="at least 2 per prompt"):
        ms_ssim_diversity([np.zeros((1, 64, 64))])


def test_frechet_distance_by_hand():
    # 1-D: a = {0, 2}: mean 1, sample variance 2; b = {1, 5}: mean 3, variance 8.
    # FID = (1 - 3)^2 + 2 + 8 - 2 sqrt(2 * 8) = 4 + 10 - 8 = 6.
    assert frechet_distance(np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])) == pytest.approx(6.0)


@pytest.mark.parametrize("n", [5, 40])  # fewer and more samples than dimensions take different routes
def test_frechet_distance_matches_the_matrix_square_root(n):
    from scipy import linalg

    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, 12)), rng.normal(size=(n + 3, 12)) * 1.5 + 0.3
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(sigma_a + sigma_b) - 2 * np.trace(np.real(linalg.sqrtm(sigma_a @ sigma_b)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_offline_on_grey_64_px_images(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("FID tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    y, x = np.mgrid[:64, :64]
    disks = np.stack([((x - 32) ** 2 + (y - 32) ** 2 < r**2).astype(np.float64) * 0.8 for r in (10, 16, 22)])
    noise = np.random.default_rng(0).random((3, 1, 64, 64))
    same = frechet_inception_distance(disks, disks)
    different = frechet_inception_distance(disks, noise)
    assert abs(same["fid"]) < 1e-6
    assert different["fid"] > 10.0
    assert (different["n_real"], different["n_fake"]) == (3, 3)
    assert "Inception" in different["feature_extractor"] and "299" in different["resize"]
    assert "torchvision" not in sys.modules


def test_ms_ssim_betas_fit_the_image_size():
    from medm2g_diffusers.evaluation.image_metrics import MS_SSIM_BETAS_64, ms_ssim_betas

    assert ms_ssim_betas(64) == MS_SSIM_BETAS_64  # 3 scales: 64 > 10 * 2**2 = 40, but not 64 > 80
    assert len(ms_ssim_betas(32)) == 2 and len(ms_ssim_betas(256)) == 5
    assert sum(ms_ssim_betas(32)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image_size must exceed 20"):
        ms_ssim_betas(16)
