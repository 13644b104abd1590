#!/usr/bin/env python
"""Report generation against the number of report candidates: how many should a report be chosen from?

    python scripts/measure_report_candidates.py --model medm2g-tiny --candidates 1 2 4 8 16 --threads 2

For every held-out chest X-ray of the phantom validation and test splits, samples the largest number of candidate
reports with the benchmark's protocol (``medm2g_diffusers.evaluation.benchmark``: the same rows, one generator per row
seeded as there, 50 DDIM steps, the report guidance 3.0). For each number K it then scores the report that
`MedM2GPipeline.choose_reports` keeps among each X-ray's first K candidates (minimum Bayes risk: the one closest on
average to the others in the text prompt encoder's space). That is what ``report_candidates=K`` returns, up to the
float rounding of a different batch size; K = 1 is the first candidate alone, the output before report candidates.
K is chosen on validation (highest micro finding F1; a tie goes to the smaller K); the test rows show how that choice
carries over, never make it. Writes docs/results/report-candidates.md and .json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from medm2g_diffusers.evaluation import benchmark
from medm2g_diffusers.evaluation.finding_labeller import finding_f1, label_report
from medm2g_diffusers.evaluation.measure_scripts import (
    add_page_arguments,
    made_by_line,
    report_split,
    report_sweep_lines,
    rewrote_page_only,
    run_report_sweep,
    select_on_validation,
)
from medm2g_diffusers.evaluation.report_metrics import report_generation_metrics

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("validation", "test")
BOOTSTRAP = 1000  # patient resamples for the standard error of each K's difference from K = 1


def bootstrap_difference(predicted: list[set], baseline: list[set], truth: list[set], seed: int = 0) -> float:
    """Standard error of micro finding F1(predicted) - F1(baseline) over patients resampled with replacement (the
    same resample for both: a paired difference)."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(BOOTSTRAP):
        rows = rng.integers(0, len(truth), len(truth))
        reference = [truth[i] for i in rows]
        differences.append(finding_f1([predicted[i] for i in rows], reference)["micro_f1"]
                           - finding_f1([baseline[i] for i in rows], reference)["micro_f1"])
    return float(np.std(differences, ddof=1))


def select_candidates(rows: list[dict]) -> int:
    """The validation K with the highest micro finding F1 (the smaller K on a tie)."""
    return select_on_validation(rows, "candidates")


def sample_candidates(pipe, held_out, cfg, most: int) -> tuple[list[list[str]], list[str], list]:
    """``most`` candidate reports per held-out chest X-ray, drawn as a ``report_candidates=most`` call draws them (each
    row's candidates from that row's generator); with the rows' reference reports and ground-truth findings."""
    rows = benchmark.rows_with(held_out, ["xray", "report"], cfg.n_reports, anatomy="chest")
    xrays = benchmark.native(rows, "xray")
    candidates: list[list[str]] = []
    for start in range(0, rows.num_rows, cfg.batch_size):
        seeds = range(start, min(start + cfg.batch_size, rows.num_rows))
        generators = benchmark.row_generators(cfg, seeds)
        out = pipe(conditions={"xray": torch.from_numpy(xrays[start : start + len(seeds)]).unsqueeze(1)}, targets=["text"],
                   num_images_per_prompt=most, report_candidates=1, generator=[g for g in generators for _ in range(most)],
                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   max_text_tokens=cfg.max_text_tokens, output_type="np")
        candidates += [out.text[i * most : (i + 1) * most] for i in range(len(seeds))]
    return candidates, list(rows["report"]), [benchmark.finding_types(f) for f in rows["findings"]]


def measure(pipe, data, counts: list[int], split: str) -> list[dict]:
    cfg, held_out = report_split(pipe, data, split)
    started = time.perf_counter()
    candidates, references, truth = sample_candidates(pipe, held_out, cfg, max(counts))
    sampling_seconds = time.perf_counter() - started
    results, one = [], [label_report(row[0]) for row in candidates]
    for k in counts:
        flat = [report for row in candidates for report in row[:k]]
        chosen = [flat[i] for i in pipe.choose_reports(flat, k, cfg.max_text_tokens).tolist()]
        scores = {**report_generation_metrics(chosen, references), "finding": finding_f1(chosen, truth)}
        difference = scores["finding"]["micro_f1"] - finding_f1(one, truth)["micro_f1"]
        results.append({"split": split, "candidates": k, "n": len(references), "scores": scores,
                        "micro_f1_minus_one": difference,
                        "micro_f1_minus_one_se": bootstrap_difference([label_report(r) for r in chosen], one, truth),
                        "sampling_seconds_all_candidates": sampling_seconds})
        print(f"{split} K={k}: micro finding F1 {scores['finding']['micro_f1']:.3f} ({difference:+.3f})", flush=True)
    return results


def page_lines(record: dict) -> list[str]:
    rows, chosen = record["rows"], record["chosen_candidates"]

    def difference(row: dict) -> str:
        return "–" if row["candidates"] == 1 else f"{row['micro_f1_minus_one']:+.3f} ± {row['micro_f1_minus_one_se']:.3f}"

    return [
        "# Report generation against the number of report candidates",
        "",
        made_by_line(record, "report-candidates.json"),
        "",
        f"X-ray -> report with `{record['model']}` on the held-out chest patients of the phantom validation and test "
        "splits, with the benchmark's protocol (same rows, per-row seeds, 50 DDIM steps, report guidance 3.0). Each X-ray "
        f"gets {max(r['candidates'] for r in rows)} sampled candidate reports; row K scores the one "
        "`MedM2GPipeline.choose_reports` keeps among its first K (minimum Bayes risk: the candidate whose text-encoder "
        "embedding is closest on average to the others'), which is what `report_candidates=K` returns. K = 1 is one "
        f"sampled report, as before report candidates. K is chosen on the validation split (highest micro finding F1): "
        f"**{chosen}**. The test rows show how that choice carries over. The difference from K = 1 is paired (the same "
        f"patients; its standard error from {BOOTSTRAP} resamples of them).",
        "",
        *report_sweep_lines(rows, "candidates", "candidates", chosen, ("minus K = 1 (bootstrap SE)", difference)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medm2g-tiny", help="a bundled checkpoint name or a pipeline folder")
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--data", default=None, help="a dataset folder (default: the 4,000 seed-0 phantoms, rebuilt)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    add_page_arguments(parser, ROOT / "docs" / "results" / "report-candidates.md")
    args = parser.parse_args()
    if rewrote_page_only(args, page_lines):
        return
    if any(k < 1 for k in args.candidates):
        raise ValueError(f"--candidates must be positive; got {args.candidates}")
    if "validation" not in args.splits:
        raise ValueError("--splits must include validation: the number of candidates is chosen there")
    run_report_sweep(args, "measure_report_candidates.py", measure, sorted(set(args.candidates)), args.splits, "chosen_candidates",
                     select_candidates, page_lines)


if __name__ == "__main__":
    main()
