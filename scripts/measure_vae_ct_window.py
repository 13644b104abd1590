#!/usr/bin/env python
"""Tests why the image VAE loses head-CT findings (vae-findings.md): is it the CT window?

    python scripts/measure_vae_ct_window.py --steps 400 --threads 1

The phantoms' head lesions differ from brain by 14-44 HU, 0.7-2.2 % of the [-1000, 1000] HU window the model
range spans, so a plain L1 over that range spends almost nothing on them. This fine-tunes the bundled image VAE on
the training split's CT images, the same steps, batch, rate and seed twice: with its own loss (L1 + KL, the
control: more CT training alone) and with an extra L1 through a brain window (centre 40 HU, width 80 HU; ``--window_weight``
times the L1 of the windowed images). Then the benchmark's CT finding classifier (trained on real phantoms only)
reads the test split's real CTs and their reconstructions by the bundled VAE and by each fine-tune, per anatomy,
beside the reconstruction PSNR in the model's display range. Writes docs/results/vae-ct-window.md and .json.
Nothing here changes the bundled model.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from medm2g_diffusers.evaluation.benchmark import BenchmarkConfig, classifier_types, load_splits, train_classifiers
from medm2g_diffusers.evaluation.benchmark_tables import write_page_keeping_notes
from medm2g_diffusers.evaluation.finding_classifier import classifier_metrics, finding_examples
from medm2g_diffusers.evaluation.image_metrics import psnr_ssim, vae_reconstruct
from medm2g_diffusers.training_utils import atomic_write_text

# The model range maps [-1000, 1000] HU to [-1, 1]: 1 HU is 1e-3.
WINDOW_CENTRE, WINDOW_WIDTH = 40 / 1000, 80 / 1000


def brain_window(x: torch.Tensor) -> torch.Tensor:
    """CT in the model range -> the brain window in [-1, 1] (clipped outside it)."""
    return ((x - WINDOW_CENTRE) / (WINDOW_WIDTH / 2)).clamp(-1, 1)


def fine_tune(vae: AutoencoderKL, images: np.ndarray, steps: int, batch_size: int, lr: float, kl_weight: float,
              window_weight: float, seed: int) -> tuple[AutoencoderKL, list[float]]:
    """The VAE trained ``steps`` more on ``images`` `(N, H, W)` (model range); sums per sample, as train_autoencoders."""
    vae = copy.deepcopy(vae).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=1e-2)
    # A short linear warm-up, as train_autoencoders has: Adam's first steps move every weight by about lr.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(images)[:, None]
    num_pixels = images.shape[1] * images.shape[2]
    losses = []
    for _ in range(steps):
        x = x_all[torch.randint(0, len(x_all), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(decoded, x, reduction="none").sum((1, 2, 3)).mean()
        if window_weight:
            loss = loss + window_weight * F.l1_loss(brain_window(decoded), brain_window(x), reduction="none").sum((1, 2, 3)).mean()
        loss = (loss + kl_weight * posterior.kl().mean()) / num_pixels
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return vae.eval(), losses


def score(classifier, examples, anatomy: np.ndarray, images: np.ndarray) -> dict:
    types = classifier_types("ct")
    out = {}
    for name in sorted(set(anatomy.tolist())):
        rows = anatomy == name
        metrics = classifier_metrics(classifier.predict_probabilities(images[rows]), examples.labels[rows], types)
        display = psnr_ssim((images[rows] + 1) / 2, (examples.images[rows] + 1) / 2)
        window = psnr_ssim((brain_window(torch.from_numpy(images[rows])).numpy() + 1) / 2,
                           (brain_window(torch.from_numpy(examples.images[rows])).numpy() + 1) / 2)
        out[name] = {"n": int(rows.sum()), "exact_set_accuracy": metrics["exact_set_accuracy"],
                     "per_type_f1": {t: v["f1"] for t, v in metrics["per_type"].items()},
                     "psnr": display["psnr_mean"], "brain_window_psnr": window["psnr_mean"]}
    return out


def page_lines(results: dict) -> list[str]:
    rows = results["rows"]
    anatomies = sorted(rows["real"])
    psnr = lambda name, e: "–" if name == "real" else f"{e['psnr']:.2f} / {e['brain_window_psnr']:.2f}"  # noqa: E731
    lines = ["# Head-CT findings through the image VAE: the CT window", "",
             f"Made by `{results['command']}` ({results['machine']}, {results['seconds'] / 60:.0f} min). "
             "Raw numbers: `vae-ct-window.json`.", "",
             "The benchmark's CT finding classifier (trained on real phantoms only) reads the test split's real CTs and "
             "their reconstructions decode(encode(x)) (posterior mean). Both fine-tunes start from the bundled VAE and train "
             f"{results['steps']} steps x {results['batch_size']} on the {results['train_rows']} training CTs at "
             f"{results['learning_rate']:g}, same seed and batches; they differ only in the brain-window term (centre 40 HU, "
             "width 80 HU). PSNR: the [-1000, 1000] HU display range, and the brain window, both mapped to [0, 1].", "",
             "| images | " + " | ".join(f"{a}: exact-set | {a}: PSNR / brain-window PSNR dB" for a in anatomies) + " |",
             "| --- | " + " | ".join("--- | ---" for _ in anatomies) + " |"]
    for name, entry in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{entry[a]['exact_set_accuracy']:.3f} | {psnr(name, entry[a])}" for a in anatomies) + " |")
    return lines + ["", "Per-type F1 on head CT: " + "; ".join(
        f"{name}: " + ", ".join(f"{t} {f:.2f}" for t, f in entry["head"]["per_type_f1"].items() if f is not None)
        for name, entry in rows.items() if "head" in entry) + ".", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="checkpoints/medm2g-tiny/vae")
    parser.add_argument("--data", default="runs/tiny/phantoms", help="the benchmark's phantom dataset folder")
    parser.add_argument("--classifiers", default="runs/tiny/evaluate/finding_classifiers")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--window_weight", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results/vae-ct-window.md")
    parser.add_argument("--page_only", action="store_true", help="rewrite the page from the JSON beside it; train nothing")
    args = parser.parse_args()
    out = Path(args.out)
    if args.page_only:
        write_page_keeping_notes(out, page_lines(json.loads(out.with_suffix(".json").read_text())))
        print(out.read_text())
        return
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1; got {args.steps}")
    if args.window_weight <= 0:
        raise ValueError(f"--window_weight must be positive (the control run has none); got {args.window_weight}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg = BenchmarkConfig()
    train, test = load_splits(args.data, cfg, image_size=64)
    classifiers, _ = train_classifiers(train, test, ["ct"], cfg, Path(args.classifiers))
    types = classifier_types("ct")
    train_images = finding_examples(train, "ct", types).images
    examples = finding_examples(test, "ct", types)
    anatomy = np.asarray(test.select(examples.rows.tolist())["anatomy"])
    base = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True).eval()
    kl_weight = 1e-6  # tiny.yaml's image_vae.kl_weight
    print(f"data and classifier ready after {time.perf_counter() - started:.0f} s", flush=True)
    rows = {"real": score(classifiers["ct"], examples, anatomy, examples.images),
            "bundled VAE": score(classifiers["ct"], examples, anatomy, vae_reconstruct(base, examples.images))}
    runs = {}
    for name, weight in (("+ CT fine-tune, L1", 0.0), (f"+ CT fine-tune, L1 + {args.window_weight:g} x brain-window L1", args.window_weight)):
        t0 = time.perf_counter()
        tuned, losses = fine_tune(base, train_images, args.steps, args.batch_size, args.learning_rate, kl_weight, weight, args.seed)
        runs[name] = {"seconds": time.perf_counter() - t0, "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:]))}
        rows[name] = score(classifiers["ct"], examples, anatomy, vae_reconstruct(tuned, examples.images))
        print(name, json.dumps(rows[name]), flush=True)
    command = (f"python scripts/measure_vae_ct_window.py --vae {args.vae} --data {args.data} --steps {args.steps} "
               f"--batch_size {args.batch_size} --learning_rate {args.learning_rate:g} --window_weight {args.window_weight:g} "
               f"--seed {args.seed} --threads {args.threads}")
    results = {"command": command, "machine": f"{platform.machine()}, {args.threads} threads", "steps": args.steps,
               "batch_size": args.batch_size, "learning_rate": args.learning_rate, "train_rows": int(len(train_images)),
               "rows": rows, "runs": runs, "seconds": time.perf_counter() - started}
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    write_page_keeping_notes(out, page_lines(results))
    print(out.read_text())


if __name__ == "__main__":
    main()
