"""A tiny training workspace built in code: a phantom dataset plus stage-0/1 components saved where the later
stages look for them, and a config whose sections are small enough for few-step smoke runs."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL

from medm2g_diffusers.data.datasets import build_phantom_dataset
from medm2g_diffusers.models.prompt_encoders import MedM2GPromptEncoders
from medm2g_diffusers.models.text_vae import MedM2GTextVAE
from medm2g_diffusers.tokenizer import train_report_tokenizer

SIZE = 32


def build_workspace(tmp: Path) -> tuple[Path, Path]:
    """Writes ``tmp/data``, ``tmp/out/{tokenizer,prompt_encoders,vae,text_vae}`` and ``tmp/config.yaml``."""
    dataset = build_phantom_dataset(40, seed=0, size=SIZE)
    dataset.save_to_disk(str(tmp / "data"))
    root = tmp / "out"
    tokenizer = train_report_tokenizer(dataset["train"]["report"], vocab_size=400)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    MedM2GPromptEncoders(
        embed_dim=16, sample_size=SIZE, block_out_channels=[8, 16], token_grid=2, norm_num_groups=4,
        text_vocab_size=len(tokenizer), text_hidden_size=16, text_num_layers=1, text_num_heads=2,
        text_intermediate_size=32, barlow_twins_dim=8,
    ).save_pretrained(str(root / "prompt_encoders"))
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1,
    ).save_pretrained(str(root / "vae"))
    torch.manual_seed(0)
    MedM2GTextVAE(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, text_latent_dim=8, encoder_hidden_size=16, encoder_num_layers=1,
        encoder_num_heads=2, encoder_intermediate_size=32, decoder_hidden_size=16, decoder_num_layers=1,
        decoder_num_heads=2, max_position_embeddings=256,
    ).save_pretrained(str(root / "text_vae"))
    config = {
        "defaults": {"seed": 0, "mixed_precision": "no", "checkpointing_steps": 2, "checkpoints_total_limit": 3},
        "data": {"dataset": str(tmp / "data"), "size": SIZE},
        "output_root": str(root),
        "ldm": {
            "train_batch_size": 4, "max_train_steps": 4, "learning_rate": 1e-3, "lr_warmup_steps": 1,
            "max_grad_norm": 1.0, "condition_dropout": 0.1, "ema_decay": 0.9, "cache_latents": True,
            "max_text_tokens": 64, "guidance_scale": 2.0, "validation_steps": 4, "validation_inference_steps": 2,
            "num_validation_samples": 2,
            "unet": {"block_out_channels": [16, 16], "layers_per_block": 1, "attention_head_dim": 8},
            "text_unet": {"hidden_dim": 16, "num_blocks": 1, "attention_head_dim": 8},
        },
        "multiflow": {
            "families": ["text", "xray", "ct", "mri"], "image_conditioning": "concat",
            "source_slots": {"xray": ["ct"], "ct": ["mri_t1", "mri_t2"], "mri": ["mri_t1", "mri_t2", "mri_pd", "mri_flair"]},
            "context_encoder": {"hidden_dim": 8, "token_grid": 2, "num_latent_tokens": 2, "num_adaptive_tokens": 2, "norm_num_groups": 4},
            "train_batch_size": 4, "learning_rate": 1e-3, "denoiser_learning_rate": 1e-3, "lr_warmup_steps": 1,
            "max_grad_norm": 1.0, "condition_dropout": 0.1, "joint_condition_dropout": 0.5, "source_dropout": 0.4,
            "translation_text_dropout": 0.5, "max_text_tokens": 64, "num_validation_rows": 4,
            "rounds": [
                {"name": "text_xray", "kind": "joint", "streams": ["text", "xray"], "trainable": ["text", "xray"], "steps": 2},
                {"name": "ct_mri", "kind": "joint", "streams": ["ct", "mri"], "trainable": ["mri"], "steps": 1},
                {"name": "mri_to_ct", "kind": "translation", "target": "ct", "sources": ["mri_t1", "mri_t2"], "steps": 2},
                {"name": "mri_synthesis", "kind": "translation", "target": "mri", "sources": ["mri_t1", "mri_t2", "mri_pd", "mri_flair"], "steps": 1},
            ],
        },
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return tmp, path
