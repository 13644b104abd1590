#!/usr/bin/env python
"""Measures stage-2 training recipes side by side: how well text -> image samples follow their report.

Every variant trains one single-flow LDM (``training/train_ldm.py``) on the same frozen stage-0/1 components
(by default those of the bundled medm2g-tiny), the same data, batch, step count and seed as the tiny config;
only the ``--set`` overrides of its name in ``VARIANTS`` differ. Each is then sampled from held-out test
reports (DDIM 50, every guidance scale asked for, each row seeded as the benchmark seeds it) and scored by the
benchmark's finding classifier for that modality, trained on real phantoms only (exact-set accuracy, macro F1
and F1 per finding type, beside the classifier's own score on the real test images).

    python scripts/measure_ldm_recipe.py --family xray --variants baseline lr2e-3 --jobs 2

Variants train in ``--jobs`` parallel processes of one torch thread each (a trained one is reused). Writes
``docs/results/ldm-recipe.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.evaluation.benchmark import (
    BenchmarkConfig,
    classifier_types,
    display,
    generate,
    load_splits,
    rows_with,
    train_classifiers,
)
from medm2g_diffusers.evaluation.benchmark_tables import write_page_keeping_notes
from medm2g_diffusers.evaluation.finding_classifier import classifier_metrics, finding_labels
from medm2g_diffusers.modalities import modalities_of_family
from medm2g_diffusers.training_utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("tokenizer", "vae", "text_vae", "prompt_encoders")
# name -> train_ldm.py --set overrides (on top of --config)
VARIANTS = {
    "baseline": ["ldm.learning_rate=5.0e-4", "ldm.snr_gamma=null"],  # the recipe before this comparison
    "min-snr-5": ["ldm.learning_rate=5.0e-4", "ldm.snr_gamma=5"],
    "pooled": ["ldm.learning_rate=5.0e-4", "ldm.snr_gamma=null", "ldm.unet.pooled_condition=true"],
    "lr2e-3": ["ldm.learning_rate=2.0e-3", "ldm.snr_gamma=null"],
    "lr2e-3+pooled": ["ldm.learning_rate=2.0e-3", "ldm.snr_gamma=null", "ldm.unet.pooled_condition=true"],
    "lr2e-3+min-snr-5": ["ldm.learning_rate=2.0e-3", "ldm.snr_gamma=5"],  # tiny.yaml now
    "lr2e-3+min-snr-5+pooled": ["ldm.learning_rate=2.0e-3", "ldm.snr_gamma=5", "ldm.unet.pooled_condition=true"],
    "lr4e-3+min-snr-5": ["ldm.learning_rate=4.0e-3", "ldm.snr_gamma=5"],
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="training/configs/tiny.yaml")
    parser.add_argument("--family", default="xray", choices=["xray", "ct", "mri"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--components", default="checkpoints/medm2g-tiny",
                        help="a pipeline folder or stage output root holding tokenizer, vae, text_vae and prompt_encoders")
    parser.add_argument("--dataset", default="runs/tiny/phantoms", help="the training data (medm2g phantoms --n 4000 --seed 0 --size 64)")
    parser.add_argument("--work", default="runs/ldm_recipe", help="where the variants train")
    parser.add_argument("--classifiers", default="runs/ldm_recipe/finding_classifiers", help="finding classifiers (trained once, reused)")
    parser.add_argument("--guidance", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--n", type=int, default=208, help="held-out reports per modality (208 = every chest X-ray of the test split)")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once, one torch thread each")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for scoring (1 when other jobs share the cores)")
    parser.add_argument("--out", default="docs/results/ldm-recipe.md")
    return parser.parse_args()


def prepare_root(work: Path, name: str, components: Path) -> Path:
    """``work/name`` with the frozen components linked in (stage 2 reads them from its output root)."""
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    for component in COMPONENTS:
        link = root / component
        if not link.exists():
            link.symlink_to((components / component).resolve(), target_is_directory=True)
    return root


def train(args, name: str, root: Path) -> float | None:
    """Trains one variant (skipped when its denoiser exists); returns the wall seconds of the training run."""
    if (root / f"unet_{args.family}").is_dir():
        return None
    command = [sys.executable, str(ROOT / "training" / "train_ldm.py"), "--config", args.config, "--family", args.family,
               "--dataset", args.dataset, "--set", f"output_root={root}"]
    for override in VARIANTS[name]:
        command += ["--set", override]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.perf_counter()
    with open(root / f"train_{args.family}.log", "w") as log:
        subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    atomic_write_text(root / f"train_{args.family}_seconds.txt", f"{seconds:.1f}\n")
    return seconds


def export(root: Path) -> Path:
    folder = root / "pipeline_single_flow"
    if not folder.is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "export_single_flow_pipeline.py"), "--root", str(root), "--out", str(folder)],
                       check=True, stdout=subprocess.DEVNULL)
    return folder


def main():
    args = parse_args()
    started = time.perf_counter()
    work, components = Path(args.work), Path(args.components)
    missing = [c for c in COMPONENTS if not (components / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"--components {components} lacks {missing}")
    roots = {name: prepare_root(work, name, components) for name in args.variants}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda name: train(args, name, roots[name]), args.variants))

    torch.set_num_threads(args.threads)
    target = modalities_of_family(args.family)[0] if args.family != "mri" else "mri_t2"
    cfg = BenchmarkConfig()
    train_split, test = load_splits(None, cfg, image_size=64)
    classifiers, _ = train_classifiers(train_split, test, [target], cfg, Path(args.classifiers))
    rows = rows_with(test, [target, "report"], args.n)
    types = classifier_types(target)
    labels = finding_labels(rows["findings"], types)
    real = classifier_metrics(classifiers[target].predict_probabilities(display(rows, target) * 2 - 1), labels, types)
    results = {"family": args.family, "target": target, "n": rows.num_rows, "guidance": args.guidance,
               "classifier_on_real": real, "variants": {}}
    for name in args.variants:
        seconds_file = roots[name] / f"train_{args.family}_seconds.txt"
        entry = {"overrides": VARIANTS[name], "train_seconds": float(seconds_file.read_text()) if seconds_file.is_file() else None}
        pipe = MedM2GPipeline.from_pretrained(str(export(roots[name])))
        pipe.set_progress_bar_config(disable=True)
        for guidance in args.guidance:
            cfg.guidance_scale = guidance
            fake = generate(pipe, cfg, [target], list(range(rows.num_rows)), prompts=list(rows["report"]))[target]
            entry[f"guidance_{guidance:g}"] = classifier_metrics(classifiers[target].predict_probabilities(fake * 2 - 1), labels, types)
        results["variants"][name] = entry
        print(name, {k: round(v["exact_set_accuracy"], 3) for k, v in entry.items() if k.startswith("guidance_")}, flush=True)
    results["seconds"] = time.perf_counter() - started
    write_page(args, results)


def write_page(args, results: dict) -> None:
    out = Path(args.out)
    target, guidance = results["target"], results["guidance"]
    types = list(results["classifier_on_real"]["per_type"])
    command = " ".join(["python scripts/measure_ldm_recipe.py", f"--family {args.family}", "--variants " + " ".join(args.variants),
                        f"--jobs {args.jobs}", f"--n {args.n}", "--guidance " + " ".join(f"{g:g}" for g in guidance), f"--threads {args.threads}"])
    real = results["classifier_on_real"]
    lines = [
        f"# Stage-2 recipes: does a text -> {target} sample follow its report?", "",
        f"Made by `{command}` ({platform.machine()}, CPU; {results['seconds'] / 60:.0f} min in all). Raw numbers: "
        f"`{out.with_suffix('.json').name}`.", "",
        f"Each variant is one single-flow {args.family} LDM trained by `training/train_ldm.py` with `{args.config}` and the overrides "
        f"named, on the frozen tokenizer, VAEs and prompt encoders of `{args.components}`, each on one torch thread (train (s): "
        f"the run's wall time, with other jobs sharing the 2 cores: a rough figure). Samples: {results['n']} held-out test "
        f"reports, DDIM 50, each row seeded as `medm2g evaluate` seeds "
        f"it. Findings are read by the benchmark's {target} classifier, trained on real phantoms only; on the real test images "
        f"it scores exact-set {real['exact_set_accuracy']:.3f}, macro F1 {real['macro_f1']:.3f} (the ceiling).", "",
        "| variant | overrides | train (s) | guidance | exact-set accuracy | macro F1 | " + " | ".join(types) + " |",
        "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in types) + " |",
    ]
    for name, entry in results["variants"].items():
        seconds = f"{entry['train_seconds']:.0f}" if entry["train_seconds"] else "–"
        for g in guidance:
            m = entry[f"guidance_{g:g}"]
            per = [f"{m['per_type'][t]['f1']:.2f}" if m["per_type"][t]["f1"] is not None else "–" for t in types]
            lines.append(f"| {name} | {', '.join(f'`{o}`' for o in entry['overrides']) or '(tiny.yaml)'} | {seconds} | {g:g} | "
                         f"{m['exact_set_accuracy']:.3f} | {m['macro_f1']:.3f} | " + " | ".join(per) + " |")
    per_real = [f"{real['per_type'][t]['f1']:.2f}" if real["per_type"][t]["f1"] is not None else "–" for t in types]
    lines.append(f"| real test images | | | | {real['exact_set_accuracy']:.3f} | {real['macro_f1']:.3f} | " + " | ".join(per_real) + " |")
    lines += ["", f"Exact-set accuracy: the share of samples whose classifier findings equal the report's finding types; at n = "
              f"{results['n']} its standard error is about {((0.5 * 0.5) / results['n']) ** 0.5:.3f} at most.", ""]
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    write_page_keeping_notes(out, lines)
    print(out.read_text())


if __name__ == "__main__":
    main()
