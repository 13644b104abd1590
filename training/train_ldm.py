#!/usr/bin/env python
"""Stage 2 of MedM2G: one single-flow latent diffusion model per family, conditioned on prompt-encoder tokens.

* ``--family xray|ct|mri``: a ``UNet2DConditionModel`` on the image VAE's latents, conditioned on the report
  tokens of the (frozen) text prompt encoder. The MRI UNet serves all four contrasts through its class
  embedding (``class_labels`` = the registry's ``contrast_index``).
* ``--family text``: a :class:`MedM2GTextUNet` on the text VAE's latents ``(B, D, 1, 1)``, conditioned on the
  image tokens of one imaging modality of the same patient (any that is present), so image -> report works
  from every imaging family.

Loss: the MSE of the prediction (``prediction_type``: the paper's epsilon, or v) under the paper's schedule
(1000 steps, linear betas 0.00085-0.012), per sample weighted by Min-SNR-gamma when ``snr_gamma`` is set, with
10 % condition dropout to the null condition for classifier-free guidance. EMA weights are what gets saved.

With ``cache_latents: true`` (the default) the frozen encoders run once over the training split before the
first step: the VAE's posterior mean and std are cached, so a cached step draws exactly the latent an
uncached step would. Every step's batch, dropout, timesteps and noise are pure functions of ``(seed, step)``,
so ``--resume_from_checkpoint latest`` reproduces the uninterrupted run's next loss.

Reads ``<output_root>/{tokenizer,prompt_encoders,vae,text_vae}``; writes ``<output_root>/unet_<family>``
(diffusers format) and, in ``<output_dir>`` (default ``<output_root>/ldm_<family>``), checkpoints,
``train_log.jsonl`` and validation samples. Run:

    accelerate launch training/train_ldm.py --config training/configs/tiny.yaml --family xray
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.data.io import write_png
from medm2g_diffusers.modalities import get_modality, image_modality_keys, modalities_of_family, to_model_range
from medm2g_diffusers.models.prompt_encoders import MedM2GPromptEncoders
from medm2g_diffusers.models.text_unet import MedM2GTextUNet
from medm2g_diffusers.models.text_vae import MedM2GTextVAE
from medm2g_diffusers.single_flow import (
    Condition,
    build_image_unet,
    diffusion_loss,
    encode_image_condition,
    encode_text_condition,
    make_noise_scheduler,
    make_sampling_scheduler,
    sample_latents,
    training_target,
    unet_condition_kwargs,
)
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
    stage_config,
    step_generator,
)

logger = logging.getLogger(__name__)

SECTION = "ldm"
FAMILIES = ("xray", "ct", "mri", "text")
ENCODE_CHUNK = 128
SALT_DROPOUT, SALT_TIMESTEPS, SALT_NOISE, SALT_LATENT = 1, 2, 3, 4


def parse_args(argv: list[str] | None = None):
    parser = base_argument_parser("Stage 2: single-flow latent diffusion for one modality family.")
    parser.add_argument("--family", required=True, choices=FAMILIES, help="which family's LDM to train")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Items:
    """The training items of one family: ``(row, modality)`` pairs over a dataset split.

    For an image family the modality is the one denoised (an MRI row gives four items, one per contrast);
    for the text family it is the imaging modality whose tokens condition the report.
    """

    rows: np.ndarray
    keys: list[str]

    def __len__(self) -> int:
        return len(self.rows)


def enumerate_items(split, family: str, allow_empty: bool = False, condition_families: Sequence[str] | None = None) -> Items:
    """(row, modality) items of ``family``; for text, one item per image that conditions it -- every image
    modality whose family is in ``condition_families`` (the prompt encoders' families; default: all)."""
    if family == "text":
        keys = [k for k in image_modality_keys() if condition_families is None or get_modality(k).family in condition_families]
    else:
        keys = modalities_of_family(family)
    table = split.data
    rows, item_keys = [], []
    present = {key: ~np.asarray(table.column(key).is_null().to_numpy(zero_copy_only=False)) for key in keys}
    has_report = ~np.asarray(table.column("report").is_null().to_numpy(zero_copy_only=False))
    for row in range(split.num_rows):
        if not has_report[row]:
            continue
        for key in keys:
            if present[key][row]:
                rows.append(row)
                item_keys.append(key)
    if not rows and not allow_empty:
        raise ValueError(f"the split has no rows with a report and a {family} image; nothing to train on")
    return Items(np.asarray(rows), item_keys)


@dataclass
class Encoded:
    """Encoder outputs for a batch of items (or the whole cache).

    latent_mean, latent_std (`(n, C, h, w)`): image VAE posterior, or the text latent (std 0) as `(n, D, 1, 1)`;
    scaled by the VAE's scaling factor. condition: the tokens the UNet attends to. class_labels `(n,)`: MRI contrast.
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    condition: Condition
    class_labels: torch.Tensor

    def index(self, idx: torch.Tensor) -> "Encoded":
        return Encoded(self.latent_mean[idx], self.latent_std[idx], self.condition.index(idx), self.class_labels[idx])


class FamilyEncoder:
    """Turns items into latents and conditions with the frozen stage-0/1 models."""

    def __init__(self, family: str, split, components: dict[str, Any], max_text_tokens: int, device: torch.device):
        self.family, self.split, self.device = family, split.with_format("numpy"), device
        self.components, self.max_text_tokens = components, max_text_tokens
        self.reports = split["report"]

    def _images(self, rows: np.ndarray, key: str) -> torch.Tensor:
        native = torch.from_numpy(np.asarray(self.split.select(rows.tolist())[key], dtype=np.float32))
        return to_model_range(native, key).unsqueeze(1).to(self.device)

    @torch.no_grad()
    def __call__(self, items: Items, idx: np.ndarray) -> Encoded:
        rows, keys = items.rows[idx], [items.keys[i] for i in idx]
        prompt_encoders = self.components["prompt_encoders"]
        n = len(idx)
        if self.family == "text":
            text_vae, tokenizer = self.components["text_vae"], self.components["tokenizer"]
            batch = tokenizer([self.reports[r] for r in rows], padding="longest", truncation=True,
                              max_length=text_vae.config.max_position_embeddings, return_tensors="pt")
            latent = text_vae.encode(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)).latent
            mean = (latent * text_vae.config.scaling_factor)[:, :, None, None]
            std = torch.zeros_like(mean)
            tokens, mask = None, None
            for key in dict.fromkeys(keys):
                where = np.flatnonzero(np.asarray(keys) == key)
                condition = encode_image_condition(prompt_encoders, key, self._images(rows[where], key))
                if tokens is None:
                    tokens = condition.tokens.new_zeros((n, *condition.tokens.shape[1:]))
                    mask = condition.mask.new_zeros((n, condition.mask.shape[1]))
                tokens[where], mask[where] = condition.tokens, condition.mask
            condition = Condition(tokens, mask)
        else:
            vae = self.components["vae"]
            images = torch.empty((n, 1, *self.split.features[keys[0]].shape), device=self.device)
            for key in dict.fromkeys(keys):
                where = np.flatnonzero(np.asarray(keys) == key)
                images[where] = self._images(rows[where], key)
            posterior = vae.encode(images).latent_dist
            mean = posterior.mean * vae.config.scaling_factor
            std = posterior.std * vae.config.scaling_factor
            condition = encode_text_condition(prompt_encoders, self.components["tokenizer"], [self.reports[r] for r in rows], self.max_text_tokens)
        labels = torch.tensor([get_modality(k).contrast_index for k in keys], dtype=torch.long, device=self.device)
        return Encoded(mean, std, condition, labels)


def encode_all(encoder: FamilyEncoder, items: Items) -> Encoded:
    """Runs the frozen encoders over every item once (the latent cache)."""
    parts = [encoder(items, np.arange(start, min(start + ENCODE_CHUNK, len(items)))) for start in range(0, len(items), ENCODE_CHUNK)]
    condition = Condition.cat([p.condition for p in parts])
    return Encoded(
        torch.cat([p.latent_mean for p in parts]),
        torch.cat([p.latent_std for p in parts]),
        condition,
        torch.cat([p.class_labels for p in parts]),
    )


# ------------------------------------------------------------------------------------------- models


def load_components(output_root: Path, family: str, device: torch.device) -> dict[str, Any]:
    def need(name: str) -> Path:
        path = output_root / name
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist: run the earlier stage that writes it first (see training/recipes/tiny.sh)")
        return path

    components: dict[str, Any] = {
        "tokenizer": PreTrainedTokenizerFast.from_pretrained(str(need("tokenizer"))),
        "prompt_encoders": MedM2GPromptEncoders.from_pretrained(str(need("prompt_encoders")), use_safetensors=True),
    }
    if family == "text":
        components["text_vae"] = MedM2GTextVAE.from_pretrained(str(need("text_vae")), use_safetensors=True)
    else:
        components["vae"] = AutoencoderKL.from_pretrained(str(need("vae")), use_safetensors=True)
    for name, model in components.items():
        if isinstance(model, torch.nn.Module):
            model.to(device).eval().requires_grad_(False)
    return components


def build_unet(family: str, cfg: dict[str, Any], components: dict[str, Any], sample_size: int):
    cross_attention_dim = components["prompt_encoders"].config.embed_dim
    if family == "text":
        return MedM2GTextUNet(
            in_channels=components["text_vae"].config.text_latent_dim, cross_attention_dim=cross_attention_dim, **cfg["text_unet"]
        )
    vae = components["vae"]
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    # The contrasts the prompt encoders know (mri: T1/T2/PD/FLAIR in tiny.yaml), not every registered one.
    num_contrasts = len(components["prompt_encoders"].modality_keys(family)) if family in components["prompt_encoders"].families else 1
    return build_image_unet(
        sample_size=sample_size // downsample,
        latent_channels=vae.config.latent_channels,
        cross_attention_dim=cross_attention_dim,
        num_class_embeds=num_contrasts if num_contrasts > 1 else None,
        **cfg["unet"],
    )


def unet_kwargs(unet, encoded: Encoded) -> dict[str, Any]:
    kwargs = unet_condition_kwargs(unet, encoded.condition.tokens, encoded.condition.mask)
    if getattr(getattr(unet, "module", unet).config, "num_class_embeds", None):  # unet may be DDP-wrapped
        kwargs["class_labels"] = encoded.class_labels
    return kwargs


# --------------------------------------------------------------------------------------------- steps


def training_loss(unet, encoded: Encoded, noise_scheduler, cfg: dict[str, Any], generator: torch.Generator, device) -> torch.Tensor:
    """The diffusion loss of one batch (:func:`~medm2g_diffusers.single_flow.diffusion_loss`), with condition
    dropout; all randomness from ``generator``."""
    n = encoded.latent_mean.shape[0]
    latent_noise = torch.randn(encoded.latent_mean.shape, generator=generator).to(device)
    latents = encoded.latent_mean + encoded.latent_std * latent_noise
    keep = torch.rand(n, generator=generator).to(device) >= cfg["condition_dropout"]
    encoded = Encoded(encoded.latent_mean, encoded.latent_std, encoded.condition.drop(keep), encoded.class_labels)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, **unet_kwargs(unet, encoded)).sample
    target = training_target(noise_scheduler, latents, noise, timesteps)
    return diffusion_loss(prediction, target, noise_scheduler, timesteps, cfg.get("snr_gamma"))


@torch.no_grad()
def log_validation(unet, family: str, val_items: Items, val_encoder: FamilyEncoder, components, cfg, output_dir: Path, step: int, seed: int) -> dict[str, Any]:
    """Samples ``num_validation_samples`` validation items with guided DDIM; writes a PNG grid or a text file."""
    unet.eval()
    idx = np.arange(min(cfg["num_validation_samples"], len(val_items)))
    encoded = val_encoder(val_items, idx)
    generator = torch.Generator().manual_seed(seed)
    shape = (len(idx), *encoded.latent_mean.shape[1:])
    latents = sample_latents(
        unet, encoded.condition, shape, num_inference_steps=cfg["validation_inference_steps"], guidance_scale=cfg["guidance_scale"],
        generator=generator, class_labels=encoded.class_labels if getattr(unet.config, "num_class_embeds", None) else None,
        scheduler=make_sampling_scheduler(cfg["prediction_type"]),
    )
    out_dir = output_dir / "validation"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = val_items.rows[idx]
    if family == "text":
        text_vae = components["text_vae"]
        generated = text_vae.decode(latents[:, :, 0, 0] / text_vae.config.scaling_factor, components["tokenizer"])
        lines = [f"[{val_items.keys[i]}] real: {val_encoder.reports[r]}\n  generated: {g}\n" for i, r, g in zip(idx, rows, generated)]
        atomic_write_text(out_dir / f"step-{step}.txt", "\n".join(lines))
        unet.train()
        return {"step": step, "samples": generated}
    vae = components["vae"]
    fake = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    real = torch.stack([val_encoder._images(np.asarray([r]), val_items.keys[i])[0] for i, r in zip(idx, rows)])
    tiles = torch.cat([torch.cat([real[i, 0], fake[i, 0]], dim=1) for i in range(len(idx))], dim=0)
    write_png(
        out_dir / f"step-{step}.png", ((tiles + 1) / 2).cpu().numpy(),
        provenance={"model": f"medm2g single-flow {family} LDM (training validation, step {step})", "layout": "rows: real | generated"},
    )
    unet.train()
    return {"step": step, "grid": str(out_dir / f"step-{step}.png")}


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = load_config(args.config, args.set)
    cfg = stage_config(config, SECTION)
    cfg.update(cfg.get("families", {}).get(args.family, {}))
    if args.max_train_steps is not None:
        cfg["max_train_steps"] = args.max_train_steps
    seed = args.seed if args.seed is not None else cfg["seed"]
    output_root = Path(config.get("output_root", "runs/tiny"))
    output_dir = Path(args.output_dir) if args.output_dir else output_root / f"ldm_{args.family}"

    # Our schedules count optimizer steps; accelerate would otherwise step a prepared scheduler once per process.
    accelerator = Accelerator(mixed_precision=cfg.get("mixed_precision", "no"), step_scheduler_with_optimizer=False)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(seed)
    torch.manual_seed(seed)
    device = accelerator.device

    dataset = load_medm2g_dataset(args.dataset or config["data"]["dataset"])
    components = load_components(output_root, args.family, device)
    sample_size = config["data"]["size"]
    unet = build_unet(args.family, cfg, components, sample_size)
    ema = EMAModel(unet.parameters(), decay=cfg["ema_decay"], model_cls=type(unet), model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg["learning_rate"], weight_decay=cfg.get("adam_weight_decay", 1e-2))
    lr_scheduler = get_scheduler(
        cfg.get("lr_scheduler", "cosine"), optimizer, num_warmup_steps=cfg["lr_warmup_steps"], num_training_steps=cfg["max_train_steps"]
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(ema)
    cfg.setdefault("prediction_type", "epsilon")
    noise_scheduler = make_noise_scheduler(cfg["prediction_type"])

    encoded_families = components["prompt_encoders"].families
    train_items = enumerate_items(dataset["train"], args.family, condition_families=encoded_families)
    val_items = enumerate_items(dataset["validation"], args.family, allow_empty=True, condition_families=encoded_families)
    if not len(val_items):
        logger.warning("the validation split has no %s items: validation samples are skipped", args.family)
    train_encoder = FamilyEncoder(args.family, dataset["train"], components, cfg["max_text_tokens"], device)
    val_encoder = FamilyEncoder(args.family, dataset["validation"], components, cfg["max_text_tokens"], device)
    cache = None
    if cfg.get("cache_latents", True):
        started = time.perf_counter()
        cache = encode_all(train_encoder, train_items)
        logger.info("cached %d %s items in %.1f s", len(train_items), args.family, time.perf_counter() - started)

    start_step = 0
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        start_step = checkpoint_step(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, start_step)

    sampler = StepBatchSampler(len(train_items), cfg["train_batch_size"], seed, cfg["max_train_steps"], start_step, accelerator.process_index)
    # One line per step, flushed as written; opening it drops the records a resumed run will write again.
    step_log = StepLog(output_dir / "train_log.jsonl", start_step) if accelerator.is_main_process else None
    progress = tqdm(total=cfg["max_train_steps"], initial=start_step, desc=f"ldm {args.family}", disable=not accelerator.is_main_process)
    unet.train()
    history, started = [], time.perf_counter()
    for step, batch in enumerate(sampler, start=start_step):
        idx = np.asarray(batch)
        encoded = cache.index(torch.from_numpy(idx)) if cache is not None else train_encoder(train_items, idx)
        generator = step_generator(seed, step, accelerator.process_index)
        with accelerator.accumulate(unet):
            loss = training_loss(unet, encoded, noise_scheduler, cfg, generator, device)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.get("max_grad_norm"):
                accelerator.clip_grad_norm_(unet.parameters(), cfg["max_grad_norm"])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        done = step + 1
        record = {"step": done, "loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
        history.append(record)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        if step_log is not None:
            step_log.append(record)
        if done % cfg["checkpointing_steps"] == 0 or done == cfg["max_train_steps"]:
            save_checkpoint(accelerator, output_dir, done, keep=cfg.get("checkpoints_total_limit"))
        if accelerator.is_main_process and len(val_items) and (done % cfg["validation_steps"] == 0 or done == cfg["max_train_steps"]):
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            log_validation(accelerator.unwrap_model(unet), args.family, val_items, val_encoder, components, cfg, output_dir, done, seed)
            ema.restore(unet.parameters())
    progress.close()
    if step_log is not None:
        step_log.close()

    result = {"family": args.family, "steps": cfg["max_train_steps"], "start_step": start_step, "history": history,
              "train_seconds": time.perf_counter() - started}
    accelerator.wait_for_everyone()
    # Also when resumed at the last step: a run killed after its final checkpoint but before (or while) writing
    # the model still gets one, the same EMA weights the checkpoint holds.
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        ema.copy_to(final.parameters())
        # The sampling scheduler (and so the prediction type) the denoiser was trained for travels with it.
        atomic_save_pretrained(final, output_root / f"unet_{args.family}", also=[make_sampling_scheduler(cfg["prediction_type"])])
        result["model"] = str(output_root / f"unet_{args.family}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
