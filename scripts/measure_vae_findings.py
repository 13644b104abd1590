#!/usr/bin/env python
"""Measures how many findings survive the image VAE: the benchmark's finding classifiers on real test images vs
on their VAE reconstructions, per modality and anatomy.

    python scripts/measure_vae_findings.py --vae checkpoints/medm2g-tiny/vae
    python scripts/measure_vae_findings.py --vae 4ch=runs/new/vae --vae 8ch=runs/lat8/vae   # compare VAEs side by side

Every latent model of the package draws its images through this decoder, so a finding the classifier no longer
sees in decode(encode(image)) (posterior mean, as the LDMs are trained on) is one that text -> image, image ->
image and joint generation cannot be scored as drawing, however well the denoiser learns. The classifiers are
those of ``medm2g evaluate`` (trained on real phantoms only; reused from ``--classifiers``, else trained the
same way). Each row also gives the reconstructions' PSNR against the (noisy) test images in the model range
[-1, 1] (``data_range=2``, as ``docs/results/stages.md``). Writes docs/results/vae-findings.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from torchmetrics.functional.image import peak_signal_noise_ratio

from medm2g_diffusers.evaluation.benchmark import BenchmarkConfig, classifier_types, load_splits, train_classifiers
from medm2g_diffusers.evaluation.benchmark_tables import write_page_keeping_notes
from medm2g_diffusers.evaluation.finding_classifier import classifier_metrics, finding_examples
from medm2g_diffusers.evaluation.image_metrics import vae_reconstruct
from medm2g_diffusers.training_utils import atomic_write_text

MODALITIES = ["xray", "ct", "mri_t1", "mri_t2"]


def measure(vaes: dict[str, AutoencoderKL], classifiers: dict, test, modalities: list[str]) -> dict:
    """Per modality and anatomy: the classifier on the real images, and on each VAE's reconstructions with their PSNR."""
    results = {}
    for key in modalities:
        types = classifier_types(key)
        examples = finding_examples(test, key, types)
        anatomy = np.asarray(test.select(examples.rows.tolist())["anatomy"])
        recons = {name: vae_reconstruct(vae, examples.images) for name, vae in vaes.items()}
        for region in sorted(set(anatomy.tolist())):
            rows = anatomy == region
            real = classifier_metrics(classifiers[key].predict_probabilities(examples.images[rows]), examples.labels[rows], types)
            entry = {"modality": key, "anatomy": region, "n": int(rows.sum()), "real": real, "reconstructed": {}, "psnr": {}}
            for name, recon in recons.items():
                entry["reconstructed"][name] = classifier_metrics(
                    classifiers[key].predict_probabilities(recon[rows]), examples.labels[rows], types)
                entry["psnr"][name] = peak_signal_noise_ratio(
                    torch.from_numpy(recon[rows]), torch.from_numpy(examples.images[rows]), data_range=2.0,
                    reduction="elementwise_mean", dim=(1, 2)).item()
            results[f"{key}/{region}"] = entry
    return results


def page_lines(results: dict, command: str, machine: str) -> list[str]:
    names = list(results["vaes"])
    lines = [
        "# Do findings survive the image VAE?", "",
        f"Made by `{command}` ({machine}). Raw numbers: `vae-findings.json`.", "",
        "The benchmark's finding classifiers (trained on real phantoms only) read the held-out test images and their "
        "reconstructions decode(encode(x)) by the image VAE (posterior mean). A finding lost here is one the decoder "
        "does not render even from the image's own latent, so a latent model on this VAE is unlikely to draw it. "
        "PSNR: reconstruction against the test image in the model range [-1, 1] (`data_range=2`).", "",
    ]
    if len(names) > 1:
        lines += ["VAEs: " + "; ".join(f"`{name}` = `{path}`" for name, path in results["vaes"].items()) + ".", ""]
    suffix = (lambda name: f" ({name})") if len(names) > 1 else (lambda name: "")
    header = (["modality", "anatomy", "n", "exact-set: real"] + [f"exact-set: reconstructed{suffix(n)}" for n in names]
              + [f"PSNR dB{suffix(n)}" for n in names] + ["per-type F1, real -> reconstructed" + (" (" + " / ".join(names) + ")" if len(names) > 1 else "")])
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for entry in results["rows"].values():
        real, recs = entry["real"], entry["reconstructed"]
        per = ", ".join(f"{t} {real['per_type'][t]['f1']:.2f} -> " + " / ".join(f"{recs[n]['per_type'][t]['f1']:.2f}" for n in names)
                        for t in real["per_type"]
                        if real["per_type"][t]["f1"] is not None and all(recs[n]["per_type"][t]["f1"] is not None for n in names))
        cells = ([entry["modality"], entry["anatomy"], str(entry["n"]), f"{real['exact_set_accuracy']:.3f}"]
                 + [f"{recs[n]['exact_set_accuracy']:.3f}" for n in names] + [f"{entry['psnr'][n]:.2f}" for n in names] + [per])
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def parse_vae(text: str) -> tuple[str, str]:
    """``NAME=DIR`` or ``DIR`` (named for its parent folder, e.g. ``medm2g-tiny`` for ``checkpoints/medm2g-tiny/vae``)."""
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = Path(text).resolve().parent.name if Path(text).name == "vae" else Path(text).name
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--vae must be DIR or NAME=DIR; got {text!r}")
    return name, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=parse_vae, action="append",
                        help="an AutoencoderKL folder, DIR or NAME=DIR; repeat to compare (default: checkpoints/medm2g-tiny/vae)")
    parser.add_argument("--data", default=None, help="a dataset folder (default: the benchmark's 4,000 seed-0 phantoms, rebuilt)")
    parser.add_argument("--classifiers", default="runs/tiny/evaluate/finding_classifiers",
                        help="the benchmark's finding classifiers (trained here when absent)")
    parser.add_argument("--modalities", nargs="+", default=MODALITIES, choices=MODALITIES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/results/vae-findings.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg = BenchmarkConfig()
    train, test = load_splits(args.data, cfg, image_size=64)
    classifiers, _ = train_classifiers(train, test, args.modalities, cfg, Path(args.classifiers))
    specs = args.vae or [parse_vae("checkpoints/medm2g-tiny/vae")]
    if len({name for name, _ in specs}) != len(specs):
        parser.error(f"--vae names must differ; got {[name for name, _ in specs]}")
    vaes = {name: AutoencoderKL.from_pretrained(path, use_safetensors=True).eval() for name, path in specs}
    results = {"vaes": dict(specs), "rows": measure(vaes, classifiers, test, args.modalities), "seconds": time.perf_counter() - started}
    vae_args = [f"--vae {path}" if len(specs) == 1 else f"--vae {name}={path}" for name, path in specs]
    command = " ".join(["python scripts/measure_vae_findings.py", *vae_args, "--modalities " + " ".join(args.modalities)]
                       + ([f"--data {args.data}"] if args.data else []))
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    write_page_keeping_notes(out, page_lines(results, command, f"{platform.machine()}, {args.threads} threads, "
                                                                 f"{results['seconds']:.0f} s"))
    print(out.read_text())


if __name__ == "__main__":
    main()
