"""Writes docs/results/real-lora-variants.md from the runs of scripts/real_data/lora_variants.sh.

Each fine-tune of the base (the default LoRA adapter, rank 64, DoRA, the full fine-tune) is compared with the plain
conditional LDM trained from random weights on the same budget, paired on the same held-out images. Hand-written
notes below the marker are kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medm2g_diffusers.evaluation.benchmark_tables import evaluate_command, markdown_tables, paired_difference, paired_reading, write_page_keeping_notes

RUNS = {  # evaluate folder -> (task, title)
    "harvard_validation": ("harvard_mri_to_ct", "MRI (T2) -> CT, Harvard validation series (16)"),
    "harvard_test": ("harvard_mri_to_ct", "MRI (T2) -> CT, Harvard test series (32)"),
    "brats_validation": ("brats_t1_t2_to_flair", "T1 + T2 -> FLAIR, BraTS / TCGA validation subject (TCGA-DU-7294)"),
}
BASELINE = "plain_ldm"
VARIANTS = {  # name in the evaluate run -> (training folder under --root, label)
    "lora": ("{task}/lora_training", "LoRA rank 32, every Linear/Conv2d (the default of training/configs/lora.yaml)"),
    "lora_r64": ("variants/lora_r64/{task}/lora_training", "LoRA rank 64 (`--set finetune.lora.rank=64 --set finetune.lora.alpha=64`)"),
    "lora_dora": ("variants/lora_dora/{task}/lora_training", "DoRA rank 32 (`--set finetune.lora.use_dora=true`)"),
    "full": ("variants/full/{task}/full_training", "full fine-tune of medm2g-tiny (`--full`, lr 2e-4)"),
    "full_lr5e-4": ("variants/full_lr5e-4/{task}/full_training", "full fine-tune at the plain LDM's rate (`--full --set finetune.learning_rate=5e-4`)"),
    "plain_ldm": ("{task}/scratch_training", "plain conditional LDM: random init, trained in full (`--init scratch`)"),
}


def versus_baseline(results: dict) -> list[str]:
    """Every fine-tune minus the plain LDM, paired per image: mean ± standard error and the reading at 2 SE."""
    lines = []
    for task, entry in results.get("image_to_image", {}).items():
        if BASELINE not in entry:
            continue
        lines += [f"Paired on the same {entry['n']} images ({task}): each fine-tune of medm2g-tiny minus the plain LDM.", "",
                  "| fine-tune minus plain_ldm | PSNR dB | SSIM | reading (PSNR / SSIM) |", "| --- | --- | --- | --- |"]
        for name in VARIANTS:
            if name == BASELINE or name not in entry:
                continue
            cells, readings = [], []
            for metric in ("psnr", "ssim"):
                mean, se = paired_difference(entry[name][metric], entry[BASELINE][metric])
                cells.append(f"{mean:+.2f} ± {se:.2f}" if metric == "psnr" else f"{mean:+.3f} ± {se:.3f}")
                readings.append(paired_reading(mean, se, name))
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {' / '.join(readings)} |")
        lines.append("")
    return lines


def budget_table(root: Path, task: str) -> list[str]:
    rows = []
    for name, (folder, label) in VARIANTS.items():
        path = root / folder.format(task=task) / "budget.json"
        if not path.is_file():
            continue
        b = json.loads(path.read_text())
        rows.append(f"| {name} | {label} | {b['steps']} x {b['train_batch_size']} | {b['learning_rate']:g} | "
                    f"{b['trainable_parameters']:,} | {b['train_seconds'] / 60:.1f} |")
    return ["| name | model | steps x batch | learning rate | trainable parameters | training minutes (1 thread) |",
            "| --- | --- | --- | --- | --- | --- |", *rows, ""] if rows else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/real", help="what scripts/real_data/lora_variants.sh wrote")
    parser.add_argument("--out", default="docs/results/real-lora-variants.md")
    args = parser.parse_args()
    root, out = Path(args.root), Path(args.out)
    lines = ["# Real data: adapter capacity against the phantom prior", "",
             "Made by `scripts/real_data/write_lora_variants_page.py` from the runs of `bash scripts/real_data/lora_variants.sh`. "
             "Every model trains the same steps x batch on the same training patients as in [real-data.md](real-data.md) "
             "(`training/configs/lora.yaml`, 8 augmented copies per row); only what trains differs. Scores: 50 DDIM steps, "
             "guidance 2.0, one seeded sample per image, on held-out patients.", ""]
    seen_tasks = []
    for folder, (task, title) in RUNS.items():
        path = root / "evaluate" / "variants" / folder / "benchmark.json"
        if not path.is_file():
            lines += [f"## {title}", "", f"Not run yet (`{path}` is missing).", ""]
            continue
        results = json.loads(path.read_text())
        lines += [f"## {title}", "", f"```bash\n{evaluate_command(results)}\n```", "", markdown_tables(results), *versus_baseline(results)]
        if task not in seen_tasks:
            seen_tasks.append(task)
    for task in seen_tasks:
        lines += [f"## Training budgets: {task} (`budget.json` of each run)", "", *budget_table(root, task)]
    write_page_keeping_notes(out, lines)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
