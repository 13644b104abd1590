"""scripts/measure_vae_findings.py: reconstruction keeps the input's shape and range, and the page's rows."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from training_scripts import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("scripts/measure_vae_findings.py")


def test_reconstruct_returns_one_clamped_image_per_input_in_batches(script):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=2,
                        norm_num_groups=4).eval()
    images = np.random.default_rng(0).uniform(-1, 1, (5, 16, 16)).astype(np.float32)
    out = script.vae_reconstruct(vae, images, batch_size=2)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    np.testing.assert_allclose(out[3], script.vae_reconstruct(vae, images[3:4])[0], atol=1e-5)  # batching changes nothing


def _metrics(exact, f1):
    return {"exact_set_accuracy": exact, "per_type": {"tumour": {"f1": f1}, "nodule": {"f1": None}}}


def test_page_has_a_row_per_modality_and_anatomy_with_the_drop(script):
    results = {"vaes": {"medm2g-tiny": "checkpoints/medm2g-tiny/vae"},
               "rows": {"ct/head": {"modality": "ct", "anatomy": "head", "n": 192, "real": _metrics(0.781, 0.82),
                                    "reconstructed": {"medm2g-tiny": _metrics(0.224, 0.58)}, "psnr": {"medm2g-tiny": 30.03}}}}
    lines = script.page_lines(results, "python scripts/measure_vae_findings.py", "x86_64")
    assert "| ct | head | 192 | 0.781 | 0.224 | 30.03 | tumour 0.82 -> 0.58 |" in lines
    assert not any("nodule" in line for line in lines)  # a type with no F1 on real images is left out


def test_page_compares_several_vaes_column_by_column(script):
    results = {"vaes": {"4ch": "a/vae", "8ch": "b/vae"},
               "rows": {"ct/head": {"modality": "ct", "anatomy": "head", "n": 192, "real": _metrics(0.781, 0.82),
                                    "reconstructed": {"4ch": _metrics(0.224, 0.58), "8ch": _metrics(0.6, 0.7)},
                                    "psnr": {"4ch": 30.0, "8ch": 33.5}}}}
    lines = script.page_lines(results, "python scripts/measure_vae_findings.py", "x86_64")
    assert "| ct | head | 192 | 0.781 | 0.224 | 0.600 | 30.00 | 33.50 | tumour 0.82 -> 0.58 / 0.70 |" in lines
    assert any("exact-set: reconstructed (8ch)" in line for line in lines)


def test_vae_argument_is_a_folder_or_a_named_folder(script):
    assert script.parse_vae("checkpoints/medm2g-tiny/vae") == ("medm2g-tiny", "checkpoints/medm2g-tiny/vae")
    assert script.parse_vae("8ch=runs/lat8/vae") == ("8ch", "runs/lat8/vae")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=DIR"):
        script.parse_vae("=runs/lat8/vae")
