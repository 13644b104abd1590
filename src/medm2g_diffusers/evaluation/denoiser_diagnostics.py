"""How well a trained denoiser knows the data, independent of its parameterisation (epsilon or v).

An epsilon-MSE is not comparable between an epsilon- and a v-prediction model, and at large t a small
epsilon error hides a large error on the clean latent (``x0_err = eps_err * (1 - a) / a``, with
``a = alphas_cumprod[t]`` about 0.005 at t = 999 for the paper's betas). Both parameterisations imply a
prediction of the clean latent; its error at a few timesteps, and the spread of latents sampled from pure
noise against that of real latents, say whether sampling can work.
"""

from __future__ import annotations

from typing import Any

import torch

from ..single_flow import Condition, make_noise_scheduler, sample_latents, unet_condition_kwargs

TIMESTEPS = (50, 300, 700, 999)


def predicted_clean_latent(prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, scheduler) -> torch.Tensor:
    """x0 implied by an epsilon or v prediction at ``timesteps`` (`(batch,)`)."""
    alpha = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * prediction
    return (noisy - (1 - alpha).sqrt() * prediction) / alpha.sqrt()


@torch.no_grad()
def denoiser_diagnostics(
    unet,
    sampling_scheduler,
    latents: torch.Tensor,
    condition: Condition,
    class_labels: torch.Tensor | None = None,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 2.0,
) -> dict[str, Any]:
    r"""
    Args:
        unet: a single-flow denoiser (``UNet2DConditionModel`` or ``MedM2GTextUNet``).
        sampling_scheduler: the scheduler it was trained for (its ``prediction_type`` matters).
        latents (`torch.Tensor` of shape `(batch, C, H, W)`): real scaled clean latents.
        condition (`Condition`): their conditions.

    Returns:
        `dict`: ``x0_mse_t<t>`` per timestep of :data:`TIMESTEPS` (mean squared error of the implied clean
        latent), ``real_latent_var``, ``real_latent_std`` and ``sampled_latent_std`` (guided DDIM from noise).
    """
    noise_scheduler = make_noise_scheduler(sampling_scheduler.config.prediction_type)
    generator = torch.Generator().manual_seed(seed)
    extra = {} if class_labels is None else {"class_labels": class_labels}
    result: dict[str, Any] = {"real_latent_std": latents.std().item(), "real_latent_var": latents.var().item()}
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.full((len(latents),), t, device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, **unet_condition_kwargs(unet, condition.tokens, condition.mask), **extra).sample
        clean = predicted_clean_latent(prediction, noisy, timesteps, noise_scheduler)
        result[f"x0_mse_t{t}"] = torch.mean((clean - latents) ** 2).item()
    sampled = sample_latents(
        unet, condition, tuple(latents.shape), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed), class_labels=class_labels, scheduler=sampling_scheduler,
    )
    result["sampled_latent_std"] = sampled.std().item()
    return result
