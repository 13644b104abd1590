#!/usr/bin/env python
"""Measures the stage 0-2 models on the held-out phantom test split and writes docs/results/stages.md.

    python scripts/measure_stages.py --root runs/tiny --dataset runs/tiny/phantoms

* image VAE reconstruction PSNR / SSIM per modality (model range [-1, 1], ``data_range=2``), against the
  noisy test images and against the same patients rendered without noise, beside the phantoms' own noise
  floor (PSNR of the noisy image against its noiseless render: what a perfect denoising reconstruction
  would score against the noisy target);
* text VAE reconstruction: exact match and corpus BLEU-4 (sacrebleu) of greedy ``decode(encode(report))``;
* cross-modal retrieval of ``--root``'s prompt encoders (the ones the LDMs are conditioned on), and of its
  alignment stage's hub round when ``<root>/alignment/rounds/hub`` exists (ct<->mri before its round);
* a montage of single-flow text -> image samples (DDIM 50, guidance 2) next to the real phantoms of the
  same reports, and image -> report samples.

Everything is seeded; rerunning gives the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import sacrebleu
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.data.io import write_png
from medm2g_diffusers.data.phantoms import MODALITY_KEYS as PHANTOM_KEYS, PhantomGenerator
from medm2g_diffusers.data.preview import montage
from medm2g_diffusers.modalities import from_model_range, get_modality, to_model_range
from medm2g_diffusers.models.prompt_encoders import MedM2GPromptEncoders
from medm2g_diffusers.models.text_unet import MedM2GTextUNet
from medm2g_diffusers.models.text_vae import MedM2GTextVAE
from medm2g_diffusers.evaluation.denoiser_diagnostics import TIMESTEPS, denoiser_diagnostics
from medm2g_diffusers.single_flow import encode_image_condition, encode_text_condition, sample_latents, sampling_scheduler_for

ROOT = Path(__file__).resolve().parents[1]
PATIENT_ID = re.compile(r"^phantom-s(\d+)-(\d+)$")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/tiny", help="output_root of the trained stages")
    parser.add_argument("--dataset", default="runs/tiny/phantoms")
    parser.add_argument("--max_images", type=int, default=200, help="test images per modality for the VAE")
    parser.add_argument("--max_reports", type=int, default=200, help="test reports for the text VAE")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps for the samples")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "stages.md"))
    parser.add_argument("--note", default="", help="a paragraph on how the models were trained, put under the title")
    parser.add_argument("--unet_root", default=None, help="read the unet_<family> folders from here instead of --root")
    parser.add_argument("--skip", nargs="*", default=[], choices=["vae", "text_vae"], help="parts not to measure again")
    return parser.parse_args()


def test_images(split, key: str, limit: int) -> tuple[np.ndarray, list[str]]:
    table = split.data
    present = np.flatnonzero(~np.asarray(table.column(key).is_null().to_numpy(zero_copy_only=False)))[:limit]
    rows = split.select(present.tolist()).with_format("numpy")
    return np.asarray(rows[key], dtype=np.float32), list(rows["patient_id"])


def noiseless(patient_ids: list[str], key: str, size: int) -> np.ndarray:
    images = []
    for pid in patient_ids:
        seed, index = (int(g) for g in PATIENT_ID.match(pid).groups())
        images.append(PhantomGenerator(seed=seed, size=size).patient(index, noiseless=True).images[key])
    return np.stack(images).astype(np.float32)


def model_range(images: np.ndarray, key: str, reference: np.ndarray | None = None) -> torch.Tensor:
    """Native -> [-1, 1]. MRI percentiles come from ``reference`` (the noisy image) so both share one scale."""
    if get_modality(key).family == "mri" and reference is not None:
        intensity = get_modality(key).intensity
        stats = intensity.percentiles(reference)
        scaled = (images - stats[:, 0, None, None]) / np.maximum(stats[:, 1] - stats[:, 0], 1e-8)[:, None, None] * 2 - 1
        return torch.from_numpy(np.clip(scaled, -1, 1)).unsqueeze(1)
    return torch.as_tensor(to_model_range(images, key)).unsqueeze(1)


def metrics(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {
        "psnr": peak_signal_noise_ratio(prediction, target, data_range=2.0, reduction="elementwise_mean", dim=(1, 2, 3)).item(),
        "ssim": structural_similarity_index_measure(prediction, target, data_range=2.0).item(),
    }


@torch.no_grad()
def measure_image_vae(vae, dataset, size: int, limit: int) -> dict[str, dict[str, float]]:
    results = {}
    for key in PHANTOM_KEYS:  # the modalities phantoms render (not mri_t1c)
        images, ids = test_images(dataset["test"], key, limit)
        clean = noiseless(ids, key, size)
        x = model_range(images, key)
        x_clean = model_range(clean, key, reference=images)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        results[key] = {
            "n": len(ids),
            "vs_noisy": metrics(recon, x),
            "vs_noiseless": metrics(recon, x_clean),
            "noise_floor": metrics(x_clean, x),
        }
    return results


@torch.no_grad()
def measure_text_vae(text_vae, tokenizer, reports: list[str]) -> dict[str, float]:
    batch = tokenizer(reports, padding="longest", truncation=True, max_length=text_vae.config.max_position_embeddings, return_tensors="pt")
    latent = text_vae.encode(batch["input_ids"], batch["attention_mask"]).latent
    decoded = []
    for start in range(0, len(reports), 50):
        decoded += text_vae.decode(latent[start : start + 50], tokenizer, max_new_tokens=192)
    normalise = lambda s: " ".join(tokenizer.decode(tokenizer(s)["input_ids"], skip_special_tokens=True).split())  # noqa: E731
    references = [normalise(r) for r in reports]
    exact = float(np.mean([d.strip() == r for d, r in zip(decoded, references)]))
    bleu = sacrebleu.corpus_bleu(decoded, [references]).score
    return {"n": len(reports), "exact_match": exact, "bleu4": bleu, "examples": list(zip(references[:3], decoded[:3]))}


@torch.no_grad()
def text_to_image_montage(root: Path, dataset, components, args, path: Path) -> tuple[Path, list[str]]:
    """One chest and one head test patient per case; rows alternate real / generated."""
    split = dataset["test"]
    wanted = [("chest", "pleural_effusion", "left"), ("chest", "pleural_effusion", "right"), ("chest", "cardiomegaly", None),
              ("chest", None, None), ("head", "tumour", None), ("head", None, None)]
    chosen = []
    for anatomy, kind, side in wanted:
        for index, (a, findings) in enumerate(zip(split["anatomy"], split["findings"])):
            found = json.loads(findings)
            types = {f["type"] for f in found}
            ok = a == anatomy and (kind is None and not found or kind is not None and types == {kind} and
                                   (side is None or found[0].get("side") == side))
            if ok and index not in chosen:
                chosen.append(index)
                break
    rows = [split[i] for i in chosen]
    reports = [r["report"] for r in rows]
    condition = encode_text_condition(components["prompt_encoders"], components["tokenizer"], reports, 160)
    vae = components["vae"]
    samples = []
    for row in rows:
        samples.append({"real": row})
    for key in PHANTOM_KEYS:
        family = get_modality(key).family
        unet = components.get(f"unet_{family}")
        if unet is None:
            continue
        generator = torch.Generator().manual_seed(args.seed)
        latent_size = unet.config.sample_size
        labels = torch.full((len(rows),), get_modality(key).contrast_index) if unet.config.num_class_embeds else None
        latents = sample_latents(unet, condition, (len(rows), unet.config.in_channels, latent_size, latent_size),
                                 num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator, class_labels=labels,
                                 scheduler=components[f"scheduler_{family}"])
        images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)[:, 0].numpy()
        for sample, image, row in zip(samples, images, rows):
            # X-ray is generated only where a radiograph makes sense (chest reports).
            sample.setdefault("fake", {})[key] = None if (key == "xray" and row["anatomy"] != "chest") else from_model_range(image, key)
    tiles, labels = [], []
    for i, sample in enumerate(samples):
        tiles += [sample["real"], sample.get("fake", {})]
        labels += [f"real {i}", f"generated {i}"]
    image = montage(tiles, tile=96, labels=labels)
    write_png(path, np.asarray(image, np.float32) / 255.0, provenance={"model": f"medm2g single-flow LDMs ({root})", "layout": "pairs of rows: real phantom / generated from its report"})
    return path, reports


@torch.no_grad()
def ldm_diagnostics(dataset, components, args, n: int = 32) -> dict[str, dict[str, float]]:
    """Per image LDM: error of the implied clean latent on noised test latents at a few timesteps, and the std
    of sampled vs real latents (`evaluation.denoiser_diagnostics`). A clean-latent error near the real
    latents' variance at large t, or sampled latents far wider than real ones, means sampling cannot work."""
    split, vae = dataset["test"], components["vae"]
    out = {}
    for key in ("xray", "ct", "mri_t1"):
        family = get_modality(key).family
        unet = components.get(f"unet_{family}")
        if unet is None:
            continue
        images, _ = test_images(split, key, n)
        rows = split.select(np.flatnonzero(~np.asarray(split.data.column(key).is_null().to_numpy(zero_copy_only=False)))[:n].tolist())
        condition = encode_text_condition(components["prompt_encoders"], components["tokenizer"], list(rows["report"]), 160)
        latents = vae.encode(model_range(images, key)).latent_dist.mean * vae.config.scaling_factor
        labels = torch.full((len(images),), get_modality(key).contrast_index) if unet.config.num_class_embeds else None
        result = denoiser_diagnostics(unet, components[f"scheduler_{family}"], latents, condition, labels, args.seed, args.steps, args.guidance)
        out[key] = {"prediction_type": components[f"scheduler_{family}"].config.prediction_type, **result}
    return out


@torch.no_grad()
def image_to_report_samples(dataset, components, args) -> list[dict[str, str]]:
    unet, text_vae, tokenizer = components.get("unet_text"), components["text_vae"], components["tokenizer"]
    if unet is None:
        return []
    split = dataset["test"].select(range(6))
    out = []
    for row in split:
        key = "xray" if row["xray"] is not None else "ct"
        image = model_range(np.asarray(row[key], np.float32)[None], key)
        condition = encode_image_condition(components["prompt_encoders"], key, image)
        latents = sample_latents(unet, condition, (1, unet.config.in_channels, 1, 1), num_inference_steps=args.steps,
                                 guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
                                 scheduler=components["scheduler_text"])
        text = text_vae.decode(latents[:, :, 0, 0] / text_vae.config.scaling_factor, tokenizer)[0]
        out.append({"source": key, "real": row["report"], "generated": text})
    return out


def load_training_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_retrieval(root: Path, dataset, tokenizer, max_text_length: int = 160) -> dict:
    """Recall@1/@5 and top-1 finding agreement (``train_alignment.evaluate_retrieval``) on the test split, for the
    final prompt encoders and, when saved, the alignment's hub round."""
    ta = load_training_script("train_alignment")
    image_keys = [k for f in ("xray", "ct", "mri") for k in ta.modalities_of_family(f)]
    data = ta.AlignmentData(dataset["test"], image_keys)
    encoders = {"after the hub round": root / "alignment" / "rounds" / "hub", "final (prompt_encoders)": root / "prompt_encoders"}
    results = {}
    for name, path in encoders.items():
        if path.is_dir():
            with torch.no_grad():
                results[name] = ta.evaluate_retrieval(MedM2GPromptEncoders.from_pretrained(str(path)).eval(), data, tokenizer, max_text_length)
    return results


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    root = Path(args.root)
    dataset = load_medm2g_dataset(args.dataset)
    size = np.asarray(dataset["test"].with_format("numpy")[0]["ct"]).shape[0]
    components = {
        "tokenizer": PreTrainedTokenizerFast.from_pretrained(str(root / "tokenizer")),
        "vae": AutoencoderKL.from_pretrained(str(root / "vae")).eval(),
        "text_vae": MedM2GTextVAE.from_pretrained(str(root / "text_vae")).eval(),
        "prompt_encoders": MedM2GPromptEncoders.from_pretrained(str(root / "prompt_encoders")).eval(),
    }
    for family, cls in (("xray", UNet2DConditionModel), ("ct", UNet2DConditionModel), ("mri", UNet2DConditionModel), ("text", MedM2GTextUNet)):
        path = Path(args.unet_root or root) / f"unet_{family}"
        if path.is_dir():
            components[f"unet_{family}"] = cls.from_pretrained(str(path)).eval()
            components[f"scheduler_{family}"] = sampling_scheduler_for(path)

    started = time.perf_counter()
    vae_results = {} if "vae" in args.skip else measure_image_vae(components["vae"], dataset, size, args.max_images)
    reports = [r for r in dataset["test"]["report"] if r][: args.max_reports]
    text_results = None if "text_vae" in args.skip else measure_text_vae(components["text_vae"], components["tokenizer"], reports)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    montage_path, montage_reports = text_to_image_montage(root, dataset, components, args, out.with_name(f"{out.stem}_text_to_image.png"))
    report_samples = image_to_report_samples(dataset, components, args)
    diagnostics = ldm_diagnostics(dataset, components, args)
    retrieval = measure_retrieval(root, dataset, components["tokenizer"])
    results = {"image_vae": vae_results, "text_vae": text_results, "retrieval": retrieval, "report_samples": report_samples, "ldm_diagnostics": diagnostics,
               "montage": montage_path.name, "montage_reports": montage_reports,
               "seconds": time.perf_counter() - started, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    out.write_text(render(results, args))
    print(out.read_text())


def render(results: dict, args) -> str:
    lines = [
        "# Stages 0-2 on the phantom test split",
        "",
        f"Made by `python scripts/measure_stages.py --root {args.root} --dataset {args.dataset}"
        f"{f' --unet_root {args.unet_root}' if args.unet_root else ''}{' --skip ' + ' '.join(args.skip) if args.skip else ''}` "
        f"({results['machine']}; {results['seconds']:.0f} s). Raw numbers: `stages.json`.",
        "",
        *([args.note, ""] if args.note else []),
    ]
    if results["image_vae"]:
        lines += ["## Image VAE reconstruction (model range [-1, 1], `data_range=2`)", "",
                  "| modality | n | PSNR vs noisy | SSIM vs noisy | PSNR vs noiseless | SSIM vs noiseless | noise floor PSNR (noisy vs noiseless) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in results["image_vae"].items():
        lines.append(f"| {key} | {r['n']} | {r['vs_noisy']['psnr']:.1f} | {r['vs_noisy']['ssim']:.3f} | "
                     f"{r['vs_noiseless']['psnr']:.1f} | {r['vs_noiseless']['ssim']:.3f} | {r['noise_floor']['psnr']:.1f} |")
    if results["image_vae"]:
        lines += ["", "The noise floor is the PSNR a reconstruction that removed exactly the acquisition noise would score "
                  "against the noisy target; a VAE cannot beat it on the noisy target and should approach it.", ""]
    if results["text_vae"]:
        lines += [
            "## Text VAE reconstruction (greedy decoding of the test reports' latents)",
            "",
            f"Exact match {results['text_vae']['exact_match']:.3f}, corpus BLEU-4 {results['text_vae']['bleu4']:.1f} "
            f"(sacrebleu, n = {results['text_vae']['n']}).",
            "",
        ]
        for ref, dec in results["text_vae"]["examples"]:
            lines += [f"- real: {ref}", f"  decoded: {dec}"]
    if results.get("retrieval"):
        names = list(results["retrieval"])
        lines += ["", "## Cross-modal retrieval (test split)", "",
                  "Mean of both directions; MRI averaged over its four contrasts. Agreement: the top-1 hit's findings equal "
                  "the query's (chance: a random pairing). xray-mri and xray-ct are never trained as pairs; ct-mri only in "
                  "the last round.", "",
                  "| pair | " + " | ".join(f"{n}: R@1 | R@5 | top-1 agreement" for n in names) + " | chance |",
                  "| --- | " + " | ".join("--- | --- | ---" for _ in names) + " | --- |"]
        for pair in results["retrieval"][names[-1]]:
            cells = []
            for n in names:
                m = results["retrieval"][n].get(pair, {}).get("mean")
                cells.append(f"{m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['finding_agreement']:.3f}" if m else "– | – | –")
            chance = results["retrieval"][names[-1]][pair]["mean"]["finding_agreement_chance"]
            lines.append(f"| {pair} | " + " | ".join(cells) + f" | {chance:.3f} |")
        lines += ["", "Alignment schemes side by side: [alignment.md](alignment.md) (central vs no-VI vs pairwise, with wall "
                  "times), [alignment-augment-2000.md](alignment-augment-2000.md) (augmentation and CT windows; its "
                  "`central_vi_mild_aug_ct_frozen_ct_windows` is tiny.yaml's alignment since the r34 retrain), "
                  "[alignment-variants.md](alignment-variants.md), [alignment-minilm.md](alignment-minilm.md), "
                  "[retrieval-ceiling.md](retrieval-ceiling.md) (what a perfect encoder blind to nodules, or masses, could reach)."]
    lines += ["", "## Single-flow text -> image", "",
              f"![real / generated pairs]({results['montage']})", "",
              "Pairs of rows: the real phantom, then each family's single-flow LDM sampled from that patient's report "
              f"(DDIM {args.steps}, guidance {args.guidance}, seed {args.seed}). Reports:", ""]
    lines += [f"{i}. {r}" for i, r in enumerate(results["montage_reports"])]
    if results["ldm_diagnostics"]:
        lines += ["", "### Image LDM diagnostics (32 test images each)", "",
                  "Mean squared error of the clean latent each denoiser implies from a noised test latent (comparable "
                  "across epsilon and v prediction), beside the real latents' variance (the error of always "
                  "predicting their mean is about that), and the spread of latents sampled from pure noise.", "",
                  "| modality | prediction | " + " | ".join(f"x0-MSE t={t}" for t in TIMESTEPS) + " | var of real latents | std of real latents | std of sampled latents |",
                  "| --- | --- | " + " | ".join("---" for _ in TIMESTEPS) + " | --- | --- | --- |"]
        for key, r in results["ldm_diagnostics"].items():
            lines.append(f"| {key} | {r['prediction_type']} | " + " | ".join(f"{r[f'x0_mse_t{t}']:.3f}" for t in TIMESTEPS)
                         + f" | {r['real_latent_var']:.2f} | {r['real_latent_std']:.2f} | {r['sampled_latent_std']:.2f} |")
    if results["report_samples"]:
        lines += ["", "## Single-flow image -> report", ""]
        for s in results["report_samples"]:
            lines += [f"- from {s['source']}: **real** {s['real']}", f"  **generated** {s['generated']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
