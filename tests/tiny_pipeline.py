"""Tiny `MedM2GPipeline` components built in code (diffusers' ``get_dummy_components``), shared by the
pipeline and CLI tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from medm2g_diffusers.data.phantoms import PhantomGenerator
from medm2g_diffusers.models import MedM2GMultiFlowModel, MedM2GPromptEncoders, MedM2GTextUNet, MedM2GTextVAE
from medm2g_diffusers.single_flow import NOISE_SCHEDULE, build_image_unet
from medm2g_diffusers.tokenizer import train_report_tokenizer

SIZE, EMBED = 32, 16
SLOTS = {"xray": ["ct"], "ct": ["mri_t1", "mri_t2"], "mri": ["mri_t1", "mri_t2", "mri_pd", "mri_flair"]}


def get_dummy_components() -> dict:
    reports = [PhantomGenerator(seed=1, size=SIZE).patient(i).report for i in range(30)]
    tokenizer = train_report_tokenizer(reports, vocab_size=300)
    torch.manual_seed(0)
    prompt_encoders = MedM2GPromptEncoders(
        embed_dim=EMBED, sample_size=SIZE, block_out_channels=[8, 16], token_grid=2, norm_num_groups=4,
        text_vocab_size=len(tokenizer), text_hidden_size=16, text_num_layers=1, text_num_heads=2,
        text_intermediate_size=32, barlow_twins_dim=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1,
    )
    torch.manual_seed(0)
    text_vae = MedM2GTextVAE(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, text_latent_dim=8, encoder_hidden_size=16, encoder_num_layers=1,
        encoder_num_heads=2, encoder_intermediate_size=32, decoder_hidden_size=16, decoder_num_layers=1,
        decoder_num_heads=2, max_position_embeddings=256,
    )
    unets = {}
    for family, classes in (("xray", None), ("ct", None), ("mri", 4)):
        torch.manual_seed(0)
        unets[family] = build_image_unet(SIZE // 2, 4, EMBED, (8, 16), 1, 8, classes, 8)
    torch.manual_seed(0)
    unets["text"] = MedM2GTextUNet(in_channels=8, hidden_dim=16, num_blocks=1, cross_attention_dim=EMBED, attention_head_dim=8)
    torch.manual_seed(0)
    multiflow = MedM2GMultiFlowModel.from_single_flow(
        unets, {"hidden_dim": 8, "token_grid": 2, "num_latent_tokens": 2, "num_adaptive_tokens": 2, "norm_num_groups": 4},
        source_slots=SLOTS,
    )
    # Move θ_c and the source-slot weights off their zero start, as training would, so every path matters.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in multiflow.named_parameters():
            if "guide" in name or name.endswith("conv_in.weight"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    scheduler = DDIMScheduler(**NOISE_SCHEDULE, prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False)
    return {"multiflow": multiflow.eval(), "vae": vae.eval(), "text_vae": text_vae.eval(), "prompt_encoders": prompt_encoders.eval(),
            "tokenizer": tokenizer, "scheduler": scheduler}


def get_dummy_pipeline():
    """A `MedM2GPipeline` of :func:`get_dummy_components`, progress bar off (the tests' module fixture)."""
    from medm2g_diffusers import MedM2GPipeline

    pipeline = MedM2GPipeline(**get_dummy_components())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
