"""Writes docs/results/real-data.md from the runs of scripts/real_data/run_all.sh (tables by code, never by hand).

    python scripts/real_data/write_results_page.py --root runs/real

Reads each task's `medm2g evaluate` JSON (``<root>/evaluate/<task>/benchmark.json``), the training budgets
(``<root>/<task>/<mode>_training/budget.json``) and the datasets' ``prepare_info.json``; adds, per image -> image
task, the paired difference of the LoRA adapter against every other model (mean over the same validation images,
with its standard error) and the ceiling the shared image VAE puts on every latent model (its reconstruction of
the real targets); and draws the samples side by side into ``<root>/montages`` (sources | each model | real).
Nothing derived from the real images enters the repository, generated samples included: they show the
anatomy of real patients. Everything above the notes marker is regenerated; the hand-written
reading below it is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.cli import load_pipeline
from medm2g_diffusers.data.datasets import has_image, load_medm2g_dataset
from medm2g_diffusers.data.io import write_png
from medm2g_diffusers.data.preview import display_range
from medm2g_diffusers.evaluation.benchmark import BenchmarkConfig, generate
from medm2g_diffusers.evaluation.benchmark_tables import evaluate_command, markdown_tables, paired_table, write_page_keeping_notes
from medm2g_diffusers.evaluation.image_metrics import psnr_ssim
from medm2g_diffusers.modalities import to_model_range

# evaluation folder -> (training task, dataset folder, title); the order of the page.
SECTIONS = {
    "harvard_mri_to_ct": ("harvard_mri_to_ct", "harvard_ct_mri", "MRI (T2) -> CT on the Harvard CT-MRI pairs"),
    # The LoRA defaults were chosen on the Harvard validation series; its test series is what no choice looked at.
    "harvard_mri_to_ct_test": ("harvard_mri_to_ct", "harvard_ct_mri", "MRI (T2) -> CT on the Harvard CT-MRI pairs, test series"),
    "brats_t1_t2_to_flair": ("brats_t1_t2_to_flair", "brats", "T1 + T2 -> FLAIR on the BraTS / TCGA brain MRI"),
    "brats_t1_t1c_t2_to_flair": ("brats_t1_t1c_t2_to_flair", "brats",
                                 "T1 + T1c + T2 -> FLAIR on the BraTS / TCGA brain MRI (T1c is new to the base model)"),
    "covid_report_xray": ("covid_report_xray", "covid_cxr", "Notes <-> chest X-ray on the COVID chest X-rays"),
    "synthrad_text_to_ct": ("synthrad_text_to_ct", "synthrad_ct", "Caption -> CT on the SynthRAD CT slices"),
}
MODEL = "lora"
MODES = {"lora": "LoRA adapter on medm2g-tiny", "scratch": "plain conditional LDM (same denoisers, random init, trained in full)",
         "regression": "regression UNet (pix2pix generator, no adversary; L1)"}
MONTAGE_ROWS = 6


def budget_table(root: Path, task: str) -> list[str]:
    rows = []
    for mode, label in MODES.items():
        path = root / task / f"{mode}_training" / "budget.json"
        if not path.is_file():
            continue
        b = json.loads(path.read_text())
        seconds = b.get("train_seconds")
        rows.append(f"| {label} | {b['steps']} x {b['train_batch_size']} | {b.get('samples_seen', b['steps'] * b['train_batch_size'])} | "
                    f"{b.get('trainable_parameters', b.get('parameters')):,} | {'–' if seconds is None else f'{seconds / 60:.1f}'} |")
    if not rows:
        return []
    return ["| model | steps x batch | samples seen | trainable parameters | training minutes (1 thread) |",
            "| --- | --- | --- | --- | --- |", *rows, ""]


@torch.no_grad()
def vae_ceiling(results: dict, data: Path) -> list[str]:
    """PSNR/SSIM of medm2g-tiny's VAE reconstructing the real validation targets: what no latent model can beat."""
    lines = []
    vae = MedM2GPipeline.from_pretrained("medm2g-tiny").vae
    split = load_medm2g_dataset(data)[results.get("split", "test")]
    for task, entry in results.get("image_to_image", {}).items():
        target = entry["target"]
        rows = split.select(np.flatnonzero(np.all([has_image(split, k) for k in [*entry["sources"], target]], axis=0)).tolist())
        native = np.asarray(rows.with_format("numpy", columns=[target])[:][target], dtype=np.float32)
        x = to_model_range(torch.from_numpy(native), target).unsqueeze(1)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        m = psnr_ssim(((recon + 1) / 2)[:, 0].numpy(), ((x + 1) / 2)[:, 0].numpy())
        lines.append(f"The image VAE of medm2g-tiny (shared by every latent model above) reconstructs these {m['n']} real {target} "
                     f"images at {m['psnr_mean']:.2f} dB / {m['ssim_mean']:.3f}: the ceiling of the LoRA adapter, the plain LDM and "
                     "the unfine-tuned model on this task (the regression UNet works in pixels and has none).")
    return lines + [""] if lines else []


def montage(results: dict, data: Path, root: Path, task: str) -> list[str]:
    """The sources, every model's sample and the real target side by side, written under ``root`` (never committed)."""
    lines = []
    split = load_medm2g_dataset(data)[results.get("split", "test")]
    cfg = BenchmarkConfig(**{k: v for k, v in results["config"].items() if k in BenchmarkConfig.__dataclass_fields__})
    folders = {results["model"]: results["arguments"]["model"], **dict(results["arguments"].get("baseline") or [])}
    for name, entry in results.get("image_to_image", {}).items():
        sources, target = entry["sources"], entry["target"]
        rows = split.select(np.flatnonzero(np.all([has_image(split, k) for k in [*sources, target]], axis=0))[:MONTAGE_ROWS].tolist())
        native = {k: np.asarray(rows.with_format("numpy", columns=[k])[:][k], dtype=np.float32) for k in [*sources, target]}
        names = [n for n in [results["model"], *results["baselines"]] if n in entry]
        columns = []
        for method in names:
            pipe = load_pipeline(folders[method])
            pipe.set_progress_bar_config(disable=True)
            # The benchmark's seeds per row, so these are the samples its table scored.
            columns.append(generate(pipe, cfg, [target], list(range(rows.num_rows)), conditions={s: native[s] for s in sources})[target])
        stack = lambda images: np.concatenate(list(images), axis=0)  # noqa: E731
        generated = np.concatenate([stack(c) for c in columns], axis=1)
        layout = " | ".join(names)
        real = [stack(np.stack([display_range(a, k) for a in native[k]])) for k in [*sources, target]]
        local = root / "montages" / f"{task}.png"
        local.parent.mkdir(parents=True, exist_ok=True)
        write_png(local, np.concatenate([*real[:-1], generated, real[-1]], axis=1),
                  provenance={"model": f"{layout} ({task})", "layout": f"columns: {' | '.join(sources)} | {layout} | real {target}"})
        lines += [f"Samples side by side ({name}, the first {rows.num_rows} {results.get('split', 'test')} slices): `{local}`, columns "
                  f"{' | '.join(sources)} | {layout} | real {target}. It stays out of the repository: even the generated columns "
                  "show the anatomy of real patients, whose images the data licences keep out of it.", ""]
    return lines


def dataset_section(root: Path) -> list[str]:
    lines = ["## Data", "", "| dataset | train rows / patients | validation rows / patients | held-out patients | conventions |",
             "| --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(data for _, data, _ in SECTIONS.values()):
        info_path = root / name / "prepare_info.json"
        if not info_path.is_file():
            continue
        info = json.loads(info_path.read_text())
        dataset = load_medm2g_dataset(root / name)
        count = lambda split: f"{dataset[split].num_rows} / {len(set(dataset[split]['patient_id']))}"  # noqa: E731
        remarks = "; ".join(info.get("remarks") or []) or "–"
        held = ", ".join(map(str, (info.get("arguments") or {}).get("validation_patients") or [])) or "by seeded hash"
        lines.append(f"| `{name}` | {count('train')} | {count('validation')} | {held} | {remarks} |")
    return lines + ["", "Made by `bash scripts/real_data/prepare_all.sh` (`medm2g prepare`; every folder keeps its arguments, "
                    "intensity conventions and split patients in `prepare_info.json`).", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/real", help="what scripts/real_data/run_all.sh wrote")
    parser.add_argument("--out", default="docs/results/real-data.md")
    parser.add_argument("--no-montage", action="store_true", help="skip the sample montages (they load and run every model)")
    args = parser.parse_args()
    root, out = Path(args.root), Path(args.out)
    torch.set_num_threads(2)
    lines = ["# Real data: LoRA fine-tuning against the unfine-tuned model and same-budget baselines", "",
             "Made by `scripts/real_data/write_results_page.py` from the runs of `bash scripts/real_data/run_all.sh` (prepare, "
             "train every model, evaluate; about 2 h on 2 cores). Real data never enters the repository: the datasets are "
             "read from `../shared/data`, and the sample montages are written beside the runs (`runs/real/montages`), not here.", "",
             "Every model of a task trains the same steps x batch on the same training split: the LoRA adapter "
             "(`training/finetune_lora.py`, `training/configs/lora.yaml`) on the bundled medm2g-tiny, the plain conditional LDM "
             "(`--init scratch`: the same denoisers from random weights, trained in full, with the same frozen VAE and prompt "
             "encoders), and for image -> image the regression UNet (`training/train_regression_baseline.py`). The "
             "unfine-tuned medm2g-tiny is the starting point of the adapter. Scores are on the validation split (held-out "
             "patients), and for the Harvard pairs also on their test series, 50 DDIM steps, the pipeline's default guidance (each run's header below says which), one seeded sample per image.", "", *dataset_section(root)]
    for name, (task, data, title) in SECTIONS.items():
        path = root / "evaluate" / name / "benchmark.json"
        if not path.is_file():
            lines += [f"## {title}", "", f"Not run yet (`{path}` is missing).", ""]
            continue
        results = json.loads(path.read_text())
        lines += [f"## {title}", "", f"```bash\n{evaluate_command(results)}\n```", "", markdown_tables(results), *paired_table(results, MODEL, "LoRA")]
        if "image_to_image" in results:
            lines += vae_ceiling(results, root / data)
        lines += ["Training budgets (`budget.json` of each run):", "", *budget_table(root, task)]
        if "image_to_image" in results and not args.no_montage:
            lines += montage(results, root / data, root, name)
    write_page_keeping_notes(out, lines)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
