"""`MedM2GRegressionPipeline`: the image -> image regression baseline (a pix2pix generator without the adversary)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import replace_example_docstring

from ..checkpoints import check_safe_to_load
from ..modalities import MODALITIES, get_modality, image_modality_keys
from .pipeline_medm2g import ImageInput, postprocess_images, preprocess_condition_image
from .pipeline_output import MedM2GPipelineOutput

OUTPUT_TYPES = ("pil", "np", "pt")
# Not a diffusion model: the UNet's time embedding always sees this one value, in training and here.
TIMESTEP = 0
METHOD = "UNet L1 regression (pix2pix generator without the adversary), one forward pass"

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import numpy as np
        >>> from medm2g_diffusers import MedM2GRegressionPipeline

        >>> # written by training/train_regression_baseline.py --task harvard_mri_to_ct
        >>> pipe = MedM2GRegressionPipeline.from_pretrained("runs/real/harvard_mri_to_ct/regression")
        >>> t2 = np.random.rand(64, 64).astype(np.float32)  # an MRI T2 slice in any signal scale
        >>> ct = pipe(conditions={"mri_t2": t2}, targets=["ct"], output_type="np", ct_in_hu=True).images["ct"][0]  # (64, 64) HU
        ```
"""


class MedM2GRegressionPipeline(DiffusionPipeline):
    r"""
    Image -> image by regression: one UNet forward pass maps the source images to the target image. The bar a
    generative model has to clear on small paired sets (``../shared/notes/image-to-image.md``).

    The sources, in the model range `[-1, 1]` and in the order of ``sources``, are the UNet's input channels;
    its one output channel is the target in `[-1, 1]` (clamped). It is trained with an L1 loss by
    ``training/train_regression_baseline.py``. It is **not a diffusion model**: diffusers' `UNet2DModel`
    always embeds a timestep, so it gets the constant :data:`TIMESTEP` in training and inference alike (the
    time embedding is then a learned bias). There is no noise and no scheduler, so the output is a
    deterministic function of the sources.

    It offers the scoring interface of [`MedM2GPipeline`] (`supported_targets`, `accepted_conditions`,
    `image_size`, `tokenizer`, `__call__` returning [`MedM2GPipelineOutput`] with provenance), so
    ``medm2g evaluate --baseline regression=DIR`` scores it beside the diffusion models.

    Args:
        unet ([`UNet2DModel`]): pixel-space UNet with ``in_channels == len(sources)``, ``out_channels == 1`` and
            ``sample_size`` the image side (:attr:`image_size`).
        sources (`list[str]`): the source modality keys, in input-channel order (e.g. ``["mri_t1", "mri_t2"]``).
        target (`str`): the modality key it generates (e.g. ``"mri_flair"``).

    ``sources`` and ``target`` are registered in ``model_index.json``, the image size in the UNet's config.
    Intensities of conditions are those of [`MedM2GPipeline`]: NumPy/torch in native units (CT in HU, MRI
    percentile-scaled per image), PIL as display images.
    """

    # Keyword defaults only because diffusers' loader reads optional ``__init__`` arguments from model_index.json
    # as plain values (required ones are taken for components); both are checked, never left unset.
    def __init__(self, unet: UNet2DModel, sources: Sequence[str] | None = None, target: str | None = None):
        super().__init__()
        if isinstance(sources, str) or not isinstance(sources, (list, tuple)) or not sources:
            raise ValueError(f"sources must be a non-empty list of image modality keys from {image_modality_keys()}; got {sources!r}")
        for key in [*sources, target]:
            if not isinstance(key, str) or key not in MODALITIES or not MODALITIES[key].is_image:
                raise ValueError(f"sources and target must be image modality keys from {image_modality_keys()}; got {key!r}")
        if len(set(sources)) != len(sources) or target in sources:
            raise ValueError(f"sources must be distinct and must not include the target {target!r}; got {list(sources)}")
        if unet.config.in_channels != len(sources) or unet.config.out_channels != 1:
            raise ValueError(
                f"unet must take one input channel per source ({len(sources)}: {list(sources)}) and return 1; "
                f"got in_channels={unet.config.in_channels}, out_channels={unet.config.out_channels}"
            )
        if not isinstance(unet.config.sample_size, int):
            raise ValueError(f"unet.config.sample_size must be one int (square images); got {unet.config.sample_size!r}")
        self.register_modules(unet=unet)
        self.register_to_config(sources=list(sources), target=target)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        [`DiffusionPipeline.from_pretrained`], safetensors only: a folder with pickle weight files (`.bin`, `.pt`,
        ...), `use_safetensors=False`, `trust_remote_code` or `custom_pipeline` is refused with
        [`~medm2g_diffusers.checkpoints.UnsafeCheckpointError`] before anything is read.
        """
        check_safe_to_load(pretrained_model_name_or_path, **kwargs)
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------ properties

    @property
    def sources(self) -> list[str]:
        return list(self.config.sources)

    @property
    def target(self) -> str:
        return self.config.target

    @property
    def image_size(self) -> int:
        """Side of the square images it reads and writes (the UNet's ``sample_size``)."""
        return int(self.unet.config.sample_size)

    @property
    def tokenizer(self) -> None:
        """No text path: the benchmark asks for a tokenizer only for tasks this pipeline cannot do."""
        return None

    def supported_targets(self) -> list[str]:
        return [self.target]

    def accepted_conditions(self, target: str) -> list[str]:
        """The sources for its own target (all of them are needed), nothing for any other modality."""
        get_modality(target, "target")
        return self.sources if target == self.target else []

    # --------------------------------------------------------------------------------------------- inputs

    def check_inputs(self, prompt, conditions, targets, num_images_per_prompt, output_type) -> None:
        if prompt is not None:
            raise ValueError(f"prompt must be None: this regression pipeline reads no text (it maps {self.sources} -> {self.target!r})")
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or list(targets) != [self.target]:
            raise ValueError(f"targets must be [{self.target!r}], the one modality this pipeline generates; got {targets!r}")
        if not isinstance(conditions, dict):
            raise ValueError(f"conditions must be a dict of modality key -> image with every source {self.sources}; got {type(conditions).__name__}")
        missing = [key for key in self.sources if key not in conditions]
        if missing:
            raise ValueError(f"conditions lacks {missing}: this pipeline maps {self.sources} -> {self.target!r} and needs every source")
        extra = [key for key in conditions if key not in self.sources]
        if extra:
            raise ValueError(f"this pipeline cannot condition {self.target!r} on {extra}; it reads exactly {self.sources}")
        if isinstance(num_images_per_prompt, bool) or num_images_per_prompt != 1:
            raise ValueError(f"num_images_per_prompt must be 1: a regression model is deterministic (every sample would be the same); got {num_images_per_prompt!r}")
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES} (there are no latents); got {output_type!r}")

    def preprocess_condition(self, key: str, image: ImageInput) -> torch.Tensor:
        """One source's images as `(batch, 1, image_size, image_size)` in `[-1, 1]`: the inputs, intensity maps and
        errors of `MedM2GPipeline.preprocess_condition` (:func:`~.pipeline_medm2g.preprocess_condition_image`)."""
        return preprocess_condition_image(key, image, self.image_size)

    # --------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        conditions: dict[str, ImageInput] | None = None,
        targets: Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_text_tokens: int | None = None,
        ct_in_hu: bool = False,
    ):
        r"""
        Predicts the target from the sources in one forward pass.

        Args:
            prompt: must be `None` (no text path); accepted so that callers of [`MedM2GPipeline`] work unchanged.
            conditions (`dict[str, image]`): every source key -> its image(s): a PIL image, an array/tensor
                `(H, W)`, `(1, H, W)` or `(batch, 1, H, W)` at :attr:`image_size`, or a list of those; all
                sources with the same batch size.
            targets (`list[str]`, *optional*): `[target]` (the default); anything else is an error.
            num_inference_steps, guidance_scale, generator, max_text_tokens: **ignored on purpose**: the model
                has no sampling loop, no guidance, no randomness and no text. They are accepted so that the
                benchmark's call (the same as for diffusion models) runs; the provenance records `None` for
                steps and guidance so that no one reads them as used.
            num_images_per_prompt (`int`): must be 1 (a deterministic model gives one answer).
            output_type (`str`, defaults to `"pil"`): `"pil"` (8-bit, tagged as synthetic), `"np"` `(batch, H, W)`
                or `"pt"` `(batch, 1, H, W)`, in the display range `[0, 1]`.
            return_dict (`bool`, defaults to `True`): a [`MedM2GPipelineOutput`] instead of a tuple.
            ct_in_hu (`bool`, defaults to `False`): CT in Hounsfield units for `"np"`/`"pt"`.

        Examples:

        Returns:
            [`MedM2GPipelineOutput`] with ``images[target]``, ``text=None`` and ``provenance[target]``, or the tuple
            ``(images, None, provenance)``.
        """
        targets = [self.target] if targets is None else targets
        self.check_inputs(prompt, conditions, targets, num_images_per_prompt, output_type)

        inputs = [self.preprocess_condition(key, conditions[key]) for key in self.sources]
        batch_sizes = sorted({x.shape[0] for x in inputs})
        if len(batch_sizes) != 1:
            raise ValueError(f"every source in conditions must have the same batch size; got {dict(zip(self.sources, [x.shape[0] for x in inputs]))}")
        sample = torch.cat(inputs, dim=1).to(device=self.device, dtype=self.unet.dtype)
        prediction = self.unet(sample, TIMESTEP).sample.clamp(-1.0, 1.0).float().cpu()

        target = self.target
        provenance: dict[str, Any] = {
            "synthetic": True,
            "model": self.name_or_path or type(self).__name__,
            "model_class": type(self).__name__,
            "method": METHOD,
            "modality": target,
            "task": f"{'+'.join(self.sources)} -> {target}",
            "targets": [target],
            "prompt": None,
            "num_inference_steps": None,
            "guidance_scale": None,
            "seed": None,
        }
        images = postprocess_images(target, prediction, output_type, ct_in_hu, provenance)

        self.maybe_free_model_hooks()
        if not return_dict:
            return {target: images}, None, {target: provenance}
        return MedM2GPipelineOutput(images={target: images}, text=None, provenance={target: provenance})
