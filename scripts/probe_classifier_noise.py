#!/usr/bin/env python
"""What the benchmark's finding classifier reads on head CTs: lesions, or pixel texture? And would noise
augmentation make it read the lesions?

    python scripts/probe_classifier_noise.py --classifiers runs/tiny/evaluate_mbr/finding_classifiers \
        --augment_noise 0.01 0.02 --threads 2

On the first held-out head patients of the phantom validation split (the test split is left to the benchmark), the
CT finding classifier (trained on real phantoms only) labels: the real CTs; the same CTs with Gaussian noise of a few
standard deviations added in the display range (clipped to [0, 1]); the CTs through the checkpoint's image VAE
(decode(encode(x)), posterior mean); and CTs the checkpoint generates from the patients' reports (the benchmark's
seeds, 50 DDIM steps, guidance 2.0). For each it prints the rate at which every head finding type is called, against
the rate in the reports, and the exact-set agreement with the reports.

``--augment_noise`` also trains, for each value, a CT classifier as the benchmark trains its own (same training
patients, steps, batch and seed) but with training noise up to that standard deviation in the model range [-1, 1]
(the benchmark's is 0.005, 5 HU), and probes it the same way, beside its accuracy on every real CT of the
validation split. Writes docs/results/classifier-noise.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medm2g_diffusers.evaluation import benchmark
from medm2g_diffusers.evaluation.finding_classifier import MedM2GFindingClassifier, classifier_metrics, finding_examples
from medm2g_diffusers.evaluation.measure_scripts import add_page_arguments, made_by_line, rewrote_page_only, write_record
from medm2g_diffusers.evaluation.train_finding_classifier import ClassifierAugmentation, train_finding_classifier
from medm2g_diffusers.pipelines import MedM2GPipeline

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("haemorrhage", "midline_shift", "tumour")


def rates(sets: list[set], truth: list[set]) -> dict:
    """Per type, the fraction of images called positive; and the fraction whose head findings equal the report's."""
    return {"called": {t: float(np.mean([t in s for s in sets])) for t in TYPES},
            "exact": float(np.mean([(s & set(TYPES)) == (t & set(TYPES)) for s, t in zip(sets, truth)]))}


def real_accuracy(metrics: dict) -> dict:
    """The figures the page keeps of a classifier's metrics on real validation CTs."""
    return {"n": metrics["n"], "exact_set_accuracy": metrics["exact_set_accuracy"], "macro_f1": metrics["macro_f1"],
            "f1": {t: metrics["per_type"][t]["f1"] or 0.0 for t in TYPES}}


def classifier_lines(probe: dict, reports: dict) -> list[str]:
    real = probe["real_validation"]
    lines = [f"### {probe['classifier']}", ""]
    if real is not None:
        lines += [f"On all {real['n']} real validation CTs (chest and head): exact-set accuracy "
                  f"{real['exact_set_accuracy']:.3f}, macro F1 {real['macro_f1']:.3f}; F1 "
                  + ", ".join(f"{t} {real['f1'][t]:.2f}" for t in TYPES) + ".", ""]
    lines += ["| images | " + " | ".join(f"{t} called" for t in TYPES) + " | exact head findings vs report |",
              "|" + " --- |" * (len(TYPES) + 2),
              "| the reports | " + " | ".join(f"{reports[t]:.2f}" for t in TYPES) + " | – |"]
    for row in probe["rows"]:
        lines.append(f"| {row['images']} | " + " | ".join(f"{row['called'][t]:.2f}" for t in TYPES) + f" | {row['exact']:.3f} |")
    return lines + [""]


def page_lines(record: dict) -> list[str]:
    lines = ["# What the CT finding classifier reads on head CTs", "", made_by_line(record, "classifier-noise.json"), "",
             f"CT finding classifiers on the first {record['n']} head patients of the phantom validation split: the "
             f"benchmark's (`{record['classifiers']}`, trained on real phantoms only, with training noise up to 0.005 in "
             "the model range, 5 HU), and any trained here the same way with more training noise. Probe noise is "
             "Gaussian, added in the display range [0, 1] (the [-1000, 1000] HU window, so 0.01 is 20 HU) and clipped. "
             f"Generated: text -> CT by `{record['model']}` from each patient's report (50 DDIM steps, guidance 2.0, the "
             "benchmark's seeds).", ""]
    for probe in record["classifier_probes"]:
        lines += classifier_lines(probe, record["reports"])
    return lines[:-1]


def training_cts():
    """The benchmark's CT classifier training examples (its training patients, real CTs, its finding types)."""
    train = benchmark.load_splits(None, benchmark.BenchmarkConfig(), 64, "validation")[0]
    return finding_examples(train, "ct", benchmark.classifier_types("ct"))


def train_noisier(examples, noise: float, log=print) -> MedM2GFindingClassifier:
    """A CT classifier trained as the benchmark trains its own, with training noise up to ``noise`` (model range)."""
    cfg = benchmark.BenchmarkConfig()
    log(f"training a CT classifier with noise up to {noise:g} on {len(examples.images)} real CTs")
    return train_finding_classifier(examples.images, examples.labels, "ct", benchmark.classifier_types("ct"),
                                    steps=cfg.classifier_steps, batch_size=cfg.classifier_batch_size, seed=cfg.seed,
                                    augment=ClassifierAugmentation(noise_std=noise))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medm2g-tiny", help="a bundled checkpoint name or a pipeline folder")
    parser.add_argument("--classifiers", default=None, help="a finding-classifier folder of `medm2g evaluate` (holds ct/)")
    parser.add_argument("--n", type=int, default=48, help="head patients (default 48)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.005, 0.01, 0.02], help="probe noise standard deviations")
    parser.add_argument("--augment_noise", type=float, nargs="*", default=[],
                        help="also train CT classifiers with training noise up to these standard deviations (model range)")
    add_page_arguments(parser, ROOT / "docs" / "results" / "classifier-noise.md")
    args = parser.parse_args()
    if rewrote_page_only(args, page_lines):
        return
    if args.classifiers is None or not (Path(args.classifiers) / "ct" / "config.json").is_file():
        raise ValueError(f"--classifiers must be a finding-classifier folder of `medm2g evaluate` with a ct/ classifier; got {args.classifiers!r}")
    if any(not 0 < x <= 1 for x in args.augment_noise):
        raise ValueError(f"--augment_noise values must be in (0, 1]; got {args.augment_noise}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = dataclasses.replace(benchmark.BenchmarkConfig(), n_train=1, fid=False)
    held_out = benchmark.load_splits(None, cfg, 64, "validation")[1]
    rows = benchmark.rows_with(held_out, ["ct", "report"], args.n, anatomy="head")
    truth = [benchmark.finding_types(f) for f in rows["findings"]]
    pipe = MedM2GPipeline.from_pretrained(args.model, targets=["ct"], conditions=["text"])
    pipe.set_progress_bar_config(disable=True)

    real = benchmark.display(rows, "ct")
    rng = np.random.default_rng(0)
    images = [("real CTs", real)]
    images += [(f"real + noise, sd {sd:g} ({sd * 2000:g} HU)", np.clip(real + rng.normal(0.0, sd, real.shape), 0.0, 1.0).astype(np.float32))
               for sd in args.noise]
    images.append(("real through the image VAE", benchmark.through_vae({"model": pipe}, real)[1]))
    images.append(("generated from the reports",
                   benchmark.generate(pipe, cfg, ["ct"], list(range(rows.num_rows)), prompts=list(rows["report"]))["ct"]))

    classifiers = [(f"the benchmark's ({args.classifiers})", MedM2GFindingClassifier.from_pretrained(str(Path(args.classifiers) / "ct")))]
    if args.augment_noise:
        examples = training_cts()  # built once for every noise level
        classifiers += [(f"training noise up to {x:g} ({x * 1000:g} HU)", train_noisier(examples, x)) for x in args.augment_noise]
    validation_cts = finding_examples(held_out, "ct", benchmark.classifier_types("ct"))
    probes = []
    for name, classifier in classifiers:
        metrics = classifier_metrics(classifier.predict_probabilities(validation_cts.images), validation_cts.labels,
                                     benchmark.classifier_types("ct"))
        probes.append({"classifier": name, "real_validation": real_accuracy(metrics),
                       "rows": [{"images": label, **rates(classifier.predict_findings(x * 2 - 1), truth)} for label, x in images]})
    record = {"command": "python scripts/probe_classifier_noise.py " + " ".join(sys.argv[1:]), "model": args.model,
              "classifiers": args.classifiers, "machine": platform.machine(), "threads": args.threads,
              "seconds": time.perf_counter() - start, "n": rows.num_rows,
              "reports": {t: float(np.mean([t in s for s in truth])) for t in TYPES}, "classifier_probes": probes}
    write_record(args.page, record, page_lines)
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
