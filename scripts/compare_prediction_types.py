#!/usr/bin/env python
"""Compares single-flow denoisers trained on the same budget with different prediction types (epsilon vs v).

    python scripts/compare_prediction_types.py --unet epsilon=runs/tiny-eps500/unet_xray --unet v=runs/ab/unet_xray \\
        --root runs/tiny --dataset runs/tiny/phantoms --modality xray --note "500 steps x 32 each, tiny config"

For each denoiser, on test-split latents of one modality: the error of the clean latent it implies at a few
timesteps (`evaluation.denoiser_diagnostics`), the spread of latents sampled from noise, and a strip of
samples for the first test reports. Writes docs/results/prediction-type.md (+ .json, + one PNG per model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.data.io import write_png
from medm2g_diffusers.evaluation.denoiser_diagnostics import TIMESTEPS, denoiser_diagnostics
from medm2g_diffusers.modalities import get_modality, to_model_range
from medm2g_diffusers.models.prompt_encoders import MedM2GPromptEncoders
from medm2g_diffusers.single_flow import encode_text_condition, sample_latents, sampling_scheduler_for

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", action="append", required=True, metavar="NAME=DIR", help="a denoiser folder (repeatable)")
    parser.add_argument("--root", default="runs/tiny", help="where tokenizer, prompt_encoders and vae are")
    parser.add_argument("--dataset", default="runs/tiny/phantoms")
    parser.add_argument("--modality", default="xray")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "prediction-type.md"))
    args = parser.parse_args()

    started = time.perf_counter()
    root, key = Path(args.root), args.modality
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer"))
    prompt_encoders = MedM2GPromptEncoders.from_pretrained(str(root / "prompt_encoders")).eval()
    vae = AutoencoderKL.from_pretrained(str(root / "vae")).eval()
    split = load_medm2g_dataset(args.dataset)["test"]
    present = np.flatnonzero(~np.asarray(split.data.column(key).is_null().to_numpy(zero_copy_only=False)))[: args.n]
    rows = split.select(present.tolist())
    images = to_model_range(torch.from_numpy(np.asarray(rows.with_format("numpy")[key], np.float32)), key).unsqueeze(1)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    condition = encode_text_condition(prompt_encoders, tokenizer, list(rows["report"]), 160)
    labels = torch.full((len(rows),), get_modality(key).contrast_index)

    out = Path(args.out)
    results = {}
    for name, path in (item.split("=", 1) for item in args.unet):
        unet = UNet2DConditionModel.from_pretrained(path).eval()
        scheduler = sampling_scheduler_for(path)
        class_labels = labels if unet.config.num_class_embeds else None
        results[name] = {"dir": path, "prediction_type": scheduler.config.prediction_type,
                         **denoiser_diagnostics(unet, scheduler, latents, condition, class_labels, args.seed)}
        with torch.no_grad():
            sampled = sample_latents(unet, condition.index(slice(0, 8)), (8, *latents.shape[1:]), guidance_scale=2.0,
                                     generator=torch.Generator().manual_seed(args.seed), scheduler=scheduler,
                                     class_labels=None if class_labels is None else class_labels[:8])
            decoded = vae.decode(sampled / vae.config.scaling_factor).sample.clamp(-1, 1)
        strip = torch.cat([torch.cat([images[i, 0], decoded[i, 0]], 0) for i in range(8)], 1)
        png = out.with_name(f"{out.stem}-{name}.png")
        write_png(png, ((strip + 1) / 2).numpy(), provenance={"model": f"single-flow {key} LDM {path}", "layout": "top: real; bottom: generated from its report"})
        results[name]["samples"] = png.name

    lines = [f"# Prediction type: {', '.join(results)} on {key}", "",
             f"Made by `python scripts/compare_prediction_types.py {' '.join('--unet ' + u for u in args.unet)} --modality {key}` "
             f"({time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads). Raw numbers: `{out.with_suffix('.json').name}`.", "",
             *([args.note, ""] if args.note else []),
             f"{len(rows)} test {key} latents. x0-MSE: mean squared error of the clean latent the denoiser implies from the "
             "noised latent. An error near the real latents' variance means the denoiser knows nothing at that noise level "
             "(a constant prediction scores about that), and sampling, which starts at t = 999, cannot work.", "",
             "| model | prediction | " + " | ".join(f"x0-MSE t={t}" for t in TIMESTEPS) + " | var of real latents | std of real | std of sampled |",
             "| --- | --- | " + " | ".join("---" for _ in TIMESTEPS) + " | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['prediction_type']} | " + " | ".join(f"{r[f'x0_mse_t{t}']:.3f}" for t in TIMESTEPS)
                     + f" | {r['real_latent_var']:.2f} | {r['real_latent_std']:.2f} | {r['sampled_latent_std']:.2f} |")
    lines.append("")
    for name, r in results.items():
        lines += [f"**{name}** (top: real test image; bottom: sampled from its report, DDIM 50, guidance 2):", "", f"![{name}]({r['samples']})", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(out.read_text())


if __name__ == "__main__":
    main()
