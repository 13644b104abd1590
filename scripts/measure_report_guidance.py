#!/usr/bin/env python
"""Report generation against the classifier-free guidance scale of the text flow: which scale should reports use?

    python scripts/measure_report_guidance.py --model medm2g-tiny --scales 1 1.5 2 2.5 3 4 5 --threads 1

Scores X-ray -> report with the benchmark's protocol (``medm2g_diffusers.evaluation.benchmark``: the same rows, seeds,
50 DDIM steps, R2Gen BLEU / ROUGE-L and the rule-based labeller's finding F1) at every scale, on the phantom
validation split and on the test split. The scale is chosen on validation only (highest micro finding F1; a tie
goes to the smaller scale); the test rows are there to show how the choice carries over, never to make it.
Writes docs/results/report-guidance.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import torch

from medm2g_diffusers.evaluation.measure_scripts import (
    add_page_arguments,
    made_by_line,
    per_type_f1_table,
    report_split,
    rewrote_page_only,
    score_reports,
    write_record,
)
from medm2g_diffusers.pipelines import MedM2GPipeline

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("validation", "test")


def select_scale(rows: list[dict]) -> float:
    """The validation scale with the highest micro finding F1 (the smaller scale on a tie)."""
    validation = [row for row in rows if row["split"] == "validation"]
    if not validation:
        raise ValueError("rows must hold validation results to choose a scale from")
    return max(validation, key=lambda row: (round(row["scores"]["finding"]["micro_f1"], 6), -row["guidance_scale"]))["guidance_scale"]


def measure(pipe, data, scales: list[float], split: str) -> list[dict]:
    cfg, held_out = report_split(pipe, data, split)
    rows = []
    for scale in scales:
        started = time.perf_counter()
        scores = score_reports(pipe, held_out, dataclasses.replace(cfg, guidance_scale=scale), split)
        n = scores.pop("n")
        rows.append({"split": split, "guidance_scale": scale, "n": n, "scores": scores, "seconds": time.perf_counter() - started})
        print(f"{split} guidance {scale:g}: micro finding F1 {scores['finding']['micro_f1']:.3f}", flush=True)
    return rows


def page_lines(record: dict) -> list[str]:
    rows, chosen = record["rows"], record["chosen_scale"]
    types = list(rows[0]["scores"]["finding"]["per_type"])
    lines = [
        "# Report generation against the guidance scale",
        "",
        made_by_line(record, "report-guidance.json"),
        "",
        f"X-ray -> report with `{record['model']}` on the held-out chest patients of the phantom validation and test "
        "splits, with the benchmark's protocol (same rows, seeds and 50 DDIM steps as `medm2g evaluate`); only the "
        "classifier-free guidance scale of the text flow changes. The scale is chosen on the validation split "
        f"(highest micro finding F1): **{chosen:g}**. The test rows show how that choice carries over.",
        "",
        "| split | guidance | n | BLEU-1 | BLEU-4 | ROUGE-L | finding F1 (micro) | finding F1 (macro) | exact findings |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s, f = row["scores"], row["scores"]["finding"]
        mark = " (chosen)" if row["guidance_scale"] == chosen else ""
        lines.append(f"| {row['split']} | {row['guidance_scale']:g}{mark} | {row['n']} | {s['bleu_1']:.3f} | {s['bleu_4']:.3f} | "
                     f"{s['rouge_l']:.3f} | {f['micro_f1']:.3f} | {f['macro_f1']:.3f} | {f['exact_match']:.3f} |")
    lines += ["", "Per finding type (F1):", ""]
    lines += per_type_f1_table(["split", "guidance"], [([row["split"], f"{row['guidance_scale']:g}"], row["scores"]["finding"]["per_type"])
                                                       for row in rows], types)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medm2g-tiny", help="a bundled checkpoint name or a pipeline folder")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0])
    parser.add_argument("--data", default=None, help="a dataset folder (default: the 4,000 seed-0 phantoms, rebuilt)")
    add_page_arguments(parser, ROOT / "docs" / "results" / "report-guidance.md")
    args = parser.parse_args()
    if rewrote_page_only(args, page_lines):
        return
    if any(scale < 0 for scale in args.scales):
        raise ValueError(f"--scales must be >= 0; got {args.scales}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = MedM2GPipeline.from_pretrained(args.model, targets=["text"], conditions=["xray"])
    pipe.set_progress_bar_config(disable=True)
    scales = sorted(set(args.scales))
    rows = [row for split in SPLITS for row in measure(pipe, args.data, scales, split)]
    record = {"command": "python scripts/measure_report_guidance.py " + " ".join(sys.argv[1:]), "model": args.model,
              "machine": platform.machine(), "threads": args.threads, "seconds": time.perf_counter() - start,
              "chosen_scale": select_scale(rows), "rows": rows}
    write_record(args.page, record, page_lines)
    print(f"wrote {args.page}; chosen scale {record['chosen_scale']:g}")


if __name__ == "__main__":
    main()
