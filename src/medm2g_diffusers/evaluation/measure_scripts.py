"""Plumbing shared by the measurement scripts in ``scripts/`` that write a results page and its JSON.

Each such script takes ``--page`` (the Markdown page; its JSON lies beside it), ``--threads`` and ``--page_only``
(rewrite the page's tables from the JSON, training and scoring nothing), and runs its training steps as logged
subprocesses with a fixed thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import benchmark
from ..training_utils import atomic_write_text
from .benchmark_tables import write_page_keeping_notes


def add_page_arguments(parser: argparse.ArgumentParser, page: Path) -> None:
    """``--page`` (default ``page``), ``--threads`` and ``--page_only``."""
    parser.add_argument("--page", type=Path, default=page, help="the results page (its JSON is written beside it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    parser.add_argument("--page_only", action="store_true", help="rewrite the page from the JSON beside it; run nothing")


def rewrote_page_only(args: argparse.Namespace, page_lines: Callable[[dict], list[str]]) -> bool:
    """With ``--page_only``, rewrites ``args.page`` from its JSON (keeping the hand-written notes) and returns True."""
    if not args.page_only:
        return False
    write_page_keeping_notes(args.page, page_lines(json.loads(args.page.with_suffix(".json").read_text())))
    return True


def write_record(page: Path, record: dict, page_lines: Callable[[dict], list[str]]) -> None:
    """Writes ``record`` as the JSON beside ``page`` and the page's tables from it (keeping its hand-written notes);
    the page's folder is made if needed."""
    page.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(page.with_suffix(".json"), json.dumps(record, indent=2))
    write_page_keeping_notes(page, page_lines(record))


def made_by_line(record: dict, json_name: str) -> str:
    """A page's first line: the command that made it (``record["command"]``), machine, threads and minutes."""
    threads = record["threads"]
    return (f"Made by `{record['command']}` ({record['machine']}, {threads} torch thread{'s' if threads != 1 else ''}; "
            f"{record['seconds'] / 60:.0f} min). Raw numbers: `{json_name}`.")


def report_split(pipe, data, split: str):
    """``(cfg, held_out)``: the benchmark's config and held-out split for scoring reports alone (the training split,
    which only the nearest-neighbour baseline and the classifiers need, is not built)."""
    cfg = dataclasses.replace(benchmark.BenchmarkConfig(), n_train=1)
    return cfg, benchmark.load_splits(data, cfg, pipe.image_size, split=split)[1]


def score_reports(pipe, held_out, cfg, split: str) -> dict:
    """X-ray -> report with the benchmark's protocol (rows, seeds, metrics), without the nearest-neighbour baseline
    or the examples: the scores of ``evaluate_report_generation`` and its ``n``."""
    result = benchmark.evaluate_report_generation({"model": pipe}, held_out.select([]), held_out, cfg, split, {})
    return {"n": result["n"], **{k: v for k, v in result["model"].items() if k != "examples"}}


def select_on_validation(rows: list[dict], key: str) -> Any:
    """The ``key`` value of the validation row with the highest micro finding F1 (the smaller value on a tie): how a
    report-sampling sweep chooses, never looking at its test rows."""
    validation = [row for row in rows if row["split"] == "validation"]
    if not validation:
        raise ValueError(f"rows must hold validation results to choose {key} from")
    return max(validation, key=lambda row: (round(row["scores"]["finding"]["micro_f1"], 6), -row[key]))[key]


def report_sweep_lines(rows: list[dict], key: str, label: str, chosen: Any, extra: tuple[str, Callable[[dict], str]] | None = None) -> list[str]:
    """The tables of a report-sampling sweep: per split and ``key`` value (column ``label``; the chosen one marked),
    BLEU-1/4, ROUGE-L and finding F1, then F1 per finding type. ``extra``: a ``(header, cell(row))`` column after the
    micro F1."""
    header, cell = extra if extra else (None, None)
    lines = [f"| split | {label} | n | BLEU-1 | BLEU-4 | ROUGE-L | finding F1 (micro) |" + (f" {header} |" if header else "")
             + " finding F1 (macro) | exact findings |",
             "|" + " --- |" * (9 + bool(header))]
    for row in rows:
        s, f = row["scores"], row["scores"]["finding"]
        mark = " (chosen)" if row[key] == chosen else ""
        lines.append(f"| {row['split']} | {row[key]:g}{mark} | {row['n']} | {s['bleu_1']:.3f} | {s['bleu_4']:.3f} | "
                     f"{s['rouge_l']:.3f} | {f['micro_f1']:.3f} |" + (f" {cell(row)} |" if cell else "")
                     + f" {f['macro_f1']:.3f} | {f['exact_match']:.3f} |")
    types = list(rows[0]["scores"]["finding"]["per_type"])
    return lines + ["", "Per finding type (F1):", ""] + per_type_f1_table(
        ["split", label], [([row["split"], f"{row[key]:g}"], row["scores"]["finding"]["per_type"]) for row in rows], types)


def run_report_sweep(args: argparse.Namespace, script: str, measure: Callable, values: list, splits: Sequence[str], chosen_key: str,
                     select: Callable[[list[dict]], Any], page_lines: Callable[[dict], list[str]]) -> dict:
    """Loads ``args.model`` for X-ray -> report only, runs ``measure(pipe, data, values, split)`` on each split, and
    writes the page and JSON with the value ``select`` chooses (as ``record[chosen_key]``) and the command line."""
    import platform
    import sys

    import torch

    from ..pipelines import MedM2GPipeline

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = MedM2GPipeline.from_pretrained(args.model, targets=["text"], conditions=["xray"])
    pipe.set_progress_bar_config(disable=True)
    rows = [row for split in splits for row in measure(pipe, args.data, values, split)]
    record = {"command": f"python scripts/{script} " + " ".join(sys.argv[1:]), "model": args.model, "machine": platform.machine(),
              "threads": args.threads, "seconds": time.perf_counter() - start, chosen_key: select(rows), "rows": rows}
    write_record(args.page, record, page_lines)
    print(f"wrote {args.page}; {chosen_key.replace('_', ' ')} {record[chosen_key]:g}")
    return record


def per_type_f1_table(labels: list[str], rows: list[tuple[list[str], dict]], types: list[str]) -> list[str]:
    """A Markdown table of per-finding-type F1: ``labels`` name the leading columns, each row is ``(label cells,
    per_type)`` with ``per_type`` the labeller's ``finding["per_type"]``; a type a row lacks prints as ``-``."""
    lines = ["| " + " | ".join(labels + types) + " |", "|" + " --- |" * (len(labels) + len(types))]
    for cells, per_type in rows:
        lines.append("| " + " | ".join(cells + [f"{per_type[t]['f1']:.2f}" if t in per_type else "-" for t in types]) + " |")
    return lines


def run_logged(cmd: list[str], log: Path, threads: int, cwd: Path) -> float:
    """Runs ``cmd`` in ``cwd`` with ``threads`` OpenMP/MKL threads and its output in ``log``; returns its wall
    seconds. A failing command raises `subprocess.CalledProcessError` (its log says why)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(cmd, check=True, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return time.perf_counter() - start
