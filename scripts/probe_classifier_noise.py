#!/usr/bin/env python
"""What the benchmark's finding classifier reads on head CTs: lesions, or pixel texture?

    python scripts/probe_classifier_noise.py --classifiers runs/tiny/evaluate_mbr/finding_classifiers --threads 2

On the first held-out head patients of the phantom validation split (the test split is left to the benchmark), the
CT finding classifier (trained on real phantoms only) labels: the real CTs; the same CTs with Gaussian noise of a few
standard deviations added in the display range (clipped to [0, 1]); the CTs through the checkpoint's image VAE
(decode(encode(x)), posterior mean); and CTs the checkpoint generates from the patients' reports (the benchmark's
seeds, 50 DDIM steps, guidance 2.0). For each it prints the rate at which every head finding type is called, against
the rate in the reports, and the exact-set agreement with the reports. Writes docs/results/classifier-noise.md and .json.
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
from medm2g_diffusers.evaluation.finding_classifier import MedM2GFindingClassifier
from medm2g_diffusers.evaluation.measure_scripts import add_page_arguments, made_by_line, rewrote_page_only, write_record
from medm2g_diffusers.pipelines import MedM2GPipeline

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("haemorrhage", "midline_shift", "tumour")


def rates(sets: list[set], truth: list[set]) -> dict:
    """Per type, the fraction of images called positive; and the fraction whose head findings equal the report's."""
    return {"called": {t: float(np.mean([t in s for s in sets])) for t in TYPES},
            "exact": float(np.mean([(s & set(TYPES)) == (t & set(TYPES)) for s, t in zip(sets, truth)]))}


def page_lines(record: dict) -> list[str]:
    lines = ["# What the CT finding classifier reads on head CTs", "", made_by_line(record, "classifier-noise.json"), "",
             f"The benchmark's CT finding classifier (`{record['classifiers']}`, trained on real phantoms only) on the first "
             f"{record['n']} head patients of the phantom validation split. Noise is Gaussian, added in the display range "
             "[0, 1] (the [-1000, 1000] HU window, so 0.01 is 20 HU) and clipped. Generated: text -> CT by "
             f"`{record['model']}` from each patient's report (50 DDIM steps, guidance 2.0, the benchmark's seeds).", "",
             "| images | " + " | ".join(f"{t} called" for t in TYPES) + " | exact head findings vs report |",
             "|" + " --- |" * (len(TYPES) + 2),
             "| the reports | " + " | ".join(f"{record['reports'][t]:.2f}" for t in TYPES) + " | – |"]
    for row in record["rows"]:
        lines.append(f"| {row['images']} | " + " | ".join(f"{row['called'][t]:.2f}" for t in TYPES) + f" | {row['exact']:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medm2g-tiny", help="a bundled checkpoint name or a pipeline folder")
    parser.add_argument("--classifiers", default=None, help="a finding-classifier folder of `medm2g evaluate` (holds ct/)")
    parser.add_argument("--n", type=int, default=48, help="head patients (default 48)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.005, 0.01, 0.02], help="noise standard deviations")
    add_page_arguments(parser, ROOT / "docs" / "results" / "classifier-noise.md")
    args = parser.parse_args()
    if rewrote_page_only(args, page_lines):
        return
    if args.classifiers is None or not (Path(args.classifiers) / "ct" / "config.json").is_file():
        raise ValueError(f"--classifiers must be a finding-classifier folder of `medm2g evaluate` with a ct/ classifier; got {args.classifiers!r}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = dataclasses.replace(benchmark.BenchmarkConfig(), n_train=1, fid=False)
    held_out = benchmark.load_splits(None, cfg, 64, "validation")[1]
    rows = benchmark.rows_with(held_out, ["ct", "report"], args.n, anatomy="head")
    truth = [benchmark.finding_types(f) for f in rows["findings"]]
    classifier = MedM2GFindingClassifier.from_pretrained(str(Path(args.classifiers) / "ct"))
    pipe = MedM2GPipeline.from_pretrained(args.model, targets=["ct"], conditions=["text"])
    pipe.set_progress_bar_config(disable=True)

    def called(images: np.ndarray, name: str) -> dict:
        return {"images": name, **rates(classifier.predict_findings(images * 2 - 1), truth)}

    real = benchmark.display(rows, "ct")
    results = [called(real, "real CTs")]
    rng = np.random.default_rng(0)
    for sd in args.noise:
        noisy = np.clip(real + rng.normal(0.0, sd, real.shape), 0.0, 1.0).astype(np.float32)
        results.append(called(noisy, f"real + noise, sd {sd:g} ({sd * 2000:g} HU)"))
    results.append(called(benchmark.through_vae({"model": pipe}, real)[1], "real through the image VAE"))
    generated = benchmark.generate(pipe, cfg, ["ct"], list(range(rows.num_rows)), prompts=list(rows["report"]))["ct"]
    results.append(called(generated, "generated from the reports"))
    record = {"command": "python scripts/probe_classifier_noise.py " + " ".join(sys.argv[1:]), "model": args.model,
              "classifiers": args.classifiers, "machine": platform.machine(), "threads": args.threads,
              "seconds": time.perf_counter() - start, "n": rows.num_rows,
              "reports": {t: float(np.mean([t in s for s in truth])) for t in TYPES}, "rows": results}
    write_record(args.page, record, page_lines)
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
