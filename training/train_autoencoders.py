#!/usr/bin/env python
"""Stage 0 of MedM2G: the report tokenizer, the image VAE and the text VAE.

    accelerate launch training/train_autoencoders.py --config training/configs/tiny.yaml [--component all]

Writes diffusers-format folders that the later stages and the pipeline load with ``from_pretrained``:

* ``<output_root>/tokenizer``: byte-level BPE trained on the training-split reports (plus the IU X-ray
  reports when ``data.report_corpus`` exists), a `PreTrainedTokenizerFast`;
* ``<output_root>/vae``: an `AutoencoderKL` (1 channel in/out) shared by every imaging modality, trained
  on all of them mixed, in the model range ``[-1, 1]`` of the modality registry, with L1 + a small KL;
* ``<output_root>/text_vae``: a :class:`MedM2GTextVAE` trained with token CE + bag-of-words on a
  LayerNorm, noise-regularised latent (``shared/notes/text-path.md``).

Each VAE's config stores ``scaling_factor`` = 1 / std of its training latents. Checkpoints go to
``<output_root>/checkpoints/<component>/checkpoint-<step>`` and validation outputs (PNG grids, decoded
reports, metrics JSON) to ``<output_root>/validation/<component>/``. A step's batch and randomness are a
function of ``(seed, step)`` only, so ``--resume_from_checkpoint latest`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.evaluation.finding_labeller import finding_f1
from medm2g_diffusers.modalities import image_modality_keys
from medm2g_diffusers.models.text_vae import MedM2GTextVAE
from medm2g_diffusers.tokenizer import load_report_corpus, train_report_tokenizer
from medm2g_diffusers.training_utils import (
    atomic_save_pretrained,
    atomic_write_text,
    base_argument_parser,
    checkpoint_step,
    images_to_model_range,
    load_config,
    resolve_checkpoint,
    save_checkpoint,
    stage_config,
    step_generator,
    StepBatchSampler,
)

logger = get_logger(__name__, log_level="INFO")

COMPONENTS = ("tokenizer", "vae", "text_vae")


def parse_args(argv: Sequence[str] | None = None):
    parser = base_argument_parser("Stage 0: train the report tokenizer, the image VAE and the text VAE.")
    parser.add_argument(
        "--component",
        choices=[*COMPONENTS, "all"],
        default="all",
        help="train one part (the text VAE needs a trained tokenizer in <output_root>/tokenizer) or all in order",
    )
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data


class ImageSamples(torch.utils.data.Dataset):
    """Every present image of every imaging modality of one split, as ``(1, H, W)`` model-range tensors.

    Reads one column of one row at a time, so nothing is held in memory beyond the Arrow table.
    """

    def __init__(self, split, keys: Sequence[str] | None = None):
        keys = [key for key in (keys or image_modality_keys()) if key in split.column_names]
        self.columns = {key: split.select_columns([key]).with_format("numpy") for key in keys}
        self.items: list[tuple[int, str]] = []
        for key in keys:
            present = ~np.asarray(split.data.column(key).is_null().to_numpy(zero_copy_only=False))
            self.items.extend((int(row), key) for row in np.flatnonzero(present))
        if not self.items:
            raise ValueError(f"the split has no images of the modalities {keys}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, key = self.items[index]
        image = self.columns[key][row][key]
        return {"pixel_values": images_to_model_range({key: [image]}, [key])[key][0], "modality": key}

    def indices_of(self, key: str) -> list[int]:
        return [i for i, (_, k) in enumerate(self.items) if k == key]


def random_crops(pixels: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """One ``crop x crop`` window per image of ``(B, C, H, W)`` at a position drawn from ``generator`` (the step's).

    A convolutional VAE learns the same local maps from windows as from whole images at a fraction of the cost per
    image (Stable Diffusion's autoencoder trained on 256 px crops); validation and the latents of later stages
    still use whole images.
    """
    batch, _, height, width = pixels.shape
    tops = torch.randint(0, height - crop + 1, (batch,), generator=generator).tolist()
    lefts = torch.randint(0, width - crop + 1, (batch,), generator=generator).tolist()
    return torch.stack([pixels[i, :, t : t + crop, l : l + crop] for i, (t, l) in enumerate(zip(tops, lefts))])


def collate_images(examples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "modality": [e["modality"] for e in examples],
    }


class LengthBucketBatchSampler(StepBatchSampler):
    """Batches of similar-length reports; batch ``s`` depends on ``(seed, s, process_index)`` only.

    Reports are sorted by token count and cut into ``num_buckets`` equal buckets; each step picks a bucket
    with probability proportional to its size and draws the batch from it, so padding (and step time)
    shrinks while every report keeps the same chance of being seen as with :class:`StepBatchSampler`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        max_steps: int,
        start_step: int = 0,
        process_index: int = 0,
        num_buckets: int = 8,
    ):
        if len(lengths) < 1:
            raise ValueError("lengths must not be empty (is the training split without reports?)")
        if batch_size < 1 or num_buckets < 1:
            raise ValueError(f"batch_size and num_buckets must be positive; got {batch_size}, {num_buckets}")
        order = np.argsort(np.asarray(lengths), kind="stable")
        num_buckets = min(num_buckets, max(1, len(order) // batch_size))
        self.buckets = [bucket for bucket in np.array_split(order, num_buckets) if len(bucket)]
        self.weights = np.array([len(b) for b in self.buckets], dtype=np.float64) / len(order)
        super().__init__(len(order), batch_size, seed, max_steps, start_step, process_index)

    def draw(self, rng: np.random.Generator) -> list[int]:
        bucket = self.buckets[rng.choice(len(self.buckets), p=self.weights)]
        picks = rng.choice(len(bucket), size=self.batch_size, replace=self.batch_size > len(bucket))
        return bucket[picks].tolist()


def pad_reports(examples: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads token id lists to the batch's longest one."""
    longest = max(len(ids) for ids in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, ids in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def split_reports(split) -> list[str]:
    return [report for report in split["report"] if report and report.strip()]


# ------------------------------------------------------------------------------------------ validation


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 1, H, W)`` in ``[-1, 1]`` -> ``(N, H, W)`` uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()


def save_image_grid(rows: Sequence[torch.Tensor], path: Path) -> None:
    """Saves equally long batches ``(N, 1, H, W)`` as the rows of one grayscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = np.concatenate([np.concatenate(list(to_uint8(row)), axis=1) for row in rows], axis=0)
    Image.fromarray(grid, mode="L").save(path)


def normalised_reference(tokenizer: PreTrainedTokenizerFast, report: str) -> str:
    """What a perfect autoencoder returns: the report after the tokenizer's normalisation and truncation."""
    ids = tokenizer(report, truncation=True).input_ids
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def log_validation(
    component: str,
    model: AutoencoderKL | MedM2GTextVAE,
    split,
    out_dir: Path,
    config: dict[str, Any],
    tokenizer: PreTrainedTokenizerFast | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Reconstructs held-out samples, writes them to ``out_dir`` and returns the metrics (also in ``metrics.json``).

    * ``vae``: per modality, mean per-image PSNR in the model range (``data_range=2.0``) over up to
      ``num_validation_images`` images, and a PNG grid (originals above reconstructions).
    * ``text_vae``: greedy decode(encode(report)) of up to ``num_validation_reports`` reports: exact match
      against the normalised reference, corpus BLEU-4 (sacrebleu, in [0, 1]), the micro finding F1 of the
      rule-based labeller (decoded vs real report), and the samples as text.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    if component == "vae":
        metrics = _validate_image_vae(model, split, out_dir, config, device)
    elif component == "text_vae":
        metrics = _validate_text_vae(model, split, out_dir, config, tokenizer, device)
    else:
        raise ValueError(f"component must be 'vae' or 'text_vae'; got {component!r}")
    model.train(was_training)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _validate_image_vae(model: AutoencoderKL, split, out_dir: Path, config: dict[str, Any], device) -> dict[str, Any]:
    samples = ImageSamples(split)
    limit, batch_size, grid = config["num_validation_images"], config["batch_size"], config["num_grid_images"]
    metrics: dict[str, Any] = {"protocol": "mean per-image PSNR, model range [-1, 1], data_range=2.0, posterior mode"}
    psnr = {}
    for key in dict.fromkeys(k for _, k in samples.items):
        indices = samples.indices_of(key)[:limit]
        values, first_inputs, first_outputs = [], None, None
        for start in range(0, len(indices), batch_size):
            batch = collate_images([samples[i] for i in indices[start : start + batch_size]])
            inputs = batch["pixel_values"].to(device)
            outputs = model(inputs).sample.clamp(-1, 1)
            values.append(peak_signal_noise_ratio(outputs, inputs, data_range=2.0, reduction="none", dim=(1, 2, 3)))
            if first_inputs is None:
                first_inputs, first_outputs = inputs[:grid], outputs[:grid]
        psnr[key] = {"psnr": float(torch.cat(values).mean()), "images": len(indices)}
        save_image_grid([first_inputs, first_outputs], out_dir / f"reconstruction-{key}.png")
    metrics["per_modality"] = psnr
    metrics["psnr_mean"] = float(np.mean([v["psnr"] for v in psnr.values()]))
    return metrics


def _validate_text_vae(
    model: MedM2GTextVAE, split, out_dir: Path, config: dict[str, Any], tokenizer: PreTrainedTokenizerFast, device
) -> dict[str, Any]:
    reports = split_reports(split)[: config["num_validation_reports"]]
    references = [normalised_reference(tokenizer, r) for r in reports]
    hypotheses, losses = [], []
    for start in range(0, len(reports), config["batch_size"]):
        batch = tokenizer(reports[start : start + config["batch_size"]], truncation=True, padding=True, return_tensors="pt")
        input_ids, attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        losses.append(float(model(input_ids, attention_mask).reconstruction_loss))
        latent = model.encode(input_ids, attention_mask).latent
        hypotheses += model.decode(
            latent,
            tokenizer,
            max_new_tokens=config["max_new_tokens"],
            repetition_penalty=config.get("repetition_penalty", 1.0),
        )
    metrics: dict[str, Any] = {
        "protocol": "greedy decode(encode(report)), eval mode; references normalised by the tokenizer",
        "reports": len(reports),
        "reconstruction_loss": float(np.mean(losses)),
        "exact_match": float(np.mean([h == r for h, r in zip(hypotheses, references)])),
        "bleu4": sacrebleu.corpus_bleu(hypotheses, [references]).score / 100.0,
    }
    # Content, not phrasing (shared/notes/text-path.md): the labeller's micro F1 of decoded vs real reports.
    metrics["finding_f1"] = float(finding_f1(hypotheses, reports)["micro_f1"])
    with (out_dir / "reports.txt").open("w") as handle:
        for reference, hypothesis in zip(references, hypotheses):
            handle.write(f"REF: {reference}\nHYP: {hypothesis}\n\n")
    return metrics


# -------------------------------------------------------------------------------------------- training


class VAEStep(torch.nn.Module):
    """encode -> posterior sample -> decode as one ``forward``, so a DDP wrapper sees (and syncs) the whole step.

    ``AutoencoderKL.forward`` returns only the reconstruction; the KL term needs the posterior too.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, H, W)`` -> reconstruction ``(B, 1, H, W)`` and per-sample KL ``(B,)``."""
        posterior = self.vae.encode(pixels).latent_dist
        return self.vae.decode(posterior.sample(generator=generator)).sample, posterior.kl()


def _training_loop(
    component: str,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    batches: Iterator[dict[str, torch.Tensor]],
    compute_loss,
    config: dict[str, Any],
    seed: int,
    start_step: int,
    max_steps: int,
    checkpoint_dir: Path,
    validate,
) -> list[float]:
    """The shared step loop: step-seeded randomness, optimisation, checkpoints, periodic validation."""
    losses = []
    progress = tqdm(total=max_steps, initial=start_step, desc=component, disable=not accelerator.is_local_main_process)
    model.train()
    for step, batch in zip(range(start_step, max_steps), batches):
        generator = step_generator(seed, step, accelerator.process_index)
        # Dropout draws from the global RNG: seeding it per step keeps the step a function of (seed, step).
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        loss, logs = compute_loss(batch, generator)
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.get("max_grad_norm"):
            accelerator.clip_grad_norm_(model.parameters(), float(config["max_grad_norm"]))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        losses.append(float(loss.detach()))
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4f}", **logs)
        global_step = step + 1
        if global_step % config["checkpointing_steps"] == 0:
            save_checkpoint(accelerator, checkpoint_dir, global_step, keep=config.get("checkpoints_total_limit"))
        if config.get("validation_steps") and global_step % config["validation_steps"] == 0 and accelerator.is_main_process:
            metrics = validate(global_step)
            logger.info(f"{component} step {global_step}: {json.dumps(metrics)}")
    progress.close()
    return losses


def _prepare_optimisation(accelerator: Accelerator, model: torch.nn.Module, config: dict[str, Any], max_steps: int):
    # float(): PyYAML reads "1e-3" (no dot) as a string.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(config["learning_rate"]), weight_decay=float(config.get("weight_decay", 0.0))
    )
    lr_scheduler = get_scheduler(
        config.get("lr_scheduler", "constant"),
        optimizer=optimizer,
        num_warmup_steps=config.get("lr_warmup_steps", 0) * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    return accelerator.prepare(model, optimizer, lr_scheduler)


def _resume(accelerator: Accelerator, checkpoint_dir: Path, resume: str | None) -> int:
    path = resolve_checkpoint(checkpoint_dir, resume)
    if path is None:
        if resume is not None:
            logger.info(f"no checkpoint under {checkpoint_dir}; starting from step 0")
        return 0
    accelerator.load_state(str(path))
    logger.info(f"resumed from {path}")
    return checkpoint_step(path)


def train_tokenizer(config: dict[str, Any], dataset, output_root: Path) -> dict[str, Any]:
    section = stage_config(config, "tokenizer")
    texts = split_reports(dataset["train"])
    corpus_path = config.get("data", {}).get("report_corpus")
    extra = 0
    if section.get("use_report_corpus", True) and corpus_path:
        if Path(corpus_path).is_file():
            corpus = load_report_corpus(corpus_path)
            texts += corpus
            extra = len(corpus)
        else:
            logger.info(f"report corpus {corpus_path} not found; training the tokenizer on the dataset reports only")
    tokenizer = train_report_tokenizer(
        texts,
        vocab_size=section["vocab_size"],
        min_frequency=section["min_frequency"],
        model_max_length=section["model_max_length"],
    )
    atomic_save_pretrained(tokenizer, output_root / "tokenizer")
    lengths = [len(ids) for ids in tokenizer(split_reports(dataset["train"])).input_ids]
    return {
        "vocab_size": len(tokenizer),
        "dataset_reports": len(texts) - extra,
        "corpus_reports": extra,
        "tokens_per_report_p50_p99_max": [int(np.percentile(lengths, 50)), int(np.percentile(lengths, 99)), max(lengths)],
    }


def train_image_vae(args, config: dict[str, Any], dataset, output_root: Path) -> dict[str, Any]:
    section = stage_config(config, "image_vae")
    seed = args.seed if args.seed is not None else section["seed"]
    max_steps = args.max_train_steps if args.max_train_steps is not None else section["max_train_steps"]
    checkpoint_dir = output_root / "checkpoints" / "vae"
    validation_dir = output_root / "validation" / "vae"
    accelerator = Accelerator(mixed_precision=section.get("mixed_precision", "no"))

    torch.manual_seed(seed)
    size = config["data"]["size"]
    num_blocks = len(section["model"]["block_out_channels"])
    crop = section.get("crop_size")
    if crop is not None and (not isinstance(crop, int) or isinstance(crop, bool) or not 0 < crop <= size or crop % 2 ** (num_blocks - 1)):
        raise ValueError(f"image_vae.crop_size must be a positive int <= data.size ({size}) divisible by the VAE's downsampling "
                         f"factor {2 ** (num_blocks - 1)}, or null for whole images; got {crop!r}")
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        sample_size=size,
        **section["model"],
    )
    step_model = VAEStep(vae)
    step_model, optimizer, lr_scheduler = _prepare_optimisation(accelerator, step_model, section, max_steps)
    start_step = _resume(accelerator, checkpoint_dir, args.resume_from_checkpoint)

    train = ImageSamples(dataset["train"])
    # Not passed through accelerator.prepare: StepBatchSampler already gives each process its own batches.
    loader = torch.utils.data.DataLoader(
        train,
        batch_sampler=StepBatchSampler(
            len(train), section["batch_size"], seed, max_steps, start_step, accelerator.process_index
        ),
        collate_fn=collate_images,
        num_workers=section.get("dataloader_num_workers", 0),
    )
    num_pixels = (crop or size) ** 2

    def compute_loss(batch, generator):
        pixels = batch["pixel_values"].to(accelerator.device)
        if crop is not None and crop < size:
            pixels = random_crops(pixels, crop, generator)
        decoded, kl = step_model(pixels, generator)
        # SD's weighting: L1 and KL both summed per sample; dividing by the pixel count only rescales the lr.
        l1 = F.l1_loss(decoded.float(), pixels.float(), reduction="none").sum((1, 2, 3)).mean()
        loss = (l1 + float(section["kl_weight"]) * kl.mean()) / num_pixels
        return loss, {"l1": f"{l1.item() / num_pixels:.4f}"}

    def validate(step):
        return log_validation(
            "vae", vae, dataset["validation"], validation_dir / f"step-{step}", section, device=accelerator.device
        )

    started = time.time()
    losses = _training_loop(
        "vae", accelerator, step_model, optimizer, lr_scheduler, loader, compute_loss, section, seed, start_step, max_steps, checkpoint_dir, validate
    )
    train_seconds = time.time() - started

    result: dict[str, Any] = {"losses": losses, "train_seconds": train_seconds, "start_step": start_step}
    if accelerator.is_main_process:
        vae.register_to_config(scaling_factor=_image_scaling_factor(vae, train, section, seed, accelerator.device))
        atomic_save_pretrained(vae, output_root / "vae")
        result["scaling_factor"] = vae.config.scaling_factor
        result["test"] = log_validation(
            "vae", vae, dataset["test"], validation_dir / "final-test", section, device=accelerator.device
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


@torch.no_grad()
def _image_scaling_factor(vae: AutoencoderKL, samples: ImageSamples, config, seed: int, device) -> float:
    """1 / std of posterior samples of up to ``scaling_factor_samples`` training images (diffusers' convention)."""
    vae.eval()
    rng = np.random.default_rng(seed)
    count = min(len(samples), config["scaling_factor_samples"])
    indices = rng.choice(len(samples), size=count, replace=False)
    generator = torch.Generator().manual_seed(seed)
    latents = []
    for start in range(0, count, config["batch_size"]):
        batch = collate_images([samples[int(i)] for i in indices[start : start + config["batch_size"]]])
        posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
        latents.append(posterior.sample(generator=generator).cpu())
    return float(1.0 / torch.cat(latents).std())


def train_text_vae(args, config: dict[str, Any], dataset, output_root: Path) -> dict[str, Any]:
    section = stage_config(config, "text_vae")
    seed = args.seed if args.seed is not None else section["seed"]
    max_steps = args.max_train_steps if args.max_train_steps is not None else section["max_train_steps"]
    checkpoint_dir = output_root / "checkpoints" / "text_vae"
    validation_dir = output_root / "validation" / "text_vae"
    tokenizer_dir = output_root / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {tokenizer_dir}; run with --component tokenizer (or all) first")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    accelerator = Accelerator(mixed_precision=section.get("mixed_precision", "no"))

    torch.manual_seed(seed)
    model = MedM2GTextVAE(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=tokenizer.model_max_length,
        **section["model"],
    )
    model, optimizer, lr_scheduler = _prepare_optimisation(accelerator, model, section, max_steps)
    start_step = _resume(accelerator, checkpoint_dir, args.resume_from_checkpoint)

    train_ids = tokenizer(split_reports(dataset["train"]), truncation=True).input_ids
    sampler = LengthBucketBatchSampler(
        [len(ids) for ids in train_ids],
        section["batch_size"],
        seed,
        max_steps,
        start_step,
        accelerator.process_index,
        num_buckets=section.get("num_length_buckets", 8),
    )
    loader = torch.utils.data.DataLoader(
        train_ids,
        batch_sampler=sampler,
        collate_fn=lambda examples: pad_reports(examples, tokenizer.pad_token_id),
        num_workers=section.get("dataloader_num_workers", 0),
    )

    def compute_loss(batch, generator):
        output = model(
            batch["input_ids"].to(accelerator.device), batch["attention_mask"].to(accelerator.device), generator=generator
        )
        return output.loss, {"ce": f"{output.reconstruction_loss.item():.3f}", "bow": f"{output.bow_loss.item():.3f}"}

    def validate(step):
        return log_validation(
            "text_vae", accelerator.unwrap_model(model), dataset["validation"], validation_dir / f"step-{step}",
            section, tokenizer, accelerator.device,
        )

    started = time.time()
    losses = _training_loop(
        "text_vae", accelerator, model, optimizer, lr_scheduler, loader, compute_loss, section, seed, start_step, max_steps, checkpoint_dir, validate
    )
    train_seconds = time.time() - started

    result: dict[str, Any] = {"losses": losses, "train_seconds": train_seconds, "start_step": start_step}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.register_to_config(
            scaling_factor=_text_scaling_factor(unwrapped, train_ids, tokenizer.pad_token_id, section, seed, accelerator.device)
        )
        atomic_save_pretrained(unwrapped, output_root / "text_vae")
        result["scaling_factor"] = unwrapped.config.scaling_factor
        started = time.time()
        result["test"] = log_validation(
            "text_vae", unwrapped, dataset["test"], validation_dir / "final-test", section, tokenizer, accelerator.device
        )
        result["test"]["seconds"] = time.time() - started
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


@torch.no_grad()
def _text_scaling_factor(model: MedM2GTextVAE, train_ids, pad_token_id: int, config, seed: int, device) -> float:
    """1 / std of the eval-mode latents of up to ``scaling_factor_samples`` training reports."""
    model.eval()
    rng = np.random.default_rng(seed)
    count = min(len(train_ids), config["scaling_factor_samples"])
    indices = rng.choice(len(train_ids), size=count, replace=False)
    latents = []
    for start in range(0, count, config["batch_size"]):
        batch = pad_reports([train_ids[int(i)] for i in indices[start : start + config["batch_size"]]], pad_token_id)
        latents.append(model.encode(batch["input_ids"].to(device), batch["attention_mask"].to(device)).latent.cpu())
    return float(1.0 / torch.cat(latents).std())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the requested components in order; returns their results (losses per step, metrics, timings)."""
    args = parse_args(argv)
    config = load_config(args.config, args.set)
    output_root = Path(args.output_dir or config["output_root"])
    dataset_path = args.dataset or config["data"]["dataset"]
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    PartialState()  # accelerate's logger needs the process state before the first Accelerator exists
    dataset = load_medm2g_dataset(dataset_path)
    components = COMPONENTS if args.component == "all" else (args.component,)

    results: dict[str, Any] = {}
    for component in components:
        started = time.time()
        if component == "tokenizer":
            results[component] = train_tokenizer(config, dataset, output_root)
        elif component == "vae":
            results[component] = train_image_vae(args, config, dataset, output_root)
        else:
            results[component] = train_text_vae(args, config, dataset, output_root)
        results[component]["wall_seconds"] = time.time() - started
        summary = {k: v for k, v in results[component].items() if k != "losses"}
        logger.info(f"{component} done: {json.dumps(summary)}")
    return results


if __name__ == "__main__":
    main()
