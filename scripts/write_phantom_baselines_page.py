"""Writes docs/results/phantom-baselines.md from the runs of training/recipes/phantom_baselines.sh (tables by code).

    bash training/recipes/phantom_baselines.sh && bash training/recipes/phantom_baselines.sh evaluate
    bash training/recipes/phantom_baselines.sh finetune && bash training/recipes/phantom_baselines.sh evaluate  # optional
    python scripts/write_phantom_baselines_page.py

Per image -> image task of the phantom benchmark: the `medm2g evaluate` table of medm2g-tiny beside its
same-budget plain conditional LDM (``<root>/evaluate/<task>/benchmark.json``), the paired difference on the same
held-out patients (and, where it was trained, medm2g-tiny fine-tuned on the task for the same budget against
the baseline), the ceiling medm2g-tiny's image VAE puts on both (its reconstruction of the same targets under
the same display protocol), and the training budgets. Everything above the notes marker is regenerated; the
hand-written reading below it is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.data.preview import display_range
from medm2g_diffusers.evaluation.benchmark import BenchmarkConfig, display, load_splits, native, rows_with
from medm2g_diffusers.evaluation.benchmark_tables import evaluate_command, markdown_tables, paired_table, write_page_keeping_notes
from medm2g_diffusers.evaluation.image_metrics import psnr_ssim
from medm2g_diffusers.modalities import from_model_range, get_modality, to_model_range

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training" / "configs" / "phantom_baselines.yaml"
TINY_CONFIG = ROOT / "training" / "configs" / "tiny.yaml"
FINETUNED = "finetuned"  # phantom_baselines.sh evaluate's name for the task fine-tune (finetuned_lr<rate>: a variant)


def model_budget(family: str) -> str:
    """The samples medm2g-tiny's denoiser of ``family`` saw, read from its recipe's config: stage 2 + its
    translation round."""
    tiny = yaml.safe_load(TINY_CONFIG.read_text())
    ldm = {**tiny["ldm"], **(tiny["ldm"].get("families") or {}).get(family, {})}
    rounds = [r for r in tiny["multiflow"]["rounds"] if r["kind"] == "translation" and r["target"] == family]
    return " + ".join([f"{ldm['max_train_steps']} x {ldm['train_batch_size']} (stage 2)",
                       *(f"{r['steps']} x {tiny['multiflow']['train_batch_size']} (round {r['name']})" for r in rounds)])


@torch.no_grad()
def vae_ceiling(pipe: MedM2GPipeline, results: dict) -> list[str]:
    """medm2g-tiny's image VAE reconstructing the scored targets (posterior mode), scored like the samples."""
    cfg = BenchmarkConfig(**{k: v for k, v in results["config"].items() if k in BenchmarkConfig.__dataclass_fields__})
    _, held_out = load_splits(None, cfg, pipe.image_size, results.get("split", "test"))
    lines = []
    for task, entry in results["image_to_image"].items():
        target = entry["target"]
        rows = rows_with(held_out, [*entry["sources"], target], cfg.n_translation)
        x = to_model_range(torch.from_numpy(native(rows, target)), target).unsqueeze(1)
        recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)[:, 0].numpy()
        decoded = np.stack([display_range(from_model_range(r, target), target) for r in recon])
        m = psnr_ssim(decoded, display(rows, target))
        lines.append(f"The image VAE of medm2g-tiny (shared by both latent models) reconstructs these {m['n']} {target} targets at "
                     f"{m['psnr_mean']:.2f} dB / {m['ssim_mean']:.3f} under the same protocol: the ceiling of either model on {task}.")
    return lines + [""]


def budget_lines(root: Path, task: str, family: str) -> list[str]:
    """The budget of every model trained for ``task``: the plain LDM, the task fine-tune, its FINETUNE_LR variants."""
    runs = [("plain_ldm", root / task / "scratch_training", "this task only"),
            (FINETUNED, root / task / "full_training", "on this task, after all of medm2g-tiny's training")]
    runs += [(f"{FINETUNED}_{v.name}", v / task / "full_training", "on this task, after all of medm2g-tiny's training")
             for v in sorted((root / "variants").glob("lr*"))]
    rows = []
    for name, folder, what in runs:
        if not (folder / "budget.json").is_file():
            continue
        b = json.loads((folder / "budget.json").read_text())
        minutes = "–" if b.get("train_seconds") is None else f"{b['train_seconds'] / 60:.1f}"
        rows.append(f"| {name} | {b['steps']} x {b['train_batch_size']}, {what} (lr {b['learning_rate']:g}) | "
                    f"{b['trainable_parameters']:,} | {minutes} ({b['torch_threads']} thread) |")
    if not rows:
        return []
    return ["| model | steps x batch of the target's denoiser | trainable parameters | training minutes |", "| --- | --- | --- | --- |",
            f"| medm2g-tiny | {model_budget(family)}, shared with text -> image and every source | – | see stages.md, multiflow.md |",
            *rows, ""]


def finetune_lines(results: dict) -> list[str]:
    """Each task fine-tune of medm2g-tiny against the plain LDM: the same task budget, with and without the prior."""
    lines = []
    for name in (b for b in results["baselines"] if b.startswith(FINETUNED)):
        lines += [f"`{name}` (medm2g-tiny's target denoiser trained in full on this task for the plain LDM's steps x "
                  "batch) against the plain LDM: the same samples of this task with and without medm2g-tiny's prior.", "",
                  *paired_table(results, name, name, against=["plain_ldm"])]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--out", default="docs/results/phantom-baselines.md")
    parser.add_argument("--tasks", nargs="+", help="only these tasks of the config, in its order (default: all)")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    unknown = sorted(set(args.tasks or []) - set(config["tasks"]))
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; expected tasks of {args.config}: {list(config['tasks'])}")
    tasks = {task: spec for task, spec in config["tasks"].items() if not args.tasks or task in args.tasks}
    command = " ".join(["python scripts/write_phantom_baselines_page.py", *(["--tasks", *tasks] if args.tasks else []),
                        *(["--out", args.out] if args.out != parser.get_default("out") else [])])
    named = "".join(f" {task}" for task in tasks) if args.tasks else ""
    root, out = Path(config["output_root"]), Path(args.out)
    torch.set_num_threads(2)
    pipe = MedM2GPipeline.from_pretrained(config["base_model"])
    lines = ["# Image -> image on the phantoms: medm2g-tiny against same-budget plain conditional LDMs", "",
             f"Made by `{command}` from the runs of `bash training/recipes/phantom_baselines.sh{named}`, then `... "
             f"evaluate{named}`. The baseline of each task (`training/finetune_lora.py "
             "--init scratch`, `training/configs/phantom_baselines.yaml`) is the target family's denoiser of medm2g-tiny, "
             "with the same source slots, from random weights, trained in full on that one task with medm2g-tiny's frozen "
             "VAE and prompt encoders, for as many samples as medm2g-tiny's denoiser of that family saw in all. Where "
             f"`... finetune{named}` has run, `finetuned` is medm2g-tiny's target denoiser fine-tuned in full on the task "
             "(`--full`, stage 3's denoiser rate) for the baseline's steps x batch; `finetuned_lr<rate>` is the same at "
             f"another rate (`FINETUNE_LR=<rate> ... finetune{named}`). Scores: the phantom benchmark's held-out test "
             "patients, 50 DDIM steps, guidance 2.0, one seeded sample per patient.", ""]
    for task, spec in tasks.items():
        path = root / "evaluate" / task / "benchmark.json"
        title = f"## {task}: {' + '.join(spec['sources'])} -> {spec['target']}"
        if not path.is_file():
            lines += [title, "", f"Not run yet (`{path}` is missing).", ""]
            continue
        results = json.loads(path.read_text())
        family = get_modality(spec["target"]).family
        lines += [title, "", f"```bash\n{evaluate_command(results)}\n```", "", markdown_tables(results),
                  *paired_table(results, against=[b for b in results["baselines"] if not b.startswith(FINETUNED)]), *finetune_lines(results),
                  *vae_ceiling(pipe, results), *budget_lines(root, task, family)]
    write_page_keeping_notes(out, lines)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
