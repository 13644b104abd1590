"""Writes docs/results/phantom-baselines.md from the runs of training/recipes/phantom_baselines.sh (tables by code).

    bash training/recipes/phantom_baselines.sh && bash training/recipes/phantom_baselines.sh evaluate
    python scripts/write_phantom_baselines_page.py

Per image -> image task of the phantom benchmark: the `medm2g evaluate` table of medm2g-tiny beside its
same-budget plain conditional LDM (``<root>/evaluate/<task>/benchmark.json``), the paired difference on the same
held-out patients, the ceiling medm2g-tiny's image VAE puts on both (its reconstruction of the same targets under
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
    path = root / task / "scratch_training" / "budget.json"
    if not path.is_file():
        return []
    b = json.loads(path.read_text())
    minutes = "–" if b.get("train_seconds") is None else f"{b['train_seconds'] / 60:.1f}"
    return ["| model | steps x batch of the target's denoiser | trainable parameters | training minutes |", "| --- | --- | --- | --- |",
            f"| medm2g-tiny | {model_budget(family)}, shared with text -> image and every source | – | see stages.md, multiflow.md |",
            f"| plain_ldm | {b['steps']} x {b['train_batch_size']}, this task only | {b['trainable_parameters']:,} | {minutes} "
            f"({b['torch_threads']} thread) |", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--out", default="docs/results/phantom-baselines.md")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    root, out = Path(config["output_root"]), Path(args.out)
    torch.set_num_threads(2)
    pipe = MedM2GPipeline.from_pretrained(config["base_model"])
    lines = ["# Image -> image on the phantoms: medm2g-tiny against same-budget plain conditional LDMs", "",
             "Made by `scripts/write_phantom_baselines_page.py` from the runs of `bash training/recipes/phantom_baselines.sh && "
             "bash training/recipes/phantom_baselines.sh evaluate`. The baseline of each task (`training/finetune_lora.py "
             "--init scratch`, `training/configs/phantom_baselines.yaml`) is the target family's denoiser of medm2g-tiny, "
             "with the same source slots, from random weights, trained in full on that one task with medm2g-tiny's frozen "
             "VAE and prompt encoders, for as many samples as medm2g-tiny's denoiser of that family saw in all. Scores: "
             "the phantom benchmark's held-out test patients, 50 DDIM steps, guidance 2.0, one seeded sample per patient.", ""]
    for task, spec in config["tasks"].items():
        path = root / "evaluate" / task / "benchmark.json"
        title = f"## {task}: {' + '.join(spec['sources'])} -> {spec['target']}"
        if not path.is_file():
            lines += [title, "", f"Not run yet (`{path}` is missing).", ""]
            continue
        results = json.loads(path.read_text())
        family = get_modality(spec["target"]).family
        lines += [title, "", f"```bash\n{evaluate_command(results)}\n```", "", markdown_tables(results), *paired_table(results),
                  *vae_ceiling(pipe, results), *budget_lines(root, task, family)]
    write_page_keeping_notes(out, lines)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
