"""Single-flow conditional latent diffusion (stage 2): what ``train_ldm.py``, its validation and the
benchmark's single-flow baseline share.

A single flow denoises one family's latents conditioned on the prompt-encoder tokens of another modality:
report tokens for the image families (text -> X-ray / CT / MRI) and image tokens for the text family
(image -> report). The noise schedule is the paper's: 1000 steps, linear betas 0.00085-0.012,
``clip_sample=False``; sampling is DDIM with classifier-free guidance. The prediction target is the paper's
epsilon or, as a config option, v (``prediction_type``; docs/decisions.md says which the tiny model uses and why).

The unconditional ("null") condition is one all-zero token with every other token masked out. It is what
the 10 % condition dropout trains and what guidance contrasts against, and it has the same shape as any
real condition, so conditional and unconditional run in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor

NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "clip_sample": False,
}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    return prediction_type


def make_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training scheduler (adds noise); DDPM with the paper's linear betas."""
    return DDPMScheduler(**NOISE_SCHEDULE, prediction_type=_check_prediction_type(prediction_type))


def make_sampling_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM with the same betas (Stable Diffusion's ``steps_offset=1``, ``set_alpha_to_one=False``)."""
    return DDIMScheduler(
        **NOISE_SCHEDULE, prediction_type=_check_prediction_type(prediction_type), steps_offset=1, set_alpha_to_one=False
    )


def sampling_scheduler_for(model_dir) -> DDIMScheduler:
    """The sampling scheduler a stage-2/3 model was trained for: its saved ``scheduler_config.json``, or the
    paper's epsilon DDIM for a folder without one (models saved before the prediction type was an option)."""
    if (Path(model_dir) / "scheduler_config.json").is_file():
        return DDIMScheduler.from_pretrained(str(model_dir))
    return make_sampling_scheduler("epsilon")


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser regresses: the noise (epsilon) or the velocity ``sqrt(a) * noise - sqrt(1 - a) * x0``."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    noise_scheduler,
    timesteps: torch.Tensor,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error of the denoiser's prediction; with ``snr_gamma``, each sample weighted by Min-SNR-gamma
    (Hang et al., 2023), which caps the weight of the easy low-noise timesteps.

    The weight is ``min(SNR, gamma) / SNR`` for epsilon and ``min(SNR, gamma) / (SNR + 1)`` for v, so that it
    is ``min(SNR, gamma)`` on the clean-latent error either way, as diffusers' example training scripts weight it.
    ``timesteps`` is the ``(batch,)`` timesteps the noise was added at.
    """
    if not snr_gamma:
        return F.mse_loss(prediction.float(), target.float())
    if snr_gamma < 0:
        raise ValueError(f"snr_gamma must be positive (or None/0 for a plain mean); got {snr_gamma}")
    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=float(snr_gamma))
    weights = clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (weights.to(per_sample.device) * per_sample).mean()


@dataclass
class Condition:
    """Condition tokens and their mask.

    Args:
        tokens (`torch.Tensor` of shape `(batch, num_tokens, dim)`): prompt-encoder tokens.
        mask (`torch.Tensor` of shape `(batch, num_tokens)`): 1 for a token to attend to, 0 for padding.
    """

    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if self.tokens.ndim != 3 or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"tokens must be (batch, num_tokens, dim) and mask (batch, num_tokens); got {tuple(self.tokens.shape)} "
                f"and {tuple(self.mask.shape)}"
            )

    def null(self) -> "Condition":
        """The unconditional condition of the same shape: one zero token, the rest masked."""
        mask = torch.zeros_like(self.mask)
        mask[:, 0] = 1
        return Condition(torch.zeros_like(self.tokens), mask)

    def drop(self, keep: torch.Tensor) -> "Condition":
        """Replaces the rows where ``keep (batch,)`` is False by the null condition (classifier-free dropout)."""
        null = self.null()
        keep_tokens = keep.view(-1, 1, 1).to(self.tokens.dtype)
        keep_mask = keep.view(-1, 1).to(self.mask.dtype)
        return Condition(self.tokens * keep_tokens, self.mask * keep_mask + null.mask * (1 - keep_mask))

    def index(self, rows: torch.Tensor | slice | list[int]) -> "Condition":
        return Condition(self.tokens[rows], self.mask[rows])

    @staticmethod
    def cat(conditions: list["Condition"]) -> "Condition":
        """Concatenates along the batch, right-padding shorter token sequences with masked zeros."""
        length = max(c.tokens.shape[1] for c in conditions)
        tokens, masks = [], []
        for c in conditions:
            pad = length - c.tokens.shape[1]
            tokens.append(torch.nn.functional.pad(c.tokens, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(c.mask, (0, pad)))
        return Condition(torch.cat(tokens), torch.cat(masks))


@torch.no_grad()
def encode_text_condition(prompt_encoders, tokenizer, reports: list[str], max_length: int) -> Condition:
    """Report tokens from the text prompt encoder: ``(batch, length <= max_length, embed_dim)``."""
    device = next(prompt_encoders.parameters()).device
    batch = tokenizer(reports, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    output = prompt_encoders.encode("text", {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)})
    return Condition(output.tokens, batch["attention_mask"].to(device))


@torch.no_grad()
def encode_image_condition(prompt_encoders, modality_key: str, images: torch.Tensor) -> Condition:
    """Image tokens from the image prompt encoder; ``images (batch, 1, H, W)`` in ``[-1, 1]``."""
    output = prompt_encoders.encode(modality_key, images)
    return Condition(output.tokens, torch.ones(output.tokens.shape[:2], dtype=torch.long, device=output.tokens.device))


def pooled_condition(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The masked mean ``(batch, dim)`` of condition tokens ``(batch, num_tokens, dim)``: zero for the null
    condition, so classifier-free guidance contrasts it exactly as it contrasts the tokens."""
    if mask is None:
        return tokens.mean(1)
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def unet_condition_kwargs(unet, tokens: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The condition keyword arguments of a denoiser call: the tokens it cross-attends to and, for a denoiser
    built with a pooled condition (``time_cond_proj_dim``), their masked mean as ``timestep_cond``.

    Every call site goes through this function: diffusers skips ``timestep_cond`` silently when it is missing,
    which would leave a pooled-condition denoiser without half of its condition.
    """
    kwargs = {"encoder_hidden_states": tokens, "encoder_attention_mask": mask}
    config = getattr(unet, "module", unet).config  # unet may be DDP-wrapped
    if getattr(config, "time_cond_proj_dim", None):
        kwargs["timestep_cond"] = pooled_condition(tokens, mask)
    return kwargs


def build_image_unet(
    sample_size: int,
    latent_channels: int,
    cross_attention_dim: int,
    block_out_channels: list[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 32,
    num_class_embeds: int | None = None,
    norm_num_groups: int = 32,
    pooled_condition: bool = False,
) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` for one imaging family.

    Cross-attention only below the top resolution: attention over every latent pixel is the CPU's most
    expensive layer and, at 16x16, buys little. ``num_class_embeds`` is the MRI contrast embedding (the
    class label is the registry's ``contrast_index``). ``pooled_condition`` also adds the condition tokens'
    masked mean to the timestep embedding (diffusers' ``time_cond_proj_dim``, read by
    :func:`unet_condition_kwargs`), so every ResNet block, the attention-free 16x16 ones included, sees the
    report's global content (docs/decisions.md).
    """
    levels = len(block_out_channels)
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1)
    up = ["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"]
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=min(norm_num_groups, min(block_out_channels)),
        num_class_embeds=num_class_embeds,
        time_cond_proj_dim=cross_attention_dim if pooled_condition else None,
    )


@torch.no_grad()
def sample_latents(
    unet,
    condition: Condition,
    shape: tuple[int, ...],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 2.0,
    generator: torch.Generator | None = None,
    class_labels: torch.Tensor | None = None,
    scheduler=None,
) -> torch.Tensor:
    """Guided DDIM sampling of one flow; returns scaled latents of ``shape`` (divide by the VAE's factor to decode).

    Conditional and unconditional predictions run in one batch of ``2 * batch``.
    """
    scheduler = scheduler or make_sampling_scheduler()
    scheduler.set_timesteps(num_inference_steps)
    device = condition.tokens.device
    latents = randn_tensor(shape, generator=generator, device=device, dtype=condition.tokens.dtype)
    latents = latents * scheduler.init_noise_sigma
    both = Condition.cat([condition.null(), condition])
    labels = None if class_labels is None else torch.cat([class_labels, class_labels])
    extra = {} if labels is None else {"class_labels": labels}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        noise = unet(model_input, t, **unet_condition_kwargs(unet, both.tokens, both.mask), **extra).sample
        uncond, cond = noise.chunk(2)
        noise = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents
