#!/usr/bin/env python
"""Report generation against the text LDM's training length: is image -> report limited by the text denoiser?

    python scripts/measure_text_ldm_steps.py --root runs/new --steps 1500 6000 12000 --threads 1

For each step count this trains the text LDM (``training/train_ldm.py --family text``, tiny.yaml's text recipe
but ``--max_train_steps``) on the stage 0-1 outputs of ``--root`` (tokenizer, image VAE, text VAE, prompt
encoders; linked, not copied), wraps it with the root's image denoisers as a single-flow pipeline
(``scripts/export_single_flow_pipeline.py``) and scores X-ray -> report on the phantom test split with
``medm2g evaluate --tasks report_generation`` (the benchmark's protocol: R2Gen BLEU / ROUGE-L, finding F1 of the
rule-based labeller). Only the text denoiser differs between the rows. Each run lives in ``--out/<steps>``; a step
count whose evaluation is already there is not trained again. Writes docs/results/text-ldm-steps.md and .json.

``--variant LABEL:KEY=VALUE,KEY=VALUE`` (repeatable) also trains the text LDM with those config overrides, in
``--out/<LABEL>-<steps>``, at each of ``--variant_steps`` (default: every step count), e.g.
``--variant deep:ldm.text_unet.num_blocks=6 --variant_steps 12000`` beside the plain recipe.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from medm2g_diffusers.evaluation.measure_scripts import (
    add_page_arguments,
    per_type_f1_table,
    rewrote_page_only,
    run_logged,
    write_record,
)
from medm2g_diffusers.training_utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
STAGE_01 = ("tokenizer", "vae", "text_vae", "prompt_encoders")
NAME = "text_ldm"  # the method's key in the evaluation JSON


def run(cmd: list[str], log: Path, threads: int) -> float:
    """Runs ``cmd`` from the repository root with its output in ``log``; returns its wall time in seconds."""
    return run_logged(cmd, log, threads, ROOT)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``LABEL:KEY=VALUE,KEY=VALUE`` -> ``(label, ["KEY=VALUE", ...])``."""
    label, _, overrides = text.partition(":")
    pairs = [pair for pair in overrides.split(",") if pair]
    if not label.replace("_", "").replace("-", "").isalnum() or not pairs or not all("=" in pair for pair in pairs):
        raise ValueError(f"--variant must be LABEL:KEY=VALUE[,KEY=VALUE...] with a word for LABEL; got {text!r}")
    return label, pairs


def measure(root: Path, folder: Path, steps: int, args, overrides: tuple[str, ...] = ()) -> dict:
    """Trains (unless done) and scores one step count (with config ``overrides``); returns its row."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*STAGE_01, *(p.name for p in root.glob("unet_*") if p.name != "unet_text")):
        link = folder / name
        if not link.exists():
            link.symlink_to((root / name).resolve(), target_is_directory=True)
    times_path = folder / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if not (folder / "unet_text").is_dir():
        times["train_seconds"] = run([sys.executable, "training/train_ldm.py", "--config", args.config, "--family", "text",
                                      "--dataset", str(args.dataset), "--set", f"output_root={folder}",
                                      *(arg for pair in overrides for arg in ("--set", pair)),
                                      "--max_train_steps", str(steps), "--resume_from_checkpoint", "latest"],
                                     folder / "train.log", args.threads)
        atomic_write_text(times_path, json.dumps(times, indent=2))
    pipeline = folder / "pipeline_single_flow"
    if not pipeline.is_dir():
        run([sys.executable, "scripts/export_single_flow_pipeline.py", "--root", str(folder), "--out", str(pipeline)],
            folder / "export.log", args.threads)
    evaluation = folder / "evaluate"
    if not (evaluation / "benchmark.json").exists():
        times["evaluate_seconds"] = run([sys.executable, "-m", "medm2g_diffusers.cli", "evaluate", "--model", str(pipeline),
                                         "--name", NAME, "--out", str(evaluation),
                                         "--no-fid", "--tasks", "report_generation", "--report-candidates", "1", "--split", "test",
                                         "--threads", str(args.threads)], folder / "evaluate.log", args.threads)
        atomic_write_text(times_path, json.dumps(times, indent=2))
    report = json.loads((evaluation / "benchmark.json").read_text())["report_generation"]
    return {"steps": steps, "overrides": list(overrides), "folder": str(folder), "train_seconds": times.get("train_seconds"), "n": report["n"],
            "scores": report[NAME], "nearest_neighbour": report.get("nearest_neighbour")}


def row_name(row: dict) -> str:
    """The steps, and a variant's overrides after them."""
    overrides = row.get("overrides") or []
    return f"{row['steps']:,}" + (f" ({', '.join(f'`{o}`' for o in overrides)})" if overrides else "")


def page_lines(record: dict) -> list[str]:
    rows = record["rows"]
    types = list(rows[0]["scores"]["finding"]["per_type"])
    lines = [
        "# Report generation against the text LDM's training length",
        "",
        f"Made by `{record['command']}` ({record['machine']}, {record['threads']} torch "
        f"thread{'s' if record['threads'] != 1 else ''} per job; "
        f"{record['seconds'] / 60:.0f} min for what it trained and scored). Raw numbers: `text-ldm-steps.json`.",
        "",
        f"X-ray -> report on the {rows[0]['n']} held-out chest patients of the phantom test split, with the benchmark's "
        "protocol (`medm2g evaluate --tasks report_generation`, its default guidance). Every row has the same tokenizer, "
        f"text VAE, prompt encoders and image denoisers (`{record['root']}`); only the text denoiser's training length "
        "differs (tiny.yaml's text recipe: batch 128, lr 1e-3, plain MSE, EMA 0.995), and for a row that names config "
        "overrides, those.",
        "",
        "| text LDM steps | training s | BLEU-1 | BLEU-4 | ROUGE-L | finding F1 (micro) | finding F1 (macro) | exact findings |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s, f = row["scores"], row["scores"]["finding"]
        seconds = "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f}"
        lines.append(f"| {row_name(row)} | {seconds} | {s['bleu_1']:.3f} | {s['bleu_4']:.3f} | {s['rouge_l']:.3f} | "
                     f"{f['micro_f1']:.3f} | {f['macro_f1']:.3f} | {f['exact_match']:.3f} |")
    lines += ["", "Per finding type (F1):", ""]
    lines += per_type_f1_table(["text LDM steps"], [([row_name(row)], row["scores"]["finding"]["per_type"]) for row in rows], types)
    lines += ["", "Training seconds: the wall time of `train_ldm.py`, latent encoding included."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="stage 0-2 outputs: tokenizer, vae, text_vae, prompt_encoders, unet_<family>")
    parser.add_argument("--steps", type=int, nargs="+", default=[1500, 6000, 12000])
    parser.add_argument("--config", default="training/configs/tiny.yaml")
    parser.add_argument("--dataset", type=Path, default=Path("runs/tiny/phantoms"))
    parser.add_argument("--out", type=Path, default=Path("runs/text_ldm_steps"))
    add_page_arguments(parser, ROOT / "docs" / "results" / "text-ldm-steps.md")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                        help="also train with these config overrides (repeatable)")
    parser.add_argument("--variant_steps", type=int, nargs="+", default=None, help="step counts of the variants (default: --steps)")
    args = parser.parse_args()
    if rewrote_page_only(args, page_lines):
        return
    for name in STAGE_01:
        if not (args.root / name).is_dir():
            raise FileNotFoundError(f"--root {args.root} has no {name}/: train stages 0-1 into it first")
    if any(steps <= 0 for steps in args.steps + (args.variant_steps or [])):
        raise ValueError(f"--steps and --variant_steps must be positive; got {args.steps} and {args.variant_steps}")
    start = time.perf_counter()
    variants = [parse_variant(text) for text in args.variant]
    rows = [measure(args.root, args.out / str(steps), steps, args) for steps in sorted(set(args.steps))]
    rows += [measure(args.root, args.out / f"{label}-{steps}", steps, args, tuple(overrides))
             for label, overrides in variants for steps in sorted(set(args.variant_steps or args.steps))]
    record = {"command": "python scripts/measure_text_ldm_steps.py " + " ".join(sys.argv[1:]), "root": str(args.root),
              "machine": platform.machine(), "threads": args.threads, "seconds": time.perf_counter() - start, "rows": rows}
    write_record(args.page, record, page_lines)
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
