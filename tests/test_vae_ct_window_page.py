"""scripts/measure_vae_ct_window.py: the brain window, the fine-tune probe, and the page rebuilt from its JSON."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from medm2g_diffusers.evaluation.benchmark_tables import NOTES_MARKER
from training_scripts import ROOT, load_script


@pytest.fixture(scope="module")
def probe():
    return load_script("scripts/measure_vae_ct_window.py")


def test_brain_window_maps_40_hu_to_zero_and_clips_outside_0_to_80_hu(probe):
    hu = torch.tensor([-1000.0, 0.0, 20.0, 40.0, 60.0, 80.0, 1000.0])
    assert probe.brain_window(hu / 1000).tolist() == pytest.approx([-1, -1, -0.5, 0, 0.5, 1, 1])


def test_fine_tune_leaves_the_given_vae_untouched_and_the_window_term_changes_the_loss(probe):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=4, latent_channels=2, sample_size=8)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    images = np.random.default_rng(0).uniform(-0.1, 0.2, (6, 8, 8)).astype(np.float32)
    plain, plain_losses = probe.fine_tune(vae, images, 2, 3, 1e-3, 1e-6, 0.0, 0)
    windowed, window_losses = probe.fine_tune(vae, images, 2, 3, 1e-3, 1e-6, 0.1, 0)
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    # Same seed, same first batch: the first loss differs only by the window term, which is positive.
    assert window_losses[0] > plain_losses[0]


def test_page_only_rebuilds_the_table_from_the_json_and_keeps_the_notes(probe, tmp_path, monkeypatch):
    entry = lambda exact: {"n": 2, "exact_set_accuracy": exact, "per_type_f1": {"tumour": 0.5, "nodule": None},  # noqa: E731
                           "psnr": 30.0, "brain_window_psnr": 18.0}
    results = {"command": "python scripts/measure_vae_ct_window.py --steps 3", "machine": "x86_64, 1 threads", "steps": 3,
               "batch_size": 2, "learning_rate": 2e-4, "train_rows": 10, "seconds": 60,
               "rows": {"real": {"head": entry(0.75)}, "bundled VAE": {"head": entry(0.25)}}}
    out = tmp_path / "vae-ct-window.md"
    out.with_suffix(".json").write_text(json.dumps(results))
    out.write_text("old\n" + NOTES_MARKER + "\nmy reading\n")
    monkeypatch.setattr(sys, "argv", ["measure_vae_ct_window.py", "--page_only", "--out", str(out)])
    probe.main()
    page = out.read_text()
    assert "| real | 0.750 | – |" in page and "| bundled VAE | 0.250 | 30.00 / 18.00 |" in page
    assert "bundled VAE: tumour 0.50" in page and "nodule" not in page
    assert page.endswith("my reading\n") and "old" not in page


def test_the_committed_page_matches_its_json(probe):
    page = (ROOT / "docs/results/vae-ct-window.md").read_text()
    results = json.loads((ROOT / "docs/results/vae-ct-window.json").read_text())
    assert "\n".join(probe.page_lines(results)) in page
