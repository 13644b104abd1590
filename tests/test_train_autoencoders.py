"""Tests of stage 0 (`training/train_autoencoders.py`): batching, a smoke run of every component, and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers.data.datasets import build_phantom_dataset, save_dataset
from medm2g_diffusers.models.text_vae import MedM2GTextVAE

from training_scripts import load_training_script

SIZE = 32


train_autoencoders = load_training_script("train_autoencoders")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    """A tiny phantom dataset and a config with models small enough for a few CPU steps."""
    root = tmp_path_factory.mktemp("stage0")
    save_dataset(build_phantom_dataset(12, seed=0, size=SIZE), root / "phantoms")
    config = {
        "defaults": {"seed": 0, "mixed_precision": "no", "checkpointing_steps": 2, "checkpoints_total_limit": 3},
        "data": {"dataset": str(root / "phantoms"), "size": SIZE, "report_corpus": str(root / "absent.csv")},
        "tokenizer": {"vocab_size": 400, "min_frequency": 1, "model_max_length": 160, "use_report_corpus": True},
        "image_vae": {
            "model": {"block_out_channels": [8, 8], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4},
            "batch_size": 4, "learning_rate": 1e-3, "lr_scheduler": "cosine", "lr_warmup_steps": 1, "max_grad_norm": 1.0,
            "max_train_steps": 4, "kl_weight": 1e-6, "validation_steps": 2, "num_validation_images": 2,
            "num_grid_images": 2, "scaling_factor_samples": 8,
        },
        "text_vae": {
            "model": {
                "text_latent_dim": 8, "encoder_hidden_size": 16, "encoder_num_layers": 1, "encoder_num_heads": 2,
                "encoder_intermediate_size": 32, "decoder_hidden_size": 16, "decoder_num_layers": 1,
                "decoder_num_heads": 2, "dropout": 0.1, "num_prefix_tokens": 2,
            },
            "batch_size": 4, "num_length_buckets": 2, "learning_rate": 1e-3, "lr_scheduler": "cosine",
            "lr_warmup_steps": 1, "max_grad_norm": 1.0, "max_train_steps": 4, "validation_steps": 2,
            "num_validation_reports": 2, "max_new_tokens": 8, "scaling_factor_samples": 8,
        },
        "output_root": str(root / "out"),
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_length_bucket_sampler_is_a_function_of_seed_and_step():
    lengths = list(np.random.default_rng(0).integers(10, 100, size=50))
    full = list(train_autoencoders.LengthBucketBatchSampler(lengths, 4, seed=3, max_steps=6, num_buckets=4))
    resumed = list(train_autoencoders.LengthBucketBatchSampler(lengths, 4, seed=3, max_steps=6, start_step=4, num_buckets=4))
    assert resumed == full[4:]
    assert full != list(train_autoencoders.LengthBucketBatchSampler(lengths, 4, seed=4, max_steps=6, num_buckets=4))
    # Each batch comes from one bucket: its length spread is far below the whole set's.
    spreads = [np.ptp([lengths[i] for i in batch]) for batch in full]
    assert max(spreads) < np.ptp(lengths) / 2


def test_pad_reports():
    batch = train_autoencoders.pad_reports([[2, 5, 3], [2, 3]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_all_components_train_save_and_resume_reproducibly(config_path):
    output_root = Path(yaml.safe_load(config_path.read_text())["output_root"])
    results = train_autoencoders.main(["--config", str(config_path), "--component", "all"])

    tokenizer = PreTrainedTokenizerFast.from_pretrained(output_root / "tokenizer")
    assert results["tokenizer"]["corpus_reports"] == 0  # the configured corpus is absent: skipped, not an error
    vae = AutoencoderKL.from_pretrained(output_root / "vae")
    assert vae.config.in_channels == vae.config.out_channels == 1
    assert vae.config.scaling_factor == pytest.approx(results["vae"]["scaling_factor"])
    assert vae.config.scaling_factor != AutoencoderKL().config.scaling_factor
    text_vae = MedM2GTextVAE.from_pretrained(output_root / "text_vae")
    assert text_vae.config.vocab_size == len(tokenizer)
    assert text_vae.config.scaling_factor == pytest.approx(results["text_vae"]["scaling_factor"])

    for component in ("vae", "text_vae"):
        assert len(results[component]) and all(np.isfinite(results[component]["losses"]))
        assert (output_root / "validation" / component / "step-2" / "metrics.json").is_file()
    vae_test = results["vae"]["test"]
    assert set(vae_test["per_modality"]) >= {"ct", "mri_t1"} and np.isfinite(vae_test["psnr_mean"])
    assert (output_root / "validation" / "vae" / "final-test" / "reconstruction-ct.png").is_file()
    text_test = json.loads((output_root / "validation" / "text_vae" / "final-test" / "metrics.json").read_text())
    assert {"exact_match", "bleu4", "reconstruction_loss", "finding_f1"} <= set(text_test)
    assert 0.0 <= text_test["finding_f1"] <= 1.0
    assert "HYP:" in (output_root / "validation" / "text_vae" / "final-test" / "reports.txt").read_text()

    # Interrupt after step 2 (drop the step-4 checkpoints) and resume: steps 3-4 repeat exactly.
    for component in ("vae", "text_vae"):
        shutil.rmtree(output_root / "checkpoints" / component / "checkpoint-4")
    resumed = train_autoencoders.main(
        ["--config", str(config_path), "--component", "all", "--resume_from_checkpoint", "latest"]
    )
    for component in ("vae", "text_vae"):
        assert resumed[component]["start_step"] == 2
        assert resumed[component]["losses"] == results[component]["losses"][2:], component
    reloaded = MedM2GTextVAE.from_pretrained(output_root / "text_vae")
    for key, value in text_vae.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


def test_text_vae_alone_needs_a_tokenizer(config_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="--component tokenizer"):
        train_autoencoders.main(["--config", str(config_path), "--component", "text_vae", "--output_dir", str(tmp_path)])


def test_random_crops_are_windows_of_each_image_drawn_from_the_step_generator():
    pixels = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    crops = train_autoencoders.random_crops(pixels, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 1, 4, 4)
    for i in range(2):  # each crop is a contiguous window of its own image
        top, left = divmod(int(crops[i, 0, 0, 0] - pixels[i, 0, 0, 0]), 8)
        assert torch.equal(crops[i], pixels[i, :, top : top + 4, left : left + 4])
    again = train_autoencoders.random_crops(pixels, 4, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)  # a function of the step's generator only


def test_image_vae_trains_on_crops_and_validates_on_whole_images(config_path, tmp_path):
    out = tmp_path / "crops"
    results = train_autoencoders.main(["--config", str(config_path), "--component", "vae", "--output_dir", str(out),
                                       "--set", "image_vae.crop_size=16", "--set", "image_vae.max_train_steps=2"])
    assert all(np.isfinite(results["vae"]["losses"])) and len(results["vae"]["losses"]) == 2
    grid = Image.open(out / "validation" / "vae" / "final-test" / "reconstruction-ct.png")
    assert grid.height == 2 * SIZE  # the validation grid holds whole images, not crops
    with pytest.raises(ValueError, match="image_vae.crop_size"):
        train_autoencoders.main(["--config", str(config_path), "--component", "vae", "--output_dir", str(tmp_path / "bad"),
                                 "--set", "image_vae.crop_size=7"])  # not divisible by the VAE's factor 2
