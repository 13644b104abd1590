"""Tests of `MedM2GTextUNet`: the UNet2DConditionModel contract, attention processors, masks and save/load."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from medm2g_diffusers.models import text_unet
from medm2g_diffusers.models.text_unet import MedM2GTextUNet

D, TOKENS, COND = 8, 5, 12


def make_unet(**overrides) -> MedM2GTextUNet:
    torch.manual_seed(0)
    kwargs = dict(in_channels=D, hidden_dim=16, num_blocks=2, cross_attention_dim=COND, attention_head_dim=8)
    kwargs.update(overrides)
    return MedM2GTextUNet(**kwargs)


def inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, D, 1, 1, generator=generator), torch.randn(batch, TOKENS, COND, generator=generator)


class RecordingProcessor(AttnProcessor2_0):
    """Accepts an extra keyword (as MedM2G's cross-guided processors do) and records what it received."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, guide=None):
        self.seen.append(guide)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_forward_contract_matches_unet2dcondition():
    unet = make_unet()
    sample, condition = inputs()
    out = unet(sample, torch.tensor([1, 500, 999]), condition)
    assert isinstance(out, UNet2DConditionOutput)
    assert out.sample.shape == sample.shape
    (as_tuple,) = unet(sample, torch.tensor([1, 500, 999]), condition, return_dict=False)
    torch.testing.assert_close(as_tuple, out.sample)


def test_scalar_timesteps_broadcast():
    unet = make_unet().eval()
    sample, condition = inputs()
    expected = unet(sample, torch.tensor([7, 7, 7]), condition).sample
    for timestep in (7, 7.0, torch.tensor(7)):
        torch.testing.assert_close(unet(sample, timestep, condition).sample, expected)


def test_attention_processors_can_be_swapped_and_receive_kwargs():
    unet = make_unet().eval()
    assert list(unet.attn_processors) == ["blocks.0.attn.processor", "blocks.1.attn.processor"]
    assert all(isinstance(m, Attention) for m in (block.attn for block in unet.blocks))
    sample, condition = inputs()
    expected = unet(sample, 3, condition).sample

    unet.set_attn_processor(AttnProcessor())
    torch.testing.assert_close(unet(sample, 3, condition).sample, expected, atol=1e-5, rtol=1e-5)

    recorder = RecordingProcessor()
    unet.set_attn_processor(recorder)
    out = unet(sample, 3, condition, cross_attention_kwargs={"guide": "tokens"}).sample
    assert recorder.seen == ["tokens", "tokens"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_condition_changes_output_and_mask_hides_tokens():
    unet = make_unet().eval()
    sample, condition = inputs()
    base = unet(sample, 10, condition).sample
    assert not torch.allclose(base, unet(sample, 10, condition + 1.0).sample)

    mask = torch.ones(3, TOKENS)
    mask[:, -2:] = 0
    masked = unet(sample, 10, condition, encoder_attention_mask=mask).sample
    changed = condition.clone()
    changed[:, -2:] = 100.0
    torch.testing.assert_close(unet(sample, 10, changed, encoder_attention_mask=mask).sample, masked)
    torch.testing.assert_close(unet(sample, 10, condition[:, :-2]).sample, masked, atol=1e-5, rtol=1e-5)


def test_gradients_reach_all_parameters():
    unet = make_unet()
    sample, condition = inputs()
    unet(sample, torch.tensor([1, 2, 3]), condition).sample.pow(2).mean().backward()
    missing = [name for name, p in unet.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_save_and_load_round_trip_bit_for_bit(tmp_path):
    unet = make_unet().eval()
    unet.save_pretrained(tmp_path)
    loaded = MedM2GTextUNet.from_pretrained(tmp_path).eval()
    for key, value in unet.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    sample, condition = inputs()
    torch.testing.assert_close(loaded(sample, 5, condition).sample, unet(sample, 5, condition).sample, rtol=0, atol=0)


def test_default_size_matches_the_measured_denoiser():
    params = sum(p.numel() for p in MedM2GTextUNet().parameters())
    assert 1.5e6 < params < 2.2e6  # ~1.8 M in shared/notes/text-path.md


def test_invalid_inputs_name_the_parameter():
    unet = make_unet()
    sample, condition = inputs()
    with pytest.raises(ValueError, match="sample"):
        unet(sample.view(3, D), 1, condition)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        unet(sample, 1, None)
    with pytest.raises(ValueError, match="attention_head_dim"):
        make_unet(hidden_dim=20)


def test_nothing_from_deprecated_pipelines():
    assert "pipelines.deprecated" not in inspect.getsource(text_unet)
