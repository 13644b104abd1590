#!/usr/bin/env python
"""X-ray -> report with and without the cross-guided route (``multiflow.report_sources``): does reading the X-ray's
clean latent through θ_c, as ``V_xray(z_0, t=0)``, add to its prompt-encoder tokens?

    python scripts/measure_report_sources.py --root runs/new12k --steps 1000 --threads 1

Rows, all on the stage 0-2 outputs of ``--root`` (linked, not copied):

* ``tokens only``: the stage-2 text LDM as it is (``scripts/export_single_flow_pipeline.py``), the path of a model
  without report sources;
* ``θ_c route``: one stage-3 translation round ``xray -> text`` (``training/train_multiflow.py`` with
  ``multiflow.report_sources=[xray]``) training V_xray and the text denoiser's θ_c for ``--steps``;
* ``θ_c route + denoiser``: the same round with ``train_denoiser: true``, the whole text denoiser too.

Each is scored with the benchmark's protocol (``medm2g_diffusers.evaluation.benchmark``: same rows, seeds, 50 DDIM
steps and the pipeline's default guidance) on the phantom validation and test splits: X-ray -> report, and CT ->
report and MRI (T2) -> report on 100 held-out patients each, since a text denoiser fine-tuned on X-ray rows serves
those too. Writes docs/results/report-sources.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from medm2g_diffusers.evaluation import benchmark
from medm2g_diffusers.evaluation.measure_scripts import (
    add_page_arguments,
    made_by_line,
    report_split,
    rewrote_page_only,
    run_logged,
    score_reports,
    write_record,
)
from medm2g_diffusers.evaluation.finding_labeller import finding_f1, finding_types
from medm2g_diffusers.pipelines import MedM2GPipeline
from medm2g_diffusers.training_utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("tokenizer", "vae", "text_vae", "prompt_encoders", "unet_text", "unet_xray")
VARIANTS = {"tokens only": None, "θ_c route": False, "θ_c route + denoiser": True}  # name -> train_denoiser
OTHER_SOURCES = ("ct", "mri_t2")  # image -> report directions the text denoiser also serves
SPLITS = ("validation", "test")


def build(root: Path, folder: Path, train_denoiser: bool | None, args) -> tuple[Path, float | None]:
    """The variant's pipeline folder (trained unless already there) and its training seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in NEEDED:
        if not (folder / name).exists():
            (folder / name).symlink_to((root / name).resolve(), target_is_directory=True)
    times_path = folder / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if train_denoiser is None:
        pipeline = folder / "pipeline_single_flow"
        if not pipeline.is_dir():
            run_logged([sys.executable, "scripts/export_single_flow_pipeline.py", "--root", str(folder), "--out", str(pipeline)],
                folder / "export.log", args.threads, ROOT)
        return pipeline, None
    pipeline = folder / "pipeline"
    if not pipeline.is_dir():
        rounds = (f"[{{name: xray_to_text, kind: translation, target: text, sources: [xray], steps: {args.steps}, "
                  f"train_denoiser: {str(train_denoiser).lower()}}}]")
        times["train_seconds"] = run_logged(
            [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(args.threads),
             "training/train_multiflow.py", "--config", args.config, "--dataset", str(args.dataset),
             "--set", f"output_root={folder}", "--set", "multiflow.families=[text, xray]", "--set", "multiflow.source_slots={}",
             "--set", "multiflow.report_sources=[xray]", "--set", f"multiflow.rounds={rounds}"],
            folder / "train.log", args.threads, ROOT)
        atomic_write_text(times_path, json.dumps(times, indent=2))
    return pipeline, times.get("train_seconds")


def score(pipeline: Path, split: str) -> dict:
    pipe = MedM2GPipeline.from_pretrained(str(pipeline))
    pipe.set_progress_bar_config(disable=True)
    cfg, held_out = report_split(pipe, None, split)
    # One sampled report per X-ray, as when the page was measured (report candidates came later: report-candidates.md).
    report = score_reports(pipe, held_out, dataclasses.replace(cfg, report_candidates=1), split)
    scores = {"xray": {"n": report["n"], "bleu_4": report["bleu_4"], "finding": report["finding"]}}
    for key in OTHER_SOURCES:
        rows = benchmark.rows_with(held_out, [key, "report"], 100)
        text = benchmark.generate(pipe, cfg, ["text"], list(range(rows.num_rows)), conditions={key: benchmark.native(rows, key)})["text"]
        scores[key] = {"n": rows.num_rows, "finding": finding_f1(text, [finding_types(f) for f in rows["findings"]])}
    return scores


def page_lines(record: dict) -> list[str]:
    lines = [
        "# X-ray -> report through θ_c: report sources",
        "",
        made_by_line(record, "report-sources.json"),
        "",
        f"Every row has the stage 0-2 outputs of `{record['root']}`. *tokens only*: its text LDM, conditioned on the "
        "X-ray's prompt-encoder tokens (the path of a model without report sources). *θ_c route*: a stage-3 round "
        f"`xray -> text` of {record['steps']:,} steps adds `V_xray(z_0, t=0)` through the text denoiser's θ_c, training "
        "V_xray and θ_c; *+ denoiser* trains the whole text denoiser in that round. Finding F1: micro F1 of the "
        "rule-based labeller against the ground-truth findings, with the benchmark's rows, seeds and default guidance. "
        "CT and MRI (T2) -> report use the tokens only in every row (only X-ray is a report source); they show what "
        "fine-tuning the text denoiser on X-ray rows costs the other directions.",
        "",
        "| variant | training s | split | X-ray -> report F1 | exact findings | BLEU-4 | CT -> report F1 | MRI (T2) -> report F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        seconds = "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f}"
        for split in SPLITS:
            s = row["scores"][split]
            lines.append(f"| {row['variant']} | {seconds} | {split} | {s['xray']['finding']['micro_f1']:.3f} | "
                         f"{s['xray']['finding']['exact_match']:.3f} | {s['xray']['bleu_4']:.3f} | "
                         f"{s['ct']['finding']['micro_f1']:.3f} | {s['mri_t2']['finding']['micro_f1']:.3f} |")
    first = record["rows"][0]["scores"]["test"]
    lines += ["", f"n per split: X-ray {first['xray']['n']}, CT {first['ct']['n']}, MRI {first['mri_t2']['n']} patients."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="stage 0-2 outputs: " + ", ".join(NEEDED))
    parser.add_argument("--steps", type=int, default=1000, help="steps of the xray -> text round")
    parser.add_argument("--config", default="training/configs/tiny.yaml")
    parser.add_argument("--dataset", type=Path, default=Path("runs/tiny/phantoms"), help="the training data of the round")
    parser.add_argument("--out", type=Path, default=Path("runs/report_sources"))
    add_page_arguments(parser, ROOT / "docs" / "results" / "report-sources.md")
    args = parser.parse_args()
    if rewrote_page_only(args, page_lines):
        return
    missing = [name for name in NEEDED if not (args.root / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"--root {args.root} has no {missing}: train stages 0-2 into it first")
    if args.steps < 1:
        raise ValueError(f"--steps must be positive; got {args.steps}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = []
    for index, (variant, train_denoiser) in enumerate(VARIANTS.items()):
        pipeline, seconds = build(args.root, args.out / f"variant{index}", train_denoiser, args)
        rows.append({"variant": variant, "pipeline": str(pipeline), "train_seconds": seconds,
                     "scores": {split: score(pipeline, split) for split in SPLITS}})
        print(f"{variant}: test X-ray -> report F1 {rows[-1]['scores']['test']['xray']['finding']['micro_f1']:.3f}", flush=True)
    record = {"command": "python scripts/measure_report_sources.py " + " ".join(sys.argv[1:]), "root": str(args.root),
              "steps": args.steps, "machine": platform.machine(), "threads": args.threads,
              "seconds": time.perf_counter() - start, "rows": rows}
    write_record(args.page, record, page_lines)
    print(f"wrote {args.page}")


if __name__ == "__main__":
    main()
