"""Tests of stage 2 (`training/train_ldm.py`) and the single-flow helpers it shares with evaluation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel

from medm2g_diffusers.models.text_unet import MedM2GTextUNet
from medm2g_diffusers.single_flow import (
    Condition,
    build_image_unet,
    diffusion_loss,
    make_noise_scheduler,
    make_sampling_scheduler,
    pooled_condition,
    sample_latents,
    unet_condition_kwargs,
)

from tiny_workspace import build_workspace
from training_scripts import load_training_script

train_ldm = load_training_script("train_ldm")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("ldm"))


def _run(config: Path, family: str, output_dir: Path, *extra: str) -> dict:
    return train_ldm.main(["--config", str(config), "--family", family, "--output_dir", str(output_dir), *extra])


@pytest.mark.parametrize("family", ["xray", "mri", "text"])
def test_smoke_run_writes_a_loadable_model_and_validation(workspace, family):
    tmp, config = workspace
    result = _run(config, family, tmp / f"run-{family}")
    assert len(result["history"]) == 4 and all(np.isfinite(r["loss"]) for r in result["history"])
    model_dir = Path(result["model"])
    cls = MedM2GTextUNet if family == "text" else UNet2DConditionModel
    model = cls.from_pretrained(str(model_dir))
    if family == "mri":
        assert model.config.num_class_embeds == 4
    if family == "xray":
        assert model.config.num_class_embeds is None
    suffix = "txt" if family == "text" else "png"
    assert (tmp / f"run-{family}" / "validation" / f"step-4.{suffix}").is_file()


def test_resume_reproduces_the_next_loss(workspace):
    """A run killed after its step-2 checkpoint and resumed sees the uninterrupted run's losses."""
    tmp, config = workspace
    full = _run(config, "ct", tmp / "full")
    (tmp / "killed").mkdir()
    shutil.copytree(tmp / "full" / "checkpoint-2", tmp / "killed" / "checkpoint-2")
    resumed = _run(config, "ct", tmp / "killed", "--resume_from_checkpoint", "latest")
    assert resumed["start_step"] == 2
    full_losses = [r["loss"] for r in full["history"]][2:]
    resumed_losses = [r["loss"] for r in resumed["history"]]
    np.testing.assert_allclose(resumed_losses, full_losses, rtol=1e-5)


def test_missing_stage_outputs_are_named(workspace, tmp_path):
    _, config = workspace
    data = yaml.safe_load(config.read_text())
    data["output_root"] = str(tmp_path / "empty")
    other = tmp_path / "c.yaml"
    other.write_text(yaml.safe_dump(data))
    with pytest.raises(FileNotFoundError, match="tokenizer does not exist"):
        _run(other, "xray", tmp_path / "o")


def test_item_enumeration_per_family(workspace):
    tmp, _ = workspace
    from medm2g_diffusers.data.datasets import load_medm2g_dataset

    split = load_medm2g_dataset(tmp / "data")["train"]
    chest = sum(a == "chest" for a in split["anatomy"])
    assert len(train_ldm.enumerate_items(split, "xray")) == chest
    assert len(train_ldm.enumerate_items(split, "mri")) == 4 * split.num_rows
    # text: one item per present imaging modality (chest: xray + ct + 4 MRI; head: ct + 4 MRI)
    assert len(train_ldm.enumerate_items(split, "text")) == 6 * chest + 5 * (split.num_rows - chest)
    # prompt encoders for text + xray only (the ablation): the text LDM is conditioned on X-rays alone
    only_xray = train_ldm.enumerate_items(split, "text", condition_families=["text", "xray"])
    assert len(only_xray) == chest and set(only_xray.keys) == {"xray"}


def test_condition_drop_and_null():
    tokens = torch.ones(3, 4, 2)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    dropped = Condition(tokens, mask).drop(torch.tensor([True, False, True]))
    assert torch.equal(dropped.tokens[1], torch.zeros(4, 2)) and torch.equal(dropped.tokens[0], tokens[0])
    assert dropped.mask[1].tolist() == [1, 0, 0, 0] and dropped.mask[0].tolist() == [1, 1, 0, 0]
    both = Condition.cat([Condition(tokens[:, :2], mask[:, :2]), Condition(tokens, mask)])
    assert both.tokens.shape == (6, 4, 2) and both.mask[:3, 2:].sum() == 0
    with pytest.raises(ValueError, match="mask"):
        Condition(tokens, mask[:, :2])


def test_schedulers_follow_the_paper():
    for scheduler in (make_noise_scheduler(), make_sampling_scheduler()):
        assert scheduler.config.num_train_timesteps == 1000
        assert scheduler.config.beta_schedule == "linear"
        assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
        assert scheduler.config.clip_sample is False


def test_guided_sampling_is_seeded_and_uses_the_condition():
    torch.manual_seed(0)
    unet = build_image_unet(sample_size=8, latent_channels=4, cross_attention_dim=8, block_out_channels=[16, 16], attention_head_dim=8).eval()
    condition = Condition(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.long))
    a = sample_latents(unet, condition, (2, 4, 8, 8), num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    b = sample_latents(unet, condition, (2, 4, 8, 8), num_inference_steps=2, generator=torch.Generator().manual_seed(1))
    c = sample_latents(unet, Condition(-condition.tokens, condition.mask), (2, 4, 8, 8), num_inference_steps=2,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_pooled_condition_is_the_masked_mean_and_zero_for_the_null_condition():
    tokens = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = pooled_condition(tokens, mask)
    torch.testing.assert_close(pooled[0], tokens[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], tokens[1].mean(0))
    null = Condition(tokens, mask).null()
    assert torch.equal(pooled_condition(null.tokens, null.mask), torch.zeros(2, 4))


def test_a_pooled_condition_unet_reads_the_tokens_mean_through_its_time_embedding():
    torch.manual_seed(0)
    plain = build_image_unet(sample_size=8, latent_channels=4, cross_attention_dim=8, block_out_channels=[16, 16], attention_head_dim=8)
    torch.manual_seed(0)
    pooled = build_image_unet(sample_size=8, latent_channels=4, cross_attention_dim=8, block_out_channels=[16, 16], attention_head_dim=8,
                              pooled_condition=True).eval()
    assert plain.config.time_cond_proj_dim is None and pooled.config.time_cond_proj_dim == 8
    assert "timestep_cond" not in unet_condition_kwargs(plain, torch.zeros(1, 2, 8), None)
    tokens, mask = torch.randn(2, 3, 8), torch.tensor([[1, 1, 0], [1, 1, 1]])
    kwargs = unet_condition_kwargs(pooled, tokens, mask)
    torch.testing.assert_close(kwargs["timestep_cond"], pooled_condition(tokens, mask))
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        with_pooled = pooled(sample, t, **kwargs).sample
        without = pooled(sample, t, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample
        # A padded token's value never reaches the output, through either path.
        padded = tokens.clone()
        padded[0, 2] = 100.0
        again = pooled(sample, t, **unet_condition_kwargs(pooled, padded, mask)).sample
    assert not torch.allclose(with_pooled, without)
    torch.testing.assert_close(again, with_pooled)


def test_smoke_run_with_a_pooled_condition(workspace):
    tmp, config = workspace
    result = _run(config, "mri", tmp / "run-pooled", "--set", "ldm.unet.pooled_condition=true")
    model = UNet2DConditionModel.from_pretrained(result["model"])
    assert model.config.time_cond_proj_dim == 16 and model.config.num_class_embeds == 4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_weights_each_sample_by_its_capped_snr(prediction_type):
    scheduler = make_noise_scheduler(prediction_type)
    timesteps = torch.tensor([0, 300, 999])
    prediction, target = torch.zeros(3, 2, 2, 2), torch.ones(3, 2, 2, 2) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1)
    alpha = scheduler.alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    weights = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    expected = (weights * torch.tensor([1.0, 4.0, 9.0])).mean()
    torch.testing.assert_close(diffusion_loss(prediction, target, scheduler, timesteps, snr_gamma=5.0), expected)
    # Without gamma, the plain mean; the weight is below 1 only where the SNR exceeds gamma (t = 0 here).
    assert diffusion_loss(prediction, target, scheduler, timesteps) == pytest.approx((1 + 4 + 9) / 3)
    assert weights[0] < weights[1] and snr[0] > 5.0
    with pytest.raises(ValueError, match="snr_gamma"):
        diffusion_loss(prediction, target, scheduler, timesteps, snr_gamma=-1.0)
