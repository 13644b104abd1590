#!/usr/bin/env python
"""Measures the trained multi-flow pipeline on the held-out phantom test split; writes docs/results/multiflow.md.

    python scripts/measure_multiflow.py --model runs/tiny/pipeline --dataset runs/tiny/phantoms

* joint text -> {X-ray, CT, MRI}: a montage of real phantoms and, from the same report, the targets
  generated jointly (every target attending to the others through θ_c) and, beside them, generated with the
  coupling off (``cross_guidance_scale=0``);
* image -> image on the first ``--n`` test patients: MRI -> CT, CT -> X-ray and the MRI syntheses, PSNR/SSIM in
  the display range [0, 1] (CT through the [-1000, 1000] HU window, MRI percentile-scaled per image, X-ray as
  is; ``data_range=1``), beside the copy-the-source baseline (the source image itself as the prediction);
* image -> report samples next to the real reports;
* the wall time of one generation per task (batch 1, DDIM ``--steps``), and the training rounds' validation
  losses with vs. without the partner / sources (from ``<training dir>/validation.json`` when given).

Everything is seeded; rerunning gives the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.data.io import write_png
from medm2g_diffusers.data.preview import display_range, montage
from medm2g_diffusers.evaluation.benchmark import TRANSLATIONS
from medm2g_diffusers.evaluation.benchmark_tables import write_page_keeping_notes
from medm2g_diffusers.training_utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
JOINT_CASES = [("chest", "pleural_effusion", "left"), ("chest", "pleural_effusion", "right"), ("chest", "cardiomegaly", None),
               ("chest", None, None), ("head", "tumour", None), ("head", "haemorrhage", None), ("head", None, None)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/tiny/pipeline", help="a MedM2GPipeline folder")
    parser.add_argument("--dataset", default="runs/tiny/phantoms")
    parser.add_argument("--training_dir", default="runs/tiny/multiflow_training", help="train_multiflow's output_dir (validation.json)")
    parser.add_argument("--n", type=int, default=48, help="test patients per image -> image task")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_text_tokens", type=int, default=160, help="longest report accepted (the LDMs trained on 160)")
    parser.add_argument("--note", default="", help="a paragraph on how the model was trained, put under the title")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=PIPELINE_DIR",
                        help="another pipeline (e.g. the attention-only image conditioning) scored on --compare_tasks beside --model")
    parser.add_argument("--compare_tasks", nargs="+", default=["MRI (T1) -> CT", "MRI (T1+T2+FLAIR) -> CT"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "multiflow.md"))
    args = parser.parse_args()
    unknown = sorted(set(args.compare_tasks) - {name for name, _, _ in TRANSLATIONS})
    if unknown:
        parser.error(f"--compare_tasks: unknown {unknown}; expected names from {[name for name, _, _ in TRANSLATIONS]}")
    return args


def pick_cases(split) -> list[int]:
    chosen = []
    for anatomy, kind, side in JOINT_CASES:
        for index, (a, findings) in enumerate(zip(split["anatomy"], split["findings"])):
            found = json.loads(findings)
            types = {f["type"] for f in found} - {"midline_shift"}
            ok = a == anatomy and (kind is None and not found or kind is not None and types == {kind}
                                   and (side is None or found[0].get("side") == side))
            if ok and index not in chosen:
                chosen.append(index)
                break
    return chosen


def joint_montage(pipe, split, args, path: Path) -> list[dict]:
    rows, tiles, labels, cases = [split[i] for i in pick_cases(split)], [], [], []
    columns = ["xray", "ct", "mri_t1", "mri_flair"]
    for i, row in enumerate(rows):
        targets = ["xray", "ct", "mri_t1"] if row["anatomy"] == "chest" else ["ct", "mri_t1", "mri_flair"]
        generated = {}
        for label, scale in (("joint", 1.0), ("uncoupled", 0.0)):
            out = pipe(row["report"], targets=targets, num_inference_steps=args.steps, guidance_scale=args.guidance,
                       generator=torch.Generator().manual_seed(args.seed), output_type="np", ct_in_hu=True, cross_guidance_scale=scale,
                       max_text_tokens=args.max_text_tokens)
            generated[label] = {key: out.images[key][0] for key in targets}
        tiles += [{key: np.asarray(row[key], np.float32) if row[key] is not None else None for key in columns},
                  generated["joint"], generated["uncoupled"]]
        labels += [f"{i} real", f"{i} joint", f"{i} uncoupled"]
        cases.append({"report": row["report"], "targets": targets})
    image = montage(tiles, modalities=columns, tile=96, labels=labels)
    write_png(path, np.asarray(image, np.float32) / 255.0, provenance={
        "model": f"MedM2GPipeline {args.model}", "layout": "per case: real phantom / joint generation / generation with the coupling off"})
    return cases


def translation_metrics(pipe, split, args, tasks: list[str] | None = None) -> dict:
    results = {}
    for name, sources, target in TRANSLATIONS:
        if tasks is not None and name not in tasks:
            continue
        if any(key not in pipe.accepted_conditions(target) for key in sources):
            print(f"{name}: this checkpoint cannot condition {target} on {sources}; skipped")
            continue
        keys = sources + [target]
        present = np.ones(split.num_rows, dtype=bool)
        for key in keys:
            present &= ~np.asarray(split.data.column(key).is_null().to_numpy(zero_copy_only=False))
        rows = split.select(np.flatnonzero(present)[: args.n].tolist()).with_format("numpy")
        conditions = {key: torch.from_numpy(np.asarray(rows[key], np.float32)).unsqueeze(1) for key in sources}
        started = time.perf_counter()
        out = pipe(conditions=conditions, targets=[target], num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=torch.Generator().manual_seed(args.seed), output_type="np", ct_in_hu=True)
        seconds = time.perf_counter() - started
        real = np.stack([display_range(image, target) for image in np.asarray(rows[target], np.float32)])
        fake = np.stack([display_range(image, target) for image in out.images[target]])
        copy = np.stack([display_range(image, sources[0]) for image in np.asarray(rows[sources[0]], np.float32)])
        entry = {"n": len(real), "seconds": seconds, "sources": sources, "target": target}
        for label, prediction in (("model", fake), ("copy_source", copy)):
            p, r = torch.from_numpy(np.clip(prediction, 0, 1))[:, None], torch.from_numpy(np.clip(real, 0, 1))[:, None]
            entry[label] = {
                "psnr": peak_signal_noise_ratio(p, r, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean().item(),
                "ssim": structural_similarity_index_measure(p, r, data_range=1.0).item(),
            }
        results[name] = entry
        print(name, entry)
    return results


def report_samples(pipe, split, args) -> list[dict]:
    out = []
    for index in range(6):
        row = split[index]
        key = "xray" if row["xray"] is not None else "ct"
        text = pipe(conditions={key: np.asarray(row[key], np.float32)}, targets=["text"], num_inference_steps=args.steps,
                    guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed)).text[0]
        out.append({"source": key, "real": row["report"], "generated": text})
    return out


def task_timings(pipe, split, args) -> dict:
    chest = next(split[i] for i in range(split.num_rows) if split[i]["anatomy"] == "chest")
    image = lambda key: np.asarray(chest[key], np.float32)  # noqa: E731
    tasks = {
        "text -> xray": dict(prompt=chest["report"], targets=["xray"]),
        "text -> {xray, ct, mri_t1} (joint)": dict(prompt=chest["report"], targets=["xray", "ct", "mri_t1"]),
        "xray -> report": dict(conditions={"xray": image("xray")}, targets=["text"]),
        "mri_t1 -> ct": dict(conditions={"mri_t1": image("mri_t1")}, targets=["ct"]),
        "ct -> xray": dict(conditions={"ct": image("ct")}, targets=["xray"]),
        "t2 + pd -> t1": dict(conditions={"mri_t2": image("mri_t2"), "mri_pd": image("mri_pd")}, targets=["mri_t1"]),
    }
    timings = {}
    for name, kwargs in tasks.items():
        started = time.perf_counter()
        pipe(**kwargs, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=torch.Generator().manual_seed(args.seed),
             **({"max_text_tokens": args.max_text_tokens} if "prompt" in kwargs else {}))
        timings[name] = time.perf_counter() - started
    return timings


def main():
    args = parse_args()
    started = time.perf_counter()
    pipe = MedM2GPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    split = load_medm2g_dataset(args.dataset)["test"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    montage_path = out.with_name(f"{out.stem}_joint.png")
    results = {
        "joint_cases": joint_montage(pipe, split, args, montage_path),
        "translation": translation_metrics(pipe, split, args),
        "reports": report_samples(pipe, split, args),
        "timings": task_timings(pipe, split, args),
    }
    results["compare"] = {}
    for item in args.compare:
        name, path = item.split("=", 1)
        other = MedM2GPipeline.from_pretrained(path)
        other.set_progress_bar_config(disable=True)
        results["compare"][name] = {"model": path, "translation": translation_metrics(other, split, args, args.compare_tasks)}
    validation = Path(args.training_dir) / "validation.json"
    results["rounds"] = json.loads(validation.read_text()) if validation.is_file() else {}
    results["seconds"] = time.perf_counter() - started
    results["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads"
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    write_page_keeping_notes(out, render(results, args, montage_path.name).splitlines())
    print(out.read_text())


def render(results: dict, args, montage_name: str) -> str:
    lines = [
        "# Multi-flow model and pipeline on the phantom test split", "",
        f"Made by `python scripts/measure_multiflow.py --model {args.model} --dataset {args.dataset} --training_dir {args.training_dir}"
        f"{''.join(' --compare ' + c for c in args.compare)}"
        f"{' --compare_tasks ' + ' '.join(repr(t) for t in args.compare_tasks) if args.compare else ''}` "
        f"({results['machine']}; {results['seconds']:.0f} s). Raw numbers: `{Path(args.out).with_suffix('.json').name}`.", "",
        *([args.note, ""] if args.note else []),
        "## Joint text -> {X-ray, CT, MRI}", "",
        f"![joint generation]({montage_name})", "",
        "Per case three rows: the real phantom; the targets generated jointly from its report (each attending to the "
        "others' context tokens through θ_c); the same targets and seed with the coupling off (`cross_guidance_scale=0`). "
        f"DDIM {args.steps}, guidance {args.guidance}, seed {args.seed}. Reports:", "",
    ]
    lines += [f"{i}. {case['report']}" for i, case in enumerate(results["joint_cases"])]
    lines += ["", f"## Image -> image (first {args.n} test patients with every modality of the task)", "",
              "PSNR (dB, per image, averaged) and SSIM in the display range [0, 1], `data_range=1`: CT through the "
              "[-1000, 1000] HU window, MRI percentile-scaled (0.5-99.5) per image, X-ray as is. Baseline: copy the "
              "(first) source image.", "",
              "| task | n | PSNR | SSIM | copy-source PSNR | copy-source SSIM | seconds (whole batch) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["translation"].items():
        lines.append(f"| {name} | {r['n']} | {r['model']['psnr']:.2f} | {r['model']['ssim']:.3f} | "
                     f"{r['copy_source']['psnr']:.2f} | {r['copy_source']['ssim']:.3f} | {r['seconds']:.1f} |")
    if results["compare"]:
        lines += ["", "### Beside other pipelines", "",
                  f"`{args.model}` beside the pipelines below (`--compare`), on the same tasks, patients and seed.", "",
                  "| model | task | PSNR | SSIM |", "| --- | --- | --- | --- |"]
        for name in args.compare_tasks:
            if name in results["translation"]:
                r = results["translation"][name]["model"]
                lines.append(f"| {args.model} | {name} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
        for label, entry in results["compare"].items():
            for name, r in entry["translation"].items():
                lines.append(f"| {label} ({entry['model']}) | {name} | {r['model']['psnr']:.2f} | {r['model']['ssim']:.3f} |")
    lines += ["", "## Image -> report", ""]
    for s in results["reports"]:
        lines += [f"- from {s['source']}: **real** {s['real']}", f"  **generated** {s['generated']}"]
    lines += ["", f"## Time of one generation per task (batch 1, DDIM {args.steps}, guidance {args.guidance})", "",
              "| task | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in results["timings"].items()]
    if results["rounds"]:
        lines += ["", "## Training rounds", "",
                  "Validation loss at t = 100, 500, 900 (mean) with the partner (joint rounds: θ_c on) or the sources "
                  "(translation rounds) vs. without them; lower with = the round learned to use them.", "",
                  "| round | steps to | seconds | loss with | loss without |", "| --- | --- | --- | --- | --- |"]
        for name, r in results["rounds"].items():
            loss = r["loss"]
            lines.append(f"| {name} | {r['step']} | {r['seconds']:.0f} | {loss['with']['mean']:.4f} | {loss['without']['mean']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
