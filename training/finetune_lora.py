#!/usr/bin/env python
"""Fine-tune a trained MedM2G on your own paired data: LoRA adapters (peft), a full fine-tune, or from scratch.

The way users adapt MedM2G to their scans. A *task* of the config (``training/configs/lora.yaml``) names a dataset
in the canonical layout (``medm2g prepare``) and what to learn from it:

* ``translation``: ``sources -> target`` image -> image (MRI -> CT, T1 + T2 -> FLAIR, T1 + T1c + T2 -> FLAIR). The
  target's denoiser reads the clean source latents through its source slots and the sources' prompt-encoder
  tokens through cross-attention, as in stage 3. A source the base model has no slot for (``mri_t1c``) is
  appended as a new slot first (``MedM2GPipeline.extend_for``: zero weights, so the base is unchanged) and its
  contrast taught to the prompt encoders from ``contrast_init``.
* ``text_to_image``: report -> ``target`` (CT slices with captions).
* ``report_image``: both directions of report <-> ``image`` (X-rays with notes): every step trains the image
  denoiser on the report's tokens and the text denoiser on the image's tokens.

Modes (one per run, each written to its own folder under ``<output_root>/<task>/``):

* default, ``lora/``: a LoRA adapter on the task's denoisers (attention, θ_c and ``conv_in``; ``lora.targets``;
  DoRA with ``lora.use_dora``), everything else frozen. The folder is an adapter for ``pipe.load_lora_weights`` (a few hundred kB).
* ``--full``, ``full/``: the task's whole denoisers train, from the base model's weights; a whole pipeline.
* ``--init scratch``, ``scratch/``: the same denoisers from random weights, trained in full on the same data
  with the same steps and batch: the plain conditional LDM baseline (no phantom pretraining, no MedM2G
  alignment behind its denoiser; the frozen VAE and prompt encoders are the base model's).

Small real sets overfit fast, so the training split is augmented once, before encoding: every row gets
``augment.copies`` versions (the first one untouched) under one small random rotation, shift and zoom shared
by all of that row's images, so pairs stay registered. No flips (laterality is a finding). The frozen
encoders then run once over the augmented rows (``latent_cache``). Every step's rows, dropouts, timesteps and
noise are pure functions of ``(seed, step)``: ``--resume_from_checkpoint latest`` reproduces an uninterrupted
run. ``<output_root>/<task>/<mode>_training/`` holds the checkpoints, ``train_log.jsonl``, ``validation.json``
(PSNR/SSIM or BLEU on validation rows, with sample grids) and ``budget.json`` (steps, batch, wall time,
trainable parameters), which the results page quotes. Run:

    accelerate launch training/finetune_lora.py --config training/configs/lora.yaml --task harvard_mri_to_ct
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from scipy.ndimage import affine_transform
from tqdm.auto import tqdm

from medm2g_diffusers.checkpoints import DEFAULT_CHECKPOINT
from medm2g_diffusers.data.datasets import canonical_features, has_image, load_medm2g_dataset
from medm2g_diffusers.data.io import write_png
from medm2g_diffusers.data.preview import display_range
from medm2g_diffusers.evaluation.benchmark import fit_prompt
from medm2g_diffusers.evaluation.image_metrics import psnr_ssim
from medm2g_diffusers.evaluation.report_metrics import report_generation_metrics
from medm2g_diffusers.latent_cache import EncodedSplit, composite_condition, draw_latent, encode_split
from medm2g_diffusers.loaders import lora_target_modules
from medm2g_diffusers.modalities import get_modality
from medm2g_diffusers.models.multiflow import MedM2GMultiFlowModel
from medm2g_diffusers.pipelines import MedM2GPipeline
from medm2g_diffusers.single_flow import Condition, diffusion_loss, make_noise_scheduler, training_target
from medm2g_diffusers.training_utils import (
    StepBatchSampler,
    StepLog,
    atomic_save_pretrained,
    atomic_write_text,
    base_argument_parser,
    checkpoint_step,
    load_config,
    resolve_checkpoint,
    save_checkpoint,
    task_config_section,
    step_generator,
)

logger = logging.getLogger(__name__)

SECTION = "finetune"
TASK_KINDS = ("translation", "text_to_image", "report_image")
MODES = ("lora", "full", "scratch")


def parse_args(argv: list[str] | None = None):
    parser = base_argument_parser("Fine-tune MedM2G on paired data: LoRA adapters, a full fine-tune, or from scratch.")
    parser.add_argument("--task", required=True, help="a task of the config's `tasks` section, e.g. harvard_mri_to_ct")
    parser.add_argument("--full", action="store_true", help="train the task's whole denoisers instead of a LoRA adapter")
    parser.add_argument("--init", choices=("pretrained", "scratch"), default="pretrained",
                        help="scratch: random denoiser weights, trained in full (the plain conditional LDM baseline)")
    parser.add_argument("--base_model", default=None, help="the MedM2G pipeline to start from (default: the config's base_model)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ tasks


def task_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``finetune`` section (over ``defaults``) with the task's own keys on top, checked."""
    cfg = task_config_section(config, SECTION, name)
    cfg["name"] = name
    cfg.setdefault("base_model", config.get("base_model", DEFAULT_CHECKPOINT))
    kind = cfg.get("kind")
    if kind not in TASK_KINDS:
        raise ValueError(f"tasks.{name}.kind must be one of {TASK_KINDS}; got {kind!r}")
    required = {"translation": ("dataset", "sources", "target"), "text_to_image": ("dataset", "target"),
                "report_image": ("dataset", "image")}[kind]
    missing = [key for key in required if not cfg.get(key)]
    if missing:
        raise ValueError(f"tasks.{name} ({kind}) needs {list(missing)}")
    images = list(cfg.get("sources") or []) + [cfg.get("target") or cfg.get("image")]
    for key in images:
        if not get_modality(key, f"tasks.{name} modality").is_image:
            raise ValueError(f"tasks.{name}: {key!r} is not an imaging modality")
    return cfg


def task_streams(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """What one step trains: ``[{key, conditions, sources}]``, a stream per denoised modality."""
    if cfg["kind"] == "translation":
        return [{"key": cfg["target"], "conditions": list(cfg["sources"]), "sources": list(cfg["sources"])}]
    if cfg["kind"] == "text_to_image":
        return [{"key": cfg["target"], "conditions": ["text"], "sources": []}]
    return [{"key": cfg["image"], "conditions": ["text"], "sources": []}, {"key": "text", "conditions": [cfg["image"]], "sources": []}]


def task_families(streams: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(get_modality(s["key"]).family for s in streams))


def task_keys(streams: list[dict[str, Any]]) -> list[str]:
    """Every modality a task reads (``"text"`` for the report)."""
    return list(dict.fromkeys(k for s in streams for k in [s["key"], *s["conditions"], *s["sources"]]))


# -------------------------------------------------------------------------------------------------- data


def augment_split(split, keys: list[str], copies: int, cfg: dict[str, Any], seed: int) -> Dataset:
    """``copies`` versions of every row that has all of ``keys``: the first untouched, the others under one random
    rotation (``max_rotation_deg``), shift (``max_shift``, a fraction of the side) and zoom (``scale``) shared by the
    row's images, resampled bilinearly in native units with the image's minimum (air, background) outside.

    Returns:
        `datasets.Dataset` in the canonical layout, ``copies x`` as many rows.
    """
    image_keys = [k for k in keys if k != "text"]
    present = np.ones(split.num_rows, dtype=bool)
    for key in keys:
        present &= has_image(split, key) if key != "text" else np.asarray([bool(r) for r in split["report"]])
    rows = np.flatnonzero(present).tolist()
    if not rows:
        raise ValueError(f"the training split has no row with all of {keys}")
    selected = split.select(rows)
    source = selected.with_format("numpy", columns=image_keys)
    reports, patients = selected["report"], selected["patient_id"]
    size = int(np.asarray(source[0][image_keys[0]]).shape[-1])
    out = {name: [] for name in canonical_features(size)}
    for i, row in enumerate(rows):
        images = {k: np.asarray(source[i][k], dtype=np.float32) for k in image_keys}
        for copy in range(copies):
            rng = np.random.default_rng([seed, row, copy])
            matrix, offset = _random_affine(rng, size, cfg) if copy else (np.eye(2), np.zeros(2))
            for name in out:
                if name in images:
                    image = images[name]
                    out[name].append(image if copy == 0 else affine_transform(image, matrix, offset, order=1, mode="constant", cval=float(image.min())))
                elif name == "report":
                    out[name].append(reports[i])
                elif name == "patient_id":
                    out[name].append(patients[i])
                else:
                    out[name].append(None)
    return Dataset.from_dict(out, features=canonical_features(size))


def _random_affine(rng: np.random.Generator, size: int, cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """An output -> input pixel map about the image centre (what ``scipy.ndimage.affine_transform`` takes)."""
    angle = np.deg2rad(rng.uniform(-1, 1) * float(cfg.get("max_rotation_deg", 0)))
    zoom = rng.uniform(*cfg.get("scale", (1.0, 1.0)))
    shift = rng.uniform(-1, 1, size=2) * float(cfg.get("max_shift", 0)) * size
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotation / zoom
    centre = np.full(2, (size - 1) / 2)
    return matrix, centre - matrix @ centre - shift


def stream_rows(data: EncodedSplit, stream: dict[str, Any]) -> np.ndarray:
    """Rows that have the stream's modality and all of its conditions."""
    present = torch.ones(data.num_rows, dtype=torch.bool)
    for key in [stream["key"], *stream["conditions"]]:
        present &= data.present.get(key, torch.zeros(data.num_rows, dtype=torch.bool))
    return np.flatnonzero(present.numpy())


def stream_condition(data: EncodedSplit, rows: torch.Tensor, stream: dict[str, Any]) -> Condition:
    """The stream's condition tokens, concatenated (a report's with its mask; an image's all kept)."""
    parts = []
    for key in stream["conditions"]:
        tokens = data.tokens[key][rows]
        mask = data.text_mask[rows] if key == "text" else torch.ones(tokens.shape[:2], dtype=torch.long)
        parts.append((tokens, mask))
    return composite_condition(parts)


# ------------------------------------------------------------------------------------------------- steps


def stream_loss(model, data: EncodedSplit, rows: torch.Tensor, stream: dict[str, Any], cfg: dict[str, Any], noise_scheduler,
                generator: torch.Generator, device) -> torch.Tensor:
    """The denoising loss of one stream on ``rows``: its condition dropped to null with ``condition_dropout`` (for
    classifier-free guidance; sources stay, as at sampling time), its sources clean in their slots."""
    key, batch = stream["key"], len(rows)
    clean = draw_latent(data, key, rows, generator)
    keep = torch.rand(batch, generator=generator) >= float(cfg["condition_dropout"])
    condition = stream_condition(data, rows, stream).drop(keep)
    sources = {s: draw_latent(data, s, rows, generator).to(device) for s in stream["sources"]}
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = noise_scheduler.add_noise(clean, noise, t).to(device)
    target = training_target(noise_scheduler, clean, noise, t).to(device)
    prediction = model(
        {key: noisy}, {key: t.to(device)}, {key: Condition(condition.tokens.to(device), condition.mask.to(device))},
        sources={key: sources} if sources else None,
    )[key]
    return diffusion_loss(prediction, target, noise_scheduler, t.to(device), cfg.get("snr_gamma"))


# ----------------------------------------------------------------------------------------------- models


def load_base(name_or_path: str, device) -> MedM2GPipeline:
    pipe = MedM2GPipeline.from_pretrained(name_or_path)  # a bundled name or a folder; safetensors only
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def prepare_model(pipe: MedM2GPipeline, cfg: dict[str, Any], streams: list[dict[str, Any]], mode: str, seed: int) -> list[torch.nn.Parameter]:
    """Extends the base for sources it cannot read, then sets up what trains; returns those parameters."""
    extra = {}
    for stream in streams:
        family = get_modality(stream["key"]).family
        missing = [s for s in stream["sources"] if s not in pipe.multiflow.accepted_sources(family)]
        if missing:
            extra[family] = pipe.multiflow.source_slots_of(family) + missing
    contrast_init = dict(cfg.get("contrast_init") or {})
    unknown = [k for s in streams for k in s["conditions"] if k != "text" and k not in pipe.prompt_encoders.modality_keys() and k not in contrast_init]
    if unknown:
        raise ValueError(f"tasks.{cfg['name']} reads {unknown}, which the base prompt encoders do not know: set tasks.{cfg['name']}.contrast_init, e.g. {{{unknown[0]}: mri_t1}}")
    pipe.extend_for(extra, contrast_init)
    multiflow, families = pipe.multiflow, task_families(streams)
    if mode == "lora":
        lora = cfg["lora"]
        config = LoraConfig(
            r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora.get("dropout", 0.0)),
            target_modules=lora_target_modules(multiflow, families, lora.get("targets", "attention")), init_lora_weights=True,
            use_dora=bool(lora.get("use_dora", False)),
        )
        pipe.add_lora_adapter(config, cfg["name"], {"task": cfg["name"], "contrast_init": contrast_init})
        trainable = [p for n, p in multiflow.named_parameters() if f".{cfg['name']}." in n and ".lora_" in n]
        multiflow.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
        multiflow.train()
        return trainable
    if mode == "scratch":
        torch.manual_seed(seed)
        fresh = MedM2GMultiFlowModel.from_config(multiflow.config)
        for family in families:
            multiflow.unets[family].load_state_dict(fresh.unets[family].state_dict())
    multiflow.requires_grad_(False)
    for family in families:
        multiflow.unets[family].requires_grad_(True)
    multiflow.train()
    return [p for family in families for p in multiflow.unets[family].parameters()]


# ------------------------------------------------------------------------------------------- validation


@torch.no_grad()
def log_validation(pipe: MedM2GPipeline, split, streams, cfg, output_dir: Path, step: int, seed: int) -> dict[str, Any]:
    """Samples every stream on up to ``num_validation_rows`` validation rows: PSNR/SSIM (images, display range) or
    BLEU/ROUGE-L (reports) against the real ones, and a grid of sources | generated | real."""
    was_training = pipe.multiflow.training
    pipe.multiflow.eval()
    results = {"step": step}
    for stream in streams:
        key = stream["key"]
        needed = [key, *stream["conditions"]]
        present = np.ones(split.num_rows, dtype=bool)
        for k in needed:
            present &= has_image(split, k) if k != "text" else np.asarray([bool(r) for r in split["report"]])
        rows = split.select(np.flatnonzero(present)[: int(cfg["num_validation_rows"])].tolist())
        if not rows.num_rows:
            continue
        arrays = {k: np.asarray(rows.with_format("numpy", columns=[k])[:][k], dtype=np.float32) for k in needed if k != "text"}
        generators = [torch.Generator().manual_seed(seed + i) for i in range(rows.num_rows)]
        out = pipe(
            # Whole sentences up to max_text_tokens, as the benchmark cuts long notes (training truncated them).
            prompt=[fit_prompt(pipe.tokenizer, r, int(cfg["max_text_tokens"])) for r in rows["report"]] if "text" in stream["conditions"] else None,
            conditions={k: torch.from_numpy(arrays[k]).unsqueeze(1) for k in stream["conditions"] if k != "text"} or None,
            targets=[key], num_inference_steps=int(cfg["validation_inference_steps"]), guidance_scale=float(cfg["guidance_scale"]),
            generator=generators, output_type="np", max_text_tokens=int(cfg["max_text_tokens"]),
        )
        if key == "text":
            metrics = report_generation_metrics(out.text, list(rows["report"]))
            results[key] = {"n": rows.num_rows, **{k: v for k, v in metrics.items() if k in ("bleu_4", "rouge_l")},
                            "examples": [{"generated": g, "reference": r} for g, r in zip(out.text[:2], rows["report"][:2])]}
            continue
        real = np.stack([display_range(a, key) for a in arrays[key]])
        fake = out.images[key]
        scores = psnr_ssim(fake, real)
        columns = [np.stack([display_range(a, k) for a in arrays[k]]) for k in stream["sources"]] + [fake, real]
        grid = np.concatenate([np.concatenate(list(c[:8]), axis=0) for c in columns], axis=1)
        grid_path = output_dir / "validation" / f"{key}-step-{step}.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        write_png(grid_path, grid, provenance={"model": f"medm2g fine-tune {cfg['name']} (validation, step {step})",
                                               "layout": f"columns: {' | '.join(stream['sources'] + ['generated', 'real'])}"})
        results[key] = {"n": rows.num_rows, "psnr_mean": scores["psnr_mean"], "ssim_mean": scores["ssim_mean"], "grid": str(grid_path)}
    pipe.multiflow.train(was_training)
    return results


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = load_config(args.config, args.set)
    cfg = task_config(config, args.task)
    if args.max_train_steps is not None:
        cfg["max_train_steps"] = args.max_train_steps
    mode = "scratch" if args.init == "scratch" else "full" if args.full else "lora"
    seed = args.seed if args.seed is not None else int(cfg.get("seed", 0))
    task_root = Path(config.get("output_root", "runs/real")) / args.task
    output_dir = Path(args.output_dir) if args.output_dir else task_root / f"{mode}_training"
    model_dir = task_root / mode

    # Our schedules count optimizer steps; accelerate would otherwise step a prepared scheduler once per process.
    accelerator = Accelerator(mixed_precision=cfg.get("mixed_precision", "no"), step_scheduler_with_optimizer=False)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(seed)
    device = accelerator.device
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    dataset = load_medm2g_dataset(args.dataset or cfg["dataset"])
    streams = task_streams(cfg)
    pipe = load_base(args.base_model or cfg["base_model"], device)
    parameters = prepare_model(pipe, cfg, streams, mode, seed)
    learning_rate = float(cfg[{"lora": "lora_learning_rate", "full": "learning_rate", "scratch": "scratch_learning_rate"}[mode]])
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=float(cfg.get("adam_weight_decay", 1e-2)))
    steps = int(cfg["max_train_steps"])
    lr_scheduler = get_scheduler(cfg.get("lr_scheduler", "cosine"), optimizer, num_warmup_steps=int(cfg["lr_warmup_steps"]), num_training_steps=steps)
    model, optimizer, lr_scheduler = accelerator.prepare(pipe.multiflow, optimizer, lr_scheduler)
    noise_scheduler = make_noise_scheduler(pipe.scheduler.config.prediction_type)

    started = time.perf_counter()
    keys = task_keys(streams)
    augmented = augment_split(dataset["train"], keys, int(cfg["augment"]["copies"]), cfg["augment"], seed)
    components = {"vae": pipe.vae, "text_vae": pipe.text_vae, "prompt_encoders": pipe.prompt_encoders, "tokenizer": pipe.tokenizer}
    data = encode_split(augmented, components, [k for k in keys if k != "text"], int(cfg["max_text_tokens"]), device)
    encode_seconds = time.perf_counter() - started
    rows = {stream["key"]: stream_rows(data, stream) for stream in streams}
    logger.info("%s: %d augmented training rows (%d copies) encoded in %.1f s", args.task, data.num_rows, cfg["augment"]["copies"], encode_seconds)

    start_step = 0
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        start_step = checkpoint_step(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, start_step)

    batch_size = int(cfg["train_batch_size"])
    samplers = {key: iter(StepBatchSampler(len(r), batch_size, seed + i, steps, start_step, accelerator.process_index))
                for i, (key, r) in enumerate(rows.items())}
    step_log = StepLog(output_dir / "train_log.jsonl", start_step) if accelerator.is_main_process else None
    validation_path = output_dir / "validation.json"
    validation = json.loads(validation_path.read_text()) if validation_path.is_file() else {}
    progress = tqdm(total=steps, initial=start_step, desc=f"{args.task} ({mode})", disable=not accelerator.is_local_main_process)
    history, train_started = [], time.perf_counter()
    for step in range(start_step, steps):
        generator = step_generator(seed, step, accelerator.process_index)
        losses = {}
        for stream in streams:
            batch = torch.from_numpy(rows[stream["key"]][np.asarray(next(samplers[stream["key"]]))])
            losses[stream["key"]] = stream_loss(model, data, batch, stream, cfg, noise_scheduler, generator, device)
        loss = sum(losses.values())
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.get("max_grad_norm"):
            accelerator.clip_grad_norm_(parameters, float(cfg["max_grad_norm"]))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, "loss": loss.item(), **{f"loss_{k}": v.item() for k, v in losses.items()}, "lr": lr_scheduler.get_last_lr()[0]}
        history.append(record)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        if step_log is not None:
            step_log.append(record)
        if done % int(cfg["checkpointing_steps"]) == 0 and done < steps:
            save_checkpoint(accelerator, output_dir, done, keep=cfg.get("checkpoints_total_limit"))
        if accelerator.is_main_process and (done % int(cfg["validation_steps"]) == 0 or done == steps):
            validation[str(done)] = log_validation(pipe, dataset["validation"], streams, cfg, output_dir, done, seed)
            atomic_write_text(validation_path, json.dumps(validation, indent=2))
            logger.info("validation at step %d: %s", done, validation[str(done)])
    progress.close()
    if step_log is not None:
        step_log.close()
    train_seconds = time.perf_counter() - train_started

    save_checkpoint(accelerator, output_dir, steps, keep=cfg.get("checkpoints_total_limit"))
    budget = {
        "task": args.task, "mode": mode, "dataset": str(args.dataset or cfg["dataset"]), "base_model": args.base_model or cfg["base_model"],
        "steps": steps, "train_batch_size": batch_size, "streams": [s["key"] for s in streams],
        "samples_seen": steps * batch_size * len(streams), "training_rows": {k: int(len(r)) for k, r in rows.items()},
        "augment_copies": int(cfg["augment"]["copies"]), "trainable_parameters": int(sum(p.numel() for p in parameters)),
        "learning_rate": learning_rate, "snr_gamma": cfg.get("snr_gamma"), "encode_seconds": encode_seconds,
        "train_seconds": train_seconds if start_step == 0 else None,  # a resumed run's wall time is not the whole run's
        "resumed_from_step": start_step, "torch_threads": torch.get_num_threads(),
    }
    if accelerator.is_main_process:
        atomic_write_text(output_dir / "budget.json", json.dumps(budget, indent=2))
        pipe.multiflow.eval()
        if mode == "lora":
            metadata = pipe._lora.metadata[args.task]
            metadata.update({"dataset": budget["dataset"], "steps": steps, "train_batch_size": batch_size, "kind": cfg["kind"],
                             "streams": budget["streams"], "created_by": "training/finetune_lora.py"})
            pipe.save_lora_weights(model_dir, args.task)
        else:
            atomic_save_pretrained(pipe, model_dir)
        logger.info("saved the %s model to %s", mode, model_dir)
    accelerator.end_training()
    return {"history": history, "validation": validation, "budget": budget, "model_dir": str(model_dir), "output_dir": str(output_dir)}


if __name__ == "__main__":
    main()
