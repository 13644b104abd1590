"""What :class:`~.pipeline_medm2g.MedM2GPipeline` returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class MedM2GPipelineOutput(BaseOutput):
    r"""
    Output of :class:`MedM2GPipeline`.

    Args:
        images (`dict[str, list[PIL.Image.Image] | np.ndarray | torch.Tensor]`):
            Target modality -> its generated images: a list of greyscale PIL images (``output_type="pil"``),
            an array `(batch, height, width)` (``"np"``), a tensor `(batch, 1, height, width)` (``"pt"``) or the
            scaled latents (``"latent"``). ``np``/``pt`` hold display values in `[0, 1]`, or Hounsfield units
            for CT when the call asked for ``ct_in_hu=True``. Empty when only text was generated.
        text (`list[str]`, *optional*):
            Generated reports (one per sample) when ``"text"`` was a target; with ``output_type="latent"`` the
            text latents are in ``images["text"]`` instead.
        provenance (`dict[str, dict]`):
            Target modality -> the record stored with it (``synthetic: true``, model, task, prompt, conditions,
            steps, guidance, seed). PIL outputs carry it in ``image.info`` and write it into PNG text chunks on
            ``image.save("x.png")``; use it for arrays and tensors, which cannot carry metadata.
    """

    images: dict[str, Union[list[PIL.Image.Image], np.ndarray, torch.Tensor]]
    text: list[str] | None
    provenance: dict[str, dict[str, Any]]
