#!/usr/bin/env python
"""Trains one finding classifier per image modality on the real train split and scores it on the test split.

    OMP_NUM_THREADS=1 python scripts/train_finding_classifiers.py \
        --dataset runs/tiny/phantoms --out runs/tiny/finding_classifiers

Writes ``<out>/<key>/`` (a ``MedM2GFindingClassifier`` folder, replaced atomically) per modality and
``<out>/metrics.json`` (test and validation metrics, training time and settings), and prints a Markdown table.
The test scores are the ceiling of every finding score the benchmark gives generated images of that
modality: a finding the classifier cannot see in real images it cannot see in generated ones either.

A modality's finding types are those of the anatomies that have it (X-ray: chest only; CT and MRI: chest
and head). Only the train split is trained on; the validation split is for choosing settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medm2g_diffusers.data.datasets import has_image, load_medm2g_dataset
from medm2g_diffusers.data.phantoms import MODALITY_KEYS as PHANTOM_KEYS
from medm2g_diffusers.evaluation.finding_classifier import classifier_metrics, default_finding_types, finding_examples
from medm2g_diffusers.evaluation.train_finding_classifier import train_finding_classifier
from medm2g_diffusers.training_utils import atomic_save_pretrained


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="runs/tiny/phantoms", help="a DatasetDict from `medm2g phantoms`")
    parser.add_argument("--out", default="runs/tiny/finding_classifiers")
    parser.add_argument("--modalities", nargs="+", default=list(PHANTOM_KEYS), choices=list(PHANTOM_KEYS))
    parser.add_argument("--steps", type=int, default=2000, help="about 3 min per modality on one 2020s CPU thread")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no_augment", action="store_true", help="train without shift / intensity / noise augmentation")
    parser.add_argument(
        "--model_kwargs", type=json.loads, default={}, help='JSON MedM2GFindingClassifier config, e.g. \'{"pool_size": 4}\''
    )
    return parser.parse_args()


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_table(results: dict) -> str:
    """One row per modality: images, exact-set accuracy, label accuracy, macro F1, then F1 per finding type."""
    all_types = list(dict.fromkeys(t for r in results.values() for t in r["finding_types"]))
    header = ["modality", "test images", "exact-set acc", "label acc", "macro F1", *[f"F1 {t}" for t in all_types], "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, result in results.items():
        test = result["test"]
        per_type = [fmt(test["per_type"][t]["f1"]) if t in test["per_type"] else "-" for t in all_types]
        row = [key, str(test["n"]), fmt(test["exact_set_accuracy"]), fmt(test["label_accuracy"]), fmt(test["macro_f1"]), *per_type]
        lines.append("| " + " | ".join(row + [f"{result['train_seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    dataset = load_medm2g_dataset(args.dataset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, anatomy = dataset["train"], np.asarray(dataset["train"]["anatomy"])

    command = "python scripts/train_finding_classifiers.py " + " ".join(sys.argv[1:])
    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "threads", "no_augment", "model_kwargs")}
    settings.update(torch=torch.__version__, machine=platform.machine())
    metrics_path = out / "metrics.json"
    for key in args.modalities:
        finding_types = default_finding_types(sorted(set(anatomy[has_image(train, key)])))
        examples = finding_examples(train, key, finding_types)
        print(f"{key}: {len(examples.rows)} train images, finding types {finding_types}", flush=True)
        start = time.perf_counter()
        model = train_finding_classifier(
            examples.images,
            examples.labels,
            key,
            finding_types,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            augment=not args.no_augment,
            model_kwargs=args.model_kwargs,
            log_every=max(1, args.steps // 5),
        )
        seconds = time.perf_counter() - start
        atomic_save_pretrained(model, out / key)
        result = {
            "command": command,
            "settings": settings,
            "finding_types": finding_types,
            "train_images": len(examples.rows),
            "train_seconds": round(seconds, 1),
        }
        for split in ("validation", "test"):
            held_out = finding_examples(dataset[split], key, finding_types)
            result[split] = classifier_metrics(model.predict_probabilities(held_out.images), held_out.labels, finding_types)
        print(
            f"{key}: {seconds:.0f} s, test exact-set {result['test']['exact_set_accuracy']:.3f}, "
            f"macro F1 {fmt(result['test']['macro_f1'])} (validation {result['validation']['exact_set_accuracy']:.3f})",
            flush=True,
        )
        # Written after every modality, so an interrupted run keeps what it finished. A rerun of some
        # modalities replaces their entries and keeps the others (each entry records its own command).
        record = json.loads(metrics_path.read_text()) if metrics_path.exists() else {"modalities": {}}
        record["modalities"][key] = result
        metrics_path.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown_table(record["modalities"]))


if __name__ == "__main__":
    main()
