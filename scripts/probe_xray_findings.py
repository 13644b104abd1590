#!/usr/bin/env python
"""How much of a report's findings can be read from what the report path sees of an X-ray?

    python scripts/probe_xray_findings.py --root runs/new12k --dataset runs/tiny/phantoms --threads 1

X-ray -> report conditions the text denoiser on the X-ray's prompt-encoder tokens. This script trains small probes
(a linear layer, and an MLP with one hidden layer of 256) to predict the finding types of the paired report from
three representations of the same chest X-ray: those tokens (flattened), the image VAE's latent (posterior mean),
and the pixels. Labels are the rule-based labeller's finding types of the report (it scores 1.0 on the
references). Probes train on the phantom training split (1,500 steps of batch 128, AdamW 1e-3, features
standardised with training statistics) and are scored on the test split. The micro F1 of the best probe on the
tokens is an estimate of what a report generator conditioned on them could reach with these labels; the pixel
probes say what the 64 px images show at all. Writes docs/results/xray-probes.md and .json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.evaluation.measure_scripts import add_page_arguments, made_by_line, rewrote_page_only, write_record
from medm2g_diffusers.evaluation.finding_labeller import finding_f1, label_report
from medm2g_diffusers.latent_cache import encode_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
from train_multiflow import load_components  # noqa: E402  (the stage-3 script's loader of stage 0-1 outputs)

CHEST_TYPES = ("pleural_effusion", "cardiomegaly", "nodule", "mass", "pneumothorax", "consolidation", "pacemaker")
REPRESENTATIONS = ("prompt-encoder tokens", "VAE latent", "pixels")
HIDDEN = (0, 256)  # 0: a linear probe


def features(split, components) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Chest X-ray rows of ``split``: each representation `(n, d)` and the report's finding types `(n, 7)`."""
    chest = split.filter(lambda row: row["anatomy"] == "chest" and row["xray"] is not None).flatten_indices()
    encoded = encode_split(chest, components, ["xray"], 160, "cpu")
    labels = torch.tensor([[t in label_report(r) for t in CHEST_TYPES] for r in chest["report"]], dtype=torch.float32)
    pixels = torch.from_numpy(np.asarray(chest.with_format("numpy")["xray"], dtype=np.float32))
    return {"prompt-encoder tokens": encoded.tokens["xray"].flatten(1), "VAE latent": encoded.latent_mean["xray"].flatten(1),
            "pixels": pixels.flatten(1)}, labels


def train_probe(train_x, train_y, hidden: int, seed: int, steps: int = 1500) -> torch.nn.Module:
    torch.manual_seed(seed)
    dim, out = train_x.shape[1], train_y.shape[1]
    probe = torch.nn.Linear(dim, out) if hidden == 0 else torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(hidden, out))
    optimizer = torch.optim.AdamW(probe.parameters(), 1e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(train_x), (128,), generator=generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(train_x[rows]), train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe.eval()


def page_lines(record: dict) -> list[str]:
    lines = [
        "# What the report path can read from an X-ray: finding probes",
        "",
        made_by_line(record, "xray-probes.json"),
        "",
        f"Probes trained on the {record['n_train']} chest X-rays of the phantom training split to predict their reports' "
        f"finding types (the rule-based labeller's), scored on the {record['n_test']} of the test split. Encoders from "
        f"`{record['root']}` (frozen). Linear: one linear layer; MLP: one hidden layer of 256 with dropout 0.3.",
        "",
        "| representation | probe | finding F1 (micro) | exact findings | " + " | ".join(CHEST_TYPES) + " |",
        "| --- | --- | --- | --- |" + " --- |" * len(CHEST_TYPES),
    ]
    for row in record["rows"]:
        per_type = row["finding"]["per_type"]
        lines.append(f"| {row['representation']} | {row['probe']} | {row['finding']['micro_f1']:.3f} | "
                     f"{row['finding']['exact_match']:.3f} | " + " | ".join(f"{per_type[t]['f1']:.2f}" for t in CHEST_TYPES) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="stage 0-1 outputs: tokenizer, vae, text_vae, prompt_encoders")
    parser.add_argument("--dataset", type=Path, default=Path("runs/tiny/phantoms"))
    add_page_arguments(parser, ROOT / "docs" / "results" / "xray-probes.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if rewrote_page_only(args, page_lines):
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dataset = load_medm2g_dataset(args.dataset)
    components = load_components(args.root, torch.device("cpu"))
    train_x, train_y = features(dataset["train"], components)
    test_x, test_y = features(dataset["test"], components)
    rows = []
    for name in REPRESENTATIONS:
        mean, std = train_x[name].mean(0), train_x[name].std(0) + 1e-6
        a, b = (train_x[name] - mean) / std, (test_x[name] - mean) / std
        for hidden in HIDDEN:
            probe = train_probe(a, train_y, hidden, args.seed)
            with torch.no_grad():
                predicted = probe(b) > 0
            as_sets = lambda matrix: [{t for t, on in zip(CHEST_TYPES, row) if on} for row in matrix.tolist()]  # noqa: E731
            row = {"representation": name, "probe": "linear" if hidden == 0 else f"MLP {hidden}",
                   "finding": finding_f1(as_sets(predicted), as_sets(test_y > 0.5))}
            rows.append(row)
            print(f"{name} / {row['probe']}: micro F1 {row['finding']['micro_f1']:.3f}", flush=True)
    record = {"command": "python scripts/probe_xray_findings.py " + " ".join(sys.argv[1:]), "root": str(args.root),
              "machine": platform.machine(), "threads": args.threads, "seconds": time.perf_counter() - start,
              "n_train": len(train_y), "n_test": len(test_y), "rows": rows}
    write_record(args.page, record, page_lines)
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
