#!/usr/bin/env python
"""Stage 3 of MedM2G: cross-guided multi-flow training, and the source slots that serve image -> image.

Builds a :class:`MedM2GMultiFlowModel` from the stage-2 denoisers (``<output_root>/unet_<family>``), then runs
the rounds of the config's ``multiflow.rounds`` in order. Two kinds of round:

* ``joint`` (the paper's multi-flow rounds; default text-xray, then text-ct with the text side frozen, then
  ct-mri with the ct side frozen): the round's two ``streams`` are denoised together, each at its own
  timestep, each attending through θ_c to ``V`` of the other. Only ``V_m``, the adaptive tokens ``f_m`` and
  θ_c of the round's ``trainable`` families train (L_cross, summed over both sides). An image stream is
  conditioned on its report tokens, dropped to the null condition with probability
  ``joint_condition_dropout`` so the partner is sometimes its only source of information; the text stream
  has the null condition (it is generated from its partner).
* ``translation`` (image -> image): the ``target`` family learns to read clean sources. With
  ``image_conditioning: concat`` (default, ``shared/notes/image-to-image.md``) the sources fill the denoiser's
  source slots, the whole target denoiser trains, and each row keeps a random subset of its sources
  (``source_dropout``) and of its report (``translation_text_dropout``): a row with no source kept is a
  text -> image row, so one denoiser keeps serving every direction. With ``attention`` the sources reach the
  target only through θ_c as ``V_S(z_0^S, t=0)``, and only V and θ_c train (the paper's wiring, the
  measured alternative). Either way the condition tokens are the kept sources' prompt-encoder tokens,
  concatenated (multi-source), plus the report's when kept.

Frozen encoders run once over the training split before the first step (latent and token cache). Every
step's batch, contrast, dropouts, timesteps and noise are pure functions of ``(seed, step)``, so
``--resume_from_checkpoint latest`` reproduces an uninterrupted run. At the end of each round the model is
saved under ``<output_dir>/rounds/<name>`` (default ``<output_root>/multiflow_training``) with validation losses (with vs. without the partner / sources) in
``<output_dir>/validation.json``; the final model goes to ``<output_root>/multiflow`` with the sampling
scheduler it was trained for, and the whole :class:`MedM2GPipeline` (with the stage-0/1 components) to
``<output_root>/pipeline``. Run:

    accelerate launch training/train_multiflow.py --config training/configs/tiny.yaml
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
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.latent_cache import (
    EncodedSplit,
    all_present,
    composite_condition,
    draw_latent,
    encode_split,
    null_condition,
    report_condition,
)
from medm2g_diffusers.modalities import get_modality, image_modality_keys, modalities_of_family
from medm2g_diffusers.models.multiflow import MedM2GMultiFlowModel, is_text_family
from medm2g_diffusers.models.prompt_encoders import MedM2GPromptEncoders
from medm2g_diffusers.models.text_unet import MedM2GTextUNet
from medm2g_diffusers.models.text_vae import MedM2GTextVAE
from medm2g_diffusers.pipelines import MedM2GPipeline
from medm2g_diffusers.single_flow import Condition, diffusion_loss, make_noise_scheduler, make_sampling_scheduler, training_target
from medm2g_diffusers.training_utils import (
    StepBatchSampler,
    atomic_save_pretrained,
    atomic_write_text,
    base_argument_parser,
    checkpoint_step,
    load_config,
    lr_lambda_for,
    resolve_checkpoint,
    save_checkpoint,
    stage_config,
    step_generator,
)

logger = logging.getLogger(__name__)

SECTION = "multiflow"
ROUND_KINDS = ("joint", "translation")
IMAGE_CONDITIONING = ("concat", "attention")
VALIDATION_TIMESTEPS = (100, 500, 900)


def parse_args(argv: list[str] | None = None):
    parser = base_argument_parser("Stage 3: cross-guided multi-flow training and image -> image source slots.")
    parser.add_argument(
        "--image_conditioning", choices=IMAGE_CONDITIONING, default=None,
        help="how clean sources enter an image denoiser (default: the config's multiflow.image_conditioning)",
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- rounds


def build_rounds(cfg: dict[str, Any], max_train_steps: int | None) -> list[dict[str, Any]]:
    """The schedule: ``{name, kind, steps, start, ...}`` per round; ``max_train_steps`` rescales every round
    proportionally (each keeps at least one step), so a short run still visits every round."""
    rounds = [dict(r) for r in cfg["rounds"]]
    for r in rounds:
        if r.get("kind") not in ROUND_KINDS:
            raise ValueError(f"multiflow.rounds[{r.get('name')!r}].kind must be one of {ROUND_KINDS}; got {r.get('kind')!r}")
        required = ("name", "steps") + (("streams", "trainable") if r["kind"] == "joint" else ("target",))
        missing = [key for key in required if key not in r]
        if missing:
            raise ValueError(f"multiflow.rounds[{r.get('name')!r}] ({r['kind']}) needs {missing}")
        if r["kind"] == "joint" and len(r["streams"]) != 2:
            raise ValueError(f"multiflow.rounds[{r['name']!r}].streams must be two families; got {r['streams']}")
    total = sum(int(r["steps"]) for r in rounds)
    if max_train_steps is not None:
        if max_train_steps < len(rounds):
            raise ValueError(f"max_train_steps must be at least the number of rounds ({len(rounds)}); got {max_train_steps}")
        scaled = [max(1, int(round(int(r["steps"]) * max_train_steps / total))) for r in rounds]
        scaled[-1] = max(1, max_train_steps - sum(scaled[:-1]))
        for r, steps in zip(rounds, scaled):
            r["steps"] = steps
    start = 0
    for r in rounds:
        r["steps"], r["start"] = int(r["steps"]), start
        start += r["steps"]
    return rounds


# ------------------------------------------------------------------------------------------------ data


def round_rows(data: EncodedSplit, round_: dict[str, Any], model: MedM2GMultiFlowModel) -> np.ndarray:
    """Rows a round can train on: every stream present (joint), or the target present (translation)."""
    if round_["kind"] == "joint":
        needed = [modalities_of_family(family)[0] if family != "text" else "text" for family in round_["streams"]]
    else:
        needed = [modalities_of_family(round_["target"])[0]]
        if not model.source_slots_of(round_["target"]):  # attention route: a row needs a source to learn from
            sources = [k for k in round_sources(round_, model) if k in data.present]
            any_source = torch.stack([data.present[k] for k in sources]).any(0) if sources else torch.zeros(data.num_rows, dtype=torch.bool)
            return np.flatnonzero((all_present(data, needed) & any_source).numpy())
    return np.flatnonzero(all_present(data, needed).numpy())


def round_sources(round_: dict[str, Any], model: MedM2GMultiFlowModel) -> list[str]:
    """The source modalities a translation round conditions on: its ``sources`` or the target's slots."""
    sources = round_.get("sources") or model.source_slots_of(round_["target"])
    refused = [key for key in sources if key not in model.accepted_sources(round_["target"])]
    if refused or not sources:
        raise ValueError(
            f"multiflow.rounds[{round_['name']!r}] needs sources the {round_['target']!r} denoiser accepts "
            f"({model.accepted_sources(round_['target'])}); got {sources}"
        )
    return list(sources)


# ------------------------------------------------------------------------------------------------ steps


def stream_key(model: MedM2GMultiFlowModel, family: str, generator: torch.Generator) -> str:
    """The modality a family is denoised as in a step: MRI draws one of the contrasts its denoiser knows for the
    whole batch."""
    keys = (model.module if hasattr(model, "module") else model).modality_keys(family)
    return keys[int(torch.randint(len(keys), (1,), generator=generator))] if len(keys) > 1 else keys[0]


def joint_step(model, data, rows, round_, cfg, noise_scheduler, generator, device, cross_guidance_scale: float = 1.0):
    """L_cross of one joint step over both streams; returns ``(loss, per-stream losses)``."""
    batch, dim = len(rows), data.tokens["text"].shape[-1]
    latents, targets, timesteps, conditions = {}, {}, {}, {}
    for family in round_["streams"]:
        key = "text" if family == "text" else stream_key(model, family, generator)
        clean = draw_latent(data, key, rows, generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        latents[key] = noise_scheduler.add_noise(clean, noise, t).to(device)
        targets[key] = training_target(noise_scheduler, clean, noise, t).to(device)
        timesteps[key] = t.to(device)
        if family == "text":
            conditions[key] = null_condition(batch, dim)
        else:
            keep = torch.rand(batch, generator=generator) >= float(cfg["joint_condition_dropout"])
            conditions[key] = report_condition(data, rows, keep)
        conditions[key] = Condition(conditions[key].tokens.to(device), conditions[key].mask.to(device))
    predictions = model(latents, timesteps, conditions, cross_guidance_scale=cross_guidance_scale)
    losses = {key: diffusion_loss(predictions[key], targets[key], noise_scheduler, timesteps[key], cfg.get("snr_gamma")) for key in latents}
    return sum(losses.values()), {key: value.item() for key, value in losses.items()}


def translation_step(model, data, rows, round_, cfg, noise_scheduler, generator, device, use_sources: bool = True):
    """One image -> image step for the round's target; returns ``(loss, {target key: loss})``."""
    unwrapped = model.module if hasattr(model, "module") else model
    family, batch = round_["target"], len(rows)
    key = stream_key(unwrapped, family, generator)
    clean = draw_latent(data, key, rows, generator)
    sources = [s for s in round_sources(round_, unwrapped) if s != key and s in data.latent_mean]
    concat = bool(unwrapped.source_slots_of(family))
    source_latents, keep, parts = {}, {}, []
    if not is_text_family(family):  # an image target may also read its report; a report target is the report
        text_keep = torch.rand(batch, generator=generator) >= float(cfg["translation_text_dropout"])
        parts.append((data.tokens["text"][rows], data.text_mask[rows] * (text_keep & data.present["text"][rows]).unsqueeze(1)))
    for source in sources:
        present = data.present[source][rows]
        dropped = torch.rand(batch, generator=generator) < float(cfg["source_dropout"])
        keep[source] = present & (~dropped if concat and use_sources else torch.ones_like(present)) & use_sources
        source_latents[source] = draw_latent(data, source, rows, generator).to(device)
        tokens = data.tokens[source][rows]
        parts.append((tokens, keep[source].unsqueeze(1).expand(batch, tokens.shape[1])))
    condition = composite_condition(parts)
    cfg_keep = torch.rand(batch, generator=generator) >= float(cfg["condition_dropout"])
    condition = condition.drop(cfg_keep)  # classifier-free guidance drops the tokens; sources stay
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = noise_scheduler.add_noise(clean, noise, t).to(device)
    target = training_target(noise_scheduler, clean, noise, t).to(device)
    if concat:
        stream_sources = source_latents
        source_keep = {s: k.to(device) for s, k in keep.items()}
    else:  # attention route: every kept source goes through V_S(z_0^S); rows were chosen to have one
        stream_sources = {s: source_latents[s] for s in sources if bool(keep[s].all())} if use_sources else {}
        source_keep = {}
    prediction = model(
        {key: noisy}, {key: t.to(device)}, {key: Condition(condition.tokens.to(device), condition.mask.to(device))},
        sources={key: stream_sources}, source_keep={key: source_keep},
    )[key]
    loss = diffusion_loss(prediction, target, noise_scheduler, t.to(device), cfg.get("snr_gamma"))
    return loss, {key: loss.item()}


@torch.no_grad()
def validation_losses(model, data: EncodedSplit, round_, cfg, noise_scheduler, seed: int, device) -> dict[str, Any]:
    """Denoising loss (plain MSE) on validation rows at fixed timesteps, with the partner / sources and without them.

    Joint rounds compare ``cross_guidance_scale`` 1 vs 0 (the coupling); translation rounds compare with vs.
    without sources. A lower "with" loss says the stream learned to use what it is given."""
    unwrapped = model.module if hasattr(model, "module") else model
    rows_all = round_rows(data, round_, unwrapped)[: int(cfg["num_validation_rows"])]
    if not len(rows_all):
        return {}
    rows = torch.from_numpy(rows_all)
    results = {}
    for label, setting in (("with", True), ("without", False)):
        total = []
        for t in VALIDATION_TIMESTEPS:
            generator = torch.Generator().manual_seed(seed + t)
            # Plain MSE at each fixed timestep: a loss weight per timestep (snr_gamma) would only rescale each term,
            # and unweighted losses stay comparable between runs trained with and without it.
            fixed = {**cfg, "joint_condition_dropout": 1.0, "condition_dropout": 0.0, "source_dropout": 0.0, "translation_text_dropout": 1.0,
                     "snr_gamma": None}
            scheduler = _FixedTimesteps(noise_scheduler, t)
            if round_["kind"] == "joint":
                loss, _ = joint_step(model, data, rows, round_, fixed, scheduler, generator, device, 1.0 if setting else 0.0)
            else:
                loss, _ = translation_step(model, data, rows, round_, fixed, scheduler, generator, device, use_sources=setting)
            total.append(loss.item())
        results[label] = {"mean": float(np.mean(total)), **{f"t={t}": v for t, v in zip(VALIDATION_TIMESTEPS, total)}}
    results["rows"] = len(rows)
    return results


class _FixedTimesteps:
    """A noise scheduler whose ``torch.randint`` draws are replaced by one timestep (validation only)."""

    def __init__(self, scheduler, timestep: int):
        self._scheduler, self._timestep = scheduler, timestep
        self.config = type("Config", (), {"num_train_timesteps": timestep + 1, "prediction_type": scheduler.config.prediction_type})()

    def add_noise(self, clean, noise, t):
        return self._scheduler.add_noise(clean, noise, torch.full_like(t, self._timestep))

    def get_velocity(self, clean, noise, t):
        return self._scheduler.get_velocity(clean, noise, torch.full_like(t, self._timestep))


# ----------------------------------------------------------------------------------------------- models


def load_components(output_root: Path, device) -> dict[str, Any]:
    def need(name: str) -> Path:
        path = output_root / name
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist: run the earlier stage that writes it first (see training/recipes/tiny.sh)")
        return path

    components = {
        "tokenizer": PreTrainedTokenizerFast.from_pretrained(str(need("tokenizer"))),
        "prompt_encoders": MedM2GPromptEncoders.from_pretrained(str(need("prompt_encoders")), use_safetensors=True),
        "vae": AutoencoderKL.from_pretrained(str(need("vae")), use_safetensors=True),
        "text_vae": MedM2GTextVAE.from_pretrained(str(need("text_vae")), use_safetensors=True),
    }
    for model in components.values():
        if isinstance(model, torch.nn.Module):
            model.to(device).eval().requires_grad_(False)
    return components


def load_single_flow(output_root: Path, families: list[str]) -> tuple[dict[str, torch.nn.Module], str]:
    """The stage-2 denoisers and the prediction type they share (from the scheduler saved beside each)."""
    unets, prediction_types = {}, {}
    for family in families:
        path = output_root / f"unet_{family}"
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist: train it with training/train_ldm.py --family {family}")
        unets[family] = (MedM2GTextUNet if is_text_family(family) else UNet2DConditionModel).from_pretrained(str(path), use_safetensors=True)
        scheduler_config = path / "scheduler_config.json"
        prediction_types[family] = (
            DDIMScheduler.from_pretrained(str(path)).config.prediction_type if scheduler_config.is_file() else "epsilon"
        )
    if len(set(prediction_types.values())) != 1:
        raise ValueError(f"the stage-2 denoisers were trained for different prediction types {prediction_types}; retrain them with one")
    return unets, next(iter(prediction_types.values()))


def build_model(cfg: dict[str, Any], unets: dict[str, torch.nn.Module], image_conditioning: str) -> MedM2GMultiFlowModel:
    slots = {family: list(keys) for family, keys in (cfg.get("source_slots") or {}).items() if family in unets}
    report_sources = [family for family in cfg.get("report_sources") or [] if family in unets] if "text" in unets else []
    return MedM2GMultiFlowModel.from_single_flow(
        unets,
        cfg.get("context_encoder") or {},
        apply_to_self_attention=bool(cfg.get("apply_to_self_attention", False)),
        source_slots=slots if image_conditioning == "concat" else None,
        source_guidance=image_conditioning == "attention",
        report_sources=report_sources,
    )


def initialise_adaptive_tokens(model: MedM2GMultiFlowModel, data: EncodedSplit, seed: int) -> None:
    """f_m from sampled C_m token embeddings of up to 64 training rows per family."""
    generator = torch.Generator().manual_seed(seed)
    for family, encoder in model.context_encoders.items():
        keys = ["text"] if family == "text" else [k for k in modalities_of_family(family) if k in data.tokens]
        rows = [torch.nonzero(data.present[k]).flatten()[:64] for k in keys]
        embeddings = torch.cat([data.tokens[k][r].flatten(0, 1) for k, r in zip(keys, rows)])
        if family == "text":
            embeddings = embeddings[data.text_mask[rows[0]].flatten().bool()]
        encoder.initialize_adaptive_tokens(embeddings, generator)


def trainable_for(model: MedM2GMultiFlowModel, round_: dict[str, Any]) -> list[torch.nn.Parameter]:
    if round_["kind"] == "joint":
        return model.trainable_parameters(round_["trainable"])
    target = round_["target"]
    denoisers = [target] if trains_denoiser(model, round_) else []
    if model.source_slots_of(target):
        return model.trainable_parameters([target], denoisers=denoisers)
    source_families = {get_modality(k).family for k in round_sources(round_, model)}
    return model.trainable_parameters(sorted(source_families | {target}), denoisers=denoisers)


def trains_denoiser(model: MedM2GMultiFlowModel, round_: dict[str, Any]) -> bool:
    """Whether a round trains its target's whole denoiser (at ``denoiser_learning_rate``). ``train_denoiser`` decides;
    by default a translation round into source slots does (the widened first convolution must learn to read them)
    and one through θ_c only (V_S(z_0), a report's route) trains just V_S and θ_c."""
    if round_["kind"] != "translation":
        return False
    return bool(round_.get("train_denoiser", bool(model.source_slots_of(round_["target"]))))


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = load_config(args.config, args.set)
    cfg = stage_config(config, SECTION)
    image_conditioning = args.image_conditioning or cfg.get("image_conditioning", "concat")
    if image_conditioning not in IMAGE_CONDITIONING:
        raise ValueError(f"multiflow.image_conditioning must be one of {IMAGE_CONDITIONING}; got {image_conditioning!r}")
    seed = args.seed if args.seed is not None else int(cfg.get("seed", 0))
    output_root = Path(config.get("output_root", "runs/tiny"))
    model_dir = output_root / str(cfg.get("model_name", "multiflow"))
    pipeline_dir = output_root / str(cfg.get("pipeline_name", "pipeline"))
    output_dir = Path(args.output_dir) if args.output_dir else output_root / f"{model_dir.name}_training"
    for name, path in (("model", model_dir), ("pipeline", pipeline_dir)):
        # The final save replaces that folder whole: checkpoints and logs inside it would be lost.
        if output_dir.resolve() == path.resolve() or path.resolve() in output_dir.resolve().parents:
            raise ValueError(f"--output_dir {output_dir} must not be (inside) the {name} folder {path}, which the final save replaces")

    accelerator = Accelerator(
        mixed_precision=cfg.get("mixed_precision", "no"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        step_scheduler_with_optimizer=False,  # the round schedules count optimizer steps, not steps x processes
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(seed)
    device = accelerator.device
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    dataset = load_medm2g_dataset(args.dataset or config["data"]["dataset"])
    components = load_components(output_root, device)
    families = list(cfg.get("families") or ["text", "xray", "ct", "mri"])
    unets, prediction_type = load_single_flow(output_root, families)
    model = build_model(cfg, unets, image_conditioning)
    rounds = build_rounds(cfg, args.max_train_steps)
    total_steps = rounds[-1]["start"] + rounds[-1]["steps"]

    keys = [k for k in image_modality_keys() if get_modality(k).family in families]
    started = time.perf_counter()
    train_data = encode_split(dataset["train"], components, keys, int(cfg["max_text_tokens"]), device)
    validation_split = dataset["validation"].select(range(min(dataset["validation"].num_rows, int(cfg["num_validation_rows"]) * 4)))
    validation_data = encode_split(validation_split, components, keys, int(cfg["max_text_tokens"]), device)
    logger.info("encoded %d training rows in %.1f s", train_data.num_rows, time.perf_counter() - started)
    initialise_adaptive_tokens(model, train_data, seed)

    # One optimizer over everything any round trains; a round freezes the rest (AdamW skips grad-less params).
    ever = {id(p) for r in rounds for p in trainable_for(model, r)}
    denoiser_ids = {id(p) for r in rounds if trains_denoiser(model, r) for p in model.unets[r["target"]].parameters()}
    params = [p for p in model.parameters() if id(p) in ever]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if id(p) not in denoiser_ids], "lr": float(cfg["learning_rate"])},
            {"params": [p for p in params if id(p) in denoiser_ids], "lr": float(cfg["denoiser_learning_rate"])},
        ],
        weight_decay=float(cfg.get("adam_weight_decay", 1e-2)),
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(rounds, int(cfg["lr_warmup_steps"])))
    # DDP averages the gradients of the parameters that require grad when it wraps the model, and collecting
    # `ever` left only the last round's trainable: every round's parameters are marked before wrapping. Each
    # round then freezes what it does not train; find_unused_parameters leaves their grads None (AdamW skips them).
    for p in model.parameters():
        p.requires_grad_(id(p) in ever)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    noise_scheduler = make_noise_scheduler(prediction_type)

    global_step = 0
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        global_step = checkpoint_step(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, global_step)

    validation_path = output_dir / "validation.json"
    validation = json.loads(validation_path.read_text()) if validation_path.is_file() else {}
    log_path = output_dir / "train_log.jsonl"
    progress = tqdm(total=total_steps, initial=global_step, desc="multiflow", disable=not accelerator.is_local_main_process)
    history, round_seconds = [], {}
    model.train()
    for round_ in rounds:
        end = round_["start"] + round_["steps"]
        if global_step >= end:
            continue
        rows = round_rows(train_data, round_, accelerator.unwrap_model(model))
        if not len(rows):
            raise ValueError(f"round {round_['name']!r} has no training rows with {round_.get('streams') or round_['target']}")
        trainable_for(accelerator.unwrap_model(model), round_)
        sampler = StepBatchSampler(len(rows), int(cfg["train_batch_size"]), seed, end, global_step, accelerator.process_index)
        round_started = time.perf_counter()
        for step, batch in zip(range(global_step, end), sampler):
            generator = step_generator(seed, step, accelerator.process_index)
            batch_rows = torch.from_numpy(rows[np.asarray(batch)])
            run = joint_step if round_["kind"] == "joint" else translation_step
            loss, parts = run(model, train_data, batch_rows, round_, cfg, noise_scheduler, generator, device)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.get("max_grad_norm"):
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float(cfg["max_grad_norm"]))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step = step + 1
            record = {"step": global_step, "round": round_["name"], "loss": loss.item(), **{f"loss_{k}": v for k, v in parts.items()}}
            history.append(record)
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.4f}", round=round_["name"])
            if accelerator.is_main_process:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if global_step % int(cfg["checkpointing_steps"]) == 0 and global_step < total_steps:
                save_checkpoint(accelerator, output_dir, global_step, keep=cfg.get("checkpoints_total_limit"))
        round_seconds[round_["name"]] = time.perf_counter() - round_started
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.eval()
            validation[round_["name"]] = {
                "step": global_step,
                "seconds": round_seconds[round_["name"]],
                "loss": validation_losses(unwrapped, validation_data, round_, cfg, noise_scheduler, seed, device),
            }
            unwrapped.train()
            atomic_write_text(validation_path, json.dumps(validation, indent=2))
            atomic_save_pretrained(unwrapped, output_dir / "rounds" / round_["name"])
            logger.info("round %s: %s", round_["name"], validation[round_["name"]])
    progress.close()

    save_checkpoint(accelerator, output_dir, global_step, keep=cfg.get("checkpoints_total_limit"))
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model).eval()
        atomic_save_pretrained(final, model_dir, also=[make_sampling_scheduler(prediction_type)])
        logger.info("saved the multi-flow model to %s", model_dir)
        # The whole pipeline, as MedM2GPipeline.from_pretrained and `medm2g generate --model` load it.
        pipeline = MedM2GPipeline(
            multiflow=final, vae=components["vae"], text_vae=components["text_vae"], prompt_encoders=components["prompt_encoders"],
            tokenizer=components["tokenizer"], scheduler=make_sampling_scheduler(prediction_type),
        )
        atomic_save_pretrained(pipeline, pipeline_dir)
        logger.info("saved the pipeline to %s", pipeline_dir)
    accelerator.end_training()
    return {"history": history, "validation": validation, "round_seconds": round_seconds, "model_dir": str(model_dir),
            "pipeline_dir": str(pipeline_dir)}


if __name__ == "__main__":
    main()
