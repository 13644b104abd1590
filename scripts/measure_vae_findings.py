#!/usr/bin/env python
"""Measures how many findings survive the image VAE: the benchmark's finding classifiers on real test images vs
on their VAE reconstructions, per modality and anatomy.

    python scripts/measure_vae_findings.py --vae checkpoints/medm2g-tiny/vae

Every latent model of the package draws its images through this decoder, so a finding the classifier no longer
sees in decode(encode(image)) (posterior mean, as the LDMs are trained on) is one that text -> image, image ->
image and joint generation cannot be scored as drawing, however well the denoiser learns. The classifiers are
those of ``medm2g evaluate`` (trained on real phantoms only; reused from ``--classifiers``, else trained the
same way). Writes docs/results/vae-findings.md and .json.
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

from medm2g_diffusers.evaluation.benchmark import BenchmarkConfig, classifier_types, load_splits, train_classifiers
from medm2g_diffusers.evaluation.benchmark_tables import write_page_keeping_notes
from medm2g_diffusers.evaluation.finding_classifier import classifier_metrics, finding_examples
from medm2g_diffusers.evaluation.image_metrics import vae_reconstruct
from medm2g_diffusers.training_utils import atomic_write_text

MODALITIES = ["xray", "ct", "mri_t1", "mri_t2"]


def measure(vae: AutoencoderKL, classifiers: dict, test, modalities: list[str]) -> dict:
    results = {}
    for key in modalities:
        types = classifier_types(key)
        examples = finding_examples(test, key, types)
        anatomy = np.asarray(test.select(examples.rows.tolist())["anatomy"])
        recon = vae_reconstruct(vae, examples.images)
        for name in sorted(set(anatomy.tolist())):
            rows = anatomy == name
            real = classifier_metrics(classifiers[key].predict_probabilities(examples.images[rows]), examples.labels[rows], types)
            rec = classifier_metrics(classifiers[key].predict_probabilities(recon[rows]), examples.labels[rows], types)
            results[f"{key}/{name}"] = {"modality": key, "anatomy": name, "n": int(rows.sum()), "real": real, "reconstructed": rec}
    return results


def page_lines(results: dict, command: str, machine: str) -> list[str]:
    lines = [
        "# Do findings survive the image VAE?", "",
        f"Made by `{command}` ({machine}). Raw numbers: `vae-findings.json`.", "",
        "The benchmark's finding classifiers (trained on real phantoms only) read the held-out test images and their "
        "reconstructions decode(encode(x)) by the image VAE (posterior mean). A finding lost here is one the decoder "
        "does not render even from the image's own latent, so a latent model on this VAE is unlikely to draw it.", "",
        "| modality | anatomy | n | exact-set: real | exact-set: reconstructed | per-type F1, real -> reconstructed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in results["rows"].values():
        real, rec = entry["real"], entry["reconstructed"]
        per = ", ".join(f"{t} {real['per_type'][t]['f1']:.2f} -> {rec['per_type'][t]['f1']:.2f}" for t in real["per_type"]
                        if real["per_type"][t]["f1"] is not None and rec["per_type"][t]["f1"] is not None)
        lines.append(f"| {entry['modality']} | {entry['anatomy']} | {entry['n']} | {real['exact_set_accuracy']:.3f} | "
                     f"{rec['exact_set_accuracy']:.3f} | {per} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="checkpoints/medm2g-tiny/vae", help="an AutoencoderKL folder")
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
    vae = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True).eval()
    results = {"vae": args.vae, "rows": measure(vae, classifiers, test, args.modalities), "seconds": time.perf_counter() - started}
    command = " ".join(["python scripts/measure_vae_findings.py", f"--vae {args.vae}", "--modalities " + " ".join(args.modalities)]
                       + ([f"--data {args.data}"] if args.data else []))
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    write_page_keeping_notes(out, page_lines(results, command, f"{platform.machine()}, {args.threads} threads, "
                                                                 f"{results['seconds']:.0f} s"))
    print(out.read_text())


if __name__ == "__main__":
    main()
