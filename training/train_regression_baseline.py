#!/usr/bin/env python
"""The image -> image regression baseline: a pix2pix generator without the adversary, trained with L1.

A *task* of the config (``training/configs/regression.yaml``) names a dataset in the canonical layout
(``medm2g prepare``), its ``sources`` and ``target`` and the budget (``max_train_steps``, ``train_batch_size``,
``learning_rate``, ``seed``). A diffusers ``UNet2DModel`` in pixel space reads the sources in the model range
``[-1, 1]`` as input channels and predicts the target in ``[-1, 1]`` (constant timestep: it is not a diffusion
model). It is what a generative model has to beat on small paired sets (``../shared/notes/image-to-image.md``:
19.6 dB on MRI -> CT after 4.5 min), so it trains at the same steps x batch as the LoRA fine-tune and the plain
conditional LDM of ``training/finetune_lora.py``.

Every step's rows come from :class:`StepBatchSampler` and its augmentation (one small random rotation, shift and
zoom per pair, shared by its sources and target so they stay registered; no flips: laterality is a finding) from
:func:`step_generator`, both pure functions of ``(seed, step)``, so ``--resume_from_checkpoint latest``
reproduces the uninterrupted run's next loss. Validation PSNR/SSIM (the benchmark's display-range protocol) on
the validation split every ``validation_steps``.

Writes ``<output_root>/<task>/regression`` (a :class:`MedM2GRegressionPipeline`, saved atomically; ``medm2g
evaluate --baseline regression=<that folder>`` scores it) and ``<output_root>/<task>/regression_training``
(``checkpoint-<step>``, ``train_log.jsonl``, ``validation.json`` and ``budget.json``: steps, batch, samples seen,
parameters, wall time, which the results page quotes). Run:

    accelerate launch training/train_regression_baseline.py --config training/configs/regression.yaml --task harvard_mri_to_ct
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.evaluation.image_metrics import psnr_ssim
from medm2g_diffusers.modalities import get_modality
from medm2g_diffusers.pipelines.pipeline_regression import TIMESTEP, MedM2GRegressionPipeline
from medm2g_diffusers.training_utils import (
    StepBatchSampler,
    StepLog,
    atomic_save_pretrained,
    atomic_write_text,
    base_argument_parser,
    checkpoint_step,
    images_to_model_range,
    load_config,
    present_rows,
    read_step_log,
    resolve_checkpoint,
    save_checkpoint,
    task_config_section,
    step_generator,
)

logger = logging.getLogger(__name__)

SECTION = "regression"
REQUIRED = ("dataset", "sources", "target", "max_train_steps", "train_batch_size", "learning_rate", "seed")


def parse_args(argv: list[str] | None = None):
    parser = base_argument_parser("The image -> image regression baseline (pix2pix generator, L1, no adversary).")
    parser.add_argument("--task", required=True, help="a task of the config's `tasks` section, e.g. harvard_mri_to_ct")
    return parser.parse_args(argv)


def task_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``regression`` section (over ``defaults``) with the task's own keys on top, checked."""
    cfg = task_config_section(config, SECTION, name)
    missing = [key for key in REQUIRED if cfg.get(key) is None]
    if missing:
        raise ValueError(f"tasks.{name} needs {missing} (in the task or the {SECTION!r} section)")
    sources = cfg["sources"]
    if isinstance(sources, str) or not isinstance(sources, list) or not sources:
        raise ValueError(f"tasks.{name}.sources must be a non-empty list of image modality keys; got {sources!r}")
    for key in [*sources, cfg["target"]]:
        if not get_modality(key, f"tasks.{name} modality").is_image:
            raise ValueError(f"tasks.{name}: {key!r} is not an imaging modality")
    return cfg


# -------------------------------------------------------------------------------------------------- data


def load_pairs(split, sources: list[str], target: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``split`` that have every source and the target, in the model range.

    Returns:
        ``(sources, target)``: `torch.Tensor`s of shape `(N, len(sources), H, W)` and `(N, 1, H, W)` in `[-1, 1]`.
    """
    keys = [*sources, target]
    rows = present_rows(split, keys)
    if limit is not None:
        rows = rows.select(range(min(limit, rows.num_rows)))
    if not rows.num_rows:
        size = rows.features[target].shape[-1]
        return torch.zeros((0, len(sources), size, size)), torch.zeros((0, 1, size, size))
    images = images_to_model_range(rows.with_format("numpy", columns=keys)[:], keys)
    return torch.cat([images[key] for key in sources], dim=1), images[target]


def augment(pairs: torch.Tensor, cfg: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """One random rotation (``max_rotation_deg``), shift (``max_shift``, a fraction of the side) and zoom (``scale``)
    per pair, applied to all its channels (sources and target), resampled bilinearly; what comes in from outside is
    -1, the bottom of the model range (air in CT, background in MRI).

    Args:
        pairs (`torch.Tensor` of shape `(N, C, H, W)`): sources and target stacked on channels, in `[-1, 1]`.
    """
    n = pairs.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(float(cfg["max_rotation_deg"]))
    low, high = cfg["scale"]
    zoom = low + torch.rand(n, generator=generator) * (high - low)
    shift = (torch.rand((n, 2), generator=generator) * 2 - 1) * float(cfg["max_shift"]) * 2  # grid units span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(pairs), list(pairs.shape), align_corners=False)
    # Zero padding of (x + 1) is padding with -1.
    return F.grid_sample(pairs + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def build_unet(cfg: dict[str, Any], num_sources: int, size: int) -> UNet2DModel:
    levels = len(cfg["unet"]["block_out_channels"])
    return UNet2DModel(
        sample_size=size, in_channels=num_sources, out_channels=1,
        down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels, **cfg["unet"],
    )


def training_loss(unet, sources: torch.Tensor, target: torch.Tensor, cfg: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    """L1 between the prediction and the target of one augmented batch (all randomness from ``generator``)."""
    pairs = augment(torch.cat([sources, target], dim=1), cfg["augment"], generator)
    prediction = unet(pairs[:, :-1], TIMESTEP).sample
    return F.l1_loss(prediction.float(), pairs[:, -1:].float())


@torch.no_grad()
def validate(unet, sources: torch.Tensor, target: torch.Tensor, batch_size: int, step: int) -> dict[str, Any]:
    """PSNR/SSIM of the predictions on validation pairs, both in the display range `[0, 1]` (the benchmark's protocol)."""
    unet.eval()
    device = next(unet.parameters()).device
    predictions = torch.cat([unet(sources[i : i + batch_size].to(device), TIMESTEP).sample.clamp(-1, 1).float().cpu()
                             for i in range(0, len(sources), batch_size)])
    unet.train()
    scores = psnr_ssim((predictions + 1) / 2, (target + 1) / 2)
    return {"step": step, "split": "validation", **{k: scores[k] for k in ("psnr_mean", "psnr_std", "ssim_mean", "ssim_std", "n", "protocol")}}


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = load_config(args.config, args.set)
    cfg = task_config(config, args.task)
    if args.max_train_steps is not None:
        cfg["max_train_steps"] = args.max_train_steps
    seed = args.seed if args.seed is not None else int(cfg["seed"])
    steps, batch_size = int(cfg["max_train_steps"]), int(cfg["train_batch_size"])
    sources, target = list(cfg["sources"]), cfg["target"]
    task_root = Path(config.get("output_root", "runs/real")) / args.task
    output_dir = Path(args.output_dir) if args.output_dir else task_root / "regression_training"
    model_dir = task_root / "regression"
    dataset_path = args.dataset or cfg["dataset"]

    # Our schedules count optimizer steps; accelerate would otherwise step a prepared scheduler once per process.
    accelerator = Accelerator(mixed_precision=cfg.get("mixed_precision", "no"), step_scheduler_with_optimizer=False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(seed)
    device = accelerator.device
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    dataset = load_medm2g_dataset(dataset_path)
    train_sources, train_target = load_pairs(dataset["train"], sources, target)
    if not len(train_target):
        raise ValueError(f"the training split of {dataset_path} has no row with all of {[*sources, target]}; nothing to train on")
    val_sources, val_target = load_pairs(dataset["validation"], sources, target, int(cfg["num_validation_rows"]))
    if not len(val_target):
        logger.warning("the validation split of %s has no row with all of %s: validation is skipped", dataset_path, [*sources, target])
    size = train_target.shape[-1]

    torch.manual_seed(seed)  # the initial weights
    unet = build_unet(cfg, len(sources), size)
    parameters = int(sum(p.numel() for p in unet.parameters()))
    optimizer = torch.optim.Adam(unet.parameters(), lr=float(cfg["learning_rate"]), betas=(float(cfg["adam_beta1"]), float(cfg["adam_beta2"])),
                                 weight_decay=float(cfg.get("adam_weight_decay", 0.0)))
    lr_scheduler = get_scheduler(cfg.get("lr_scheduler", "cosine"), optimizer, num_warmup_steps=int(cfg["lr_warmup_steps"]), num_training_steps=steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    logger.info("%s: %s -> %s, %d training / %d validation pairs at %d px, UNet %.2f M parameters",
                args.task, "+".join(sources), target, len(train_target), len(val_target), size, parameters / 1e6)

    start_step = 0
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        start_step = checkpoint_step(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, start_step)

    sampler = StepBatchSampler(len(train_target), batch_size, seed, steps, start_step, accelerator.process_index)
    # One line per step, flushed as written; opening it drops the records a resumed run will write again.
    step_log = StepLog(output_dir / "train_log.jsonl", start_step) if accelerator.is_main_process else None
    validation_path = output_dir / "validation.json"
    validation = json.loads(validation_path.read_text()) if validation_path.is_file() else {}
    validation = {k: v for k, v in validation.items() if int(k) <= start_step}
    progress = tqdm(total=steps, initial=start_step, desc=f"{args.task} (regression)", disable=not accelerator.is_local_main_process)
    unet.train()
    history, run_started = [], time.perf_counter()
    step_started = run_started
    for step, batch in enumerate(sampler, start=start_step):
        idx = torch.as_tensor(batch)
        generator = step_generator(seed, step, accelerator.process_index)
        with accelerator.accumulate(unet):
            loss = training_loss(unet, train_sources[idx].to(device), train_target[idx].to(device), cfg, generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.get("max_grad_norm"):
                accelerator.clip_grad_norm_(unet.parameters(), float(cfg["max_grad_norm"]))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % int(cfg["checkpointing_steps"]) == 0 or done == steps:
            save_checkpoint(accelerator, output_dir, done, keep=cfg.get("checkpoints_total_limit"))
        if accelerator.is_main_process and len(val_target) and (done % int(cfg["validation_steps"]) == 0 or done == steps):
            validation[str(done)] = validate(accelerator.unwrap_model(unet), val_sources, val_target, int(cfg["validation_batch_size"]), done)
            atomic_write_text(validation_path, json.dumps(validation, indent=2) + "\n")
            logger.info("validation at step %d: PSNR %.2f dB, SSIM %.3f (n=%d)", done, validation[str(done)]["psnr_mean"],
                        validation[str(done)]["ssim_mean"], validation[str(done)]["n"])
        now = time.perf_counter()
        # seconds: this step's wall time with its checkpoint and validation, so the log sums to the run's budget.
        record = {"step": done, "loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0], "seconds": now - step_started}
        step_started = now
        history.append(record)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        if step_log is not None:
            step_log.append(record)
    progress.close()
    if step_log is not None:
        step_log.close()

    accelerator.wait_for_everyone()
    budget = {
        "task": args.task, "method": "UNet L1 regression (pix2pix generator without the adversary)", "dataset": str(dataset_path),
        "sources": sources, "target": target, "steps": steps, "train_batch_size": batch_size, "samples_seen": steps * batch_size,
        "learning_rate": float(cfg["learning_rate"]), "seed": seed, "parameters": parameters, "image_size": size,
        "training_pairs": len(train_target), "validation_pairs": len(val_target), "resumed_from_step": start_step,
        "torch_threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
        "this_run_seconds": time.perf_counter() - run_started,
        "validation": validation.get(str(steps)),
        "model": str(model_dir),
    }
    # Also when resumed at the last step: a run killed after its final checkpoint still gets its model.
    if accelerator.is_main_process:
        # Every step's own wall time, over every run that reached the end (a resumed run adds to the killed one's).
        logged = read_step_log(output_dir / "train_log.jsonl")
        budget["train_seconds"] = float(sum(r["seconds"] for r in logged)) if len(logged) == steps else None
        pipeline = MedM2GRegressionPipeline(unet=accelerator.unwrap_model(unet).eval(), sources=sources, target=target)
        atomic_save_pretrained(pipeline, model_dir)
        atomic_write_text(output_dir / "budget.json", json.dumps(budget, indent=2) + "\n")
        logger.info("saved the regression pipeline to %s (%d steps x %d)", model_dir, steps, batch_size)
    accelerator.end_training()
    return {"history": history, "validation": validation, "budget": budget, "start_step": start_step,
            "model_dir": str(model_dir), "output_dir": str(output_dir)}


if __name__ == "__main__":
    main()
