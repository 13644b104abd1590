"""Training a :class:`~medm2g_diffusers.evaluation.finding_classifier.MedM2GFindingClassifier` on arrays.

Arrays rather than a dataset, so that the data-augmentation experiment can train on N real images plus M
generated ones with the same call. Every random draw (initialisation, batch order, augmentation) comes from
``seed``: the same call gives the same weights on the same machine.

Augmentation never flips: a left pleural effusion mirrored is a right one, and the findings' side is part of
what the benchmark checks. It shifts by a few pixels, jitters contrast and brightness and adds noise, none of
which moves a finding from one side to the other or out of the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .finding_classifier import MedM2GFindingClassifier, check_finding_types, default_input_windows


@dataclass(frozen=True)
class ClassifierAugmentation:
    """Label-preserving augmentation of ``[-1, 1]`` images (no flips: left and right are findings' attributes).

    Args:
        max_shift: largest translation in pixels, each axis (edges replicated, not wrapped).
        contrast: the image is scaled about its mean by a factor in ``[1 - contrast, 1 + contrast]``.
        brightness: an offset in ``[-brightness, brightness]`` is added.
        noise_std: largest standard deviation of added Gaussian noise (drawn per image in ``[0, noise_std]``).

    The default noise (0.005, i.e. 5 HU on the CT model range) stays below the contrasts the phantoms draw
    (oedema vs white matter 8 HU, an acute bleed vs grey matter 30 HU; head CT noise is 3 HU).
    """

    max_shift: int = 2
    contrast: float = 0.05
    brightness: float = 0.01
    noise_std: float = 0.005

    def __post_init__(self):
        if self.max_shift < 0 or self.contrast < 0 or self.brightness < 0 or self.noise_std < 0:
            raise ValueError(f"augmentation magnitudes must be >= 0; got {self}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``images`` (`(B, 1, H, W)`) -> augmented images of the same shape, clipped to ``[-1, 1]``."""
        batch = images.shape[0]
        if self.max_shift:
            s = self.max_shift
            padded = F.pad(images, (s, s, s, s), mode="replicate")
            offsets = torch.randint(0, 2 * s + 1, (batch, 2), generator=generator)
            h, w = images.shape[-2:]
            images = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
        uniform = torch.rand(batch, 3, 1, 1, generator=generator) * 2 - 1
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * (1 + self.contrast * uniform[:, 0:1]) + mean + self.brightness * uniform[:, 1:2]
        if self.noise_std:
            std = self.noise_std * (uniform[:, 2:3] + 1) / 2
            images = images + std * torch.randn(images.shape, generator=generator)
        return images.clamp(-1.0, 1.0)


def train_finding_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    modality: str,
    finding_types: Sequence[str],
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    augment: ClassifierAugmentation | bool | None = True,
    weight_decay: float = 1e-4,
    model_kwargs: dict[str, Any] | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> MedM2GFindingClassifier:
    r"""Trains one classifier with binary cross-entropy, AdamW and a warmup + cosine learning rate.

    Args:
        images (`np.ndarray` of shape `(N, H, W)`): float images in the model range ``[-1, 1]`` (square).
        labels (`np.ndarray` of shape `(N, n_types)`): 0/1 per finding type, columns in ``finding_types`` order.
        modality (`str`): the image key, recorded in the model's config.
        finding_types (`list[str]`): the label names.
        steps (`int`): optimizer steps (batches drawn from reshuffled epochs).
        batch_size (`int`): images per step (capped at N).
        lr (`float`): peak learning rate.
        seed (`int`): seeds initialisation, batch order and augmentation.
        augment: a :class:`ClassifierAugmentation`, ``True`` for the default one, ``False``/``None`` for none.
        model_kwargs (`dict`, *optional*): further :class:`MedM2GFindingClassifier` config (channels, ``pool_size``,
            ...); ``input_windows`` defaults to ``default_input_windows(modality)``.
        log_every (`int`): print the running loss every that many steps (0: never).

    Returns:
        `MedM2GFindingClassifier` in eval mode, on the CPU.
    """
    finding_types = check_finding_types(finding_types)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[0] == 0:
        raise ValueError(f"images must have shape (N, H, H) with N >= 1; got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating) or np.isnan(images).any():
        raise ValueError("images must be float arrays without NaN")
    if images.min() < -1.0 - 1e-4 or images.max() > 1.0 + 1e-4:
        raise ValueError(
            f"images must be in the model range [-1, 1] (map native units with modalities.to_model_range); "
            f"got [{images.min():.3g}, {images.max():.3g}]"
        )
    if labels.shape != (images.shape[0], len(finding_types)):
        raise ValueError(f"labels must have shape ({images.shape[0]}, {len(finding_types)}) (images x finding_types); got {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if augment is True:
        augment = ClassifierAugmentation()
    elif augment is False:
        augment = None
    if augment is not None and not isinstance(augment, ClassifierAugmentation):
        raise ValueError(f"augment must be a ClassifierAugmentation, True, False or None; got {augment!r}")

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MedM2GFindingClassifier(
            **{
                "input_windows": default_input_windows(modality),
                **(model_kwargs or {}),
                "modality": modality,
                "finding_types": finding_types,
                "image_size": int(images.shape[1]),
            }
        )
    model.train()
    x_all = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    y_all = torch.from_numpy(labels.astype(np.float32))
    batch_size = min(batch_size, len(x_all))

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, min(100, steps // 20))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order = torch.randperm(len(x_all), generator=generator)
    cursor, running = 0, 0.0
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(x_all), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        x = x_all[index]
        if augment is not None:
            x = augment(x, generator)
        loss = F.binary_cross_entropy_with_logits(model(x), y_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps} loss {running / log_every:.4f}")
            running = 0.0
    model.eval()
    return model
