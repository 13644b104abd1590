"""`MedM2GPipeline`: any-to-any generation between reports, X-ray, CT and MRI with one multi-flow model."""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase

from ..checkpoints import check_safe_to_load, resolve_checkpoint
from ..data.io import tag_synthetic
from ..loaders.lora import MedM2GLoraLoaderMixin
from ..modalities import MODALITIES, family_keys, from_model_range, get_modality, image_modality_keys, modality_keys, to_model_range
from ..models.multiflow import MedM2GMultiFlowModel, load_model_subset, loading_dtype
from ..models.prompt_encoders import MedM2GPromptEncoders
from ..models.text_vae import MedM2GTextVAE
from ..single_flow import Condition
from .pipeline_output import MedM2GPipelineOutput

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, Sequence[Union[PIL.Image.Image, np.ndarray, torch.Tensor]]]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Classifier-free guidance when a call does not set it: the paper's 2.0 for images; reports (text latents) are
# guided harder, 3.0 chosen on the phantom validation split (docs/results/report-guidance.md).
DEFAULT_GUIDANCE_SCALES = {"image": 2.0, "text": 3.0}
# Reports sampled per sample when a report is the only target, of which the consensus one is returned (minimum
# Bayes risk in the text encoder's space); chosen on the phantom validation split (docs/results/report-candidates.md).
DEFAULT_REPORT_CANDIDATES = 16


def guidance_scales(guidance_scale: float | dict[str, float] | None, targets: Sequence[str]) -> dict[str, float]:
    """Each target's classifier-free guidance scale: ``guidance_scale`` itself (a number, for every target), its
    entry for the target (a dict), or the default of the target's kind (`DEFAULT_GUIDANCE_SCALES`)."""
    defaults = {t: DEFAULT_GUIDANCE_SCALES["text" if t == "text" else "image"] for t in targets}
    if guidance_scale is None:
        return defaults
    if isinstance(guidance_scale, dict):
        return {t: float(guidance_scale.get(t, defaults[t])) for t in targets}
    return {t: float(guidance_scale) for t in targets}


@dataclass(frozen=True)
class _PartialLoad:
    """What ``MedM2GPipeline.from_pretrained(targets=..., conditions=...)`` loaded, for the errors of calls that need
    more. ``targets`` / ``conditions`` are as the caller gave them (`None`: everything); ``denoisers`` and
    ``prompt_encoders`` are the families loaded."""

    name: str
    targets: list[str] | None
    conditions: list[str] | None
    denoisers: list[str]
    prompt_encoders: list[str]


def _families_of(keys, parameter: str, available: list[str], what: str) -> list[str]:
    """The families (in ``available``'s order) of a list of modality keys or family names."""
    if isinstance(keys, str) or not isinstance(keys, (list, tuple)) or not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{parameter} must be a non-empty list of modality keys or families; got {keys!r}")
    families = set()
    for key in keys:
        family = key if key in family_keys() else get_modality(key, parameter).family
        if family not in available:
            raise ValueError(f"{parameter} has {key!r}, of family {family!r}; this checkpoint has {what} for {available}")
        families.add(family)
    return [family for family in available if family in families]

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from medm2g_diffusers import MedM2GPipeline

        >>> pipe = MedM2GPipeline.from_pretrained("medm2g-tiny")  # bundled; or a folder from train_multiflow.py
        >>> out = pipe("Large right pleural effusion. Heart size is normal.", targets=["xray", "ct"], generator=torch.manual_seed(0))
        >>> out.images["xray"][0].save("xray.png")  # provenance in the PNG's text chunks
        >>> report = pipe(conditions={"xray": out.images["xray"][0]}, targets=["text"]).text[0]
        >>> ct = out.images["ct"][0]
        >>> xray_from_ct = pipe(conditions={"ct": ct}, targets=["xray"]).images["xray"][0]
        ```
"""


def preprocess_condition_image(key: str, image: ImageInput, size: int) -> torch.Tensor:
    r"""
    One condition's images in the model range (`MedM2GPipeline.preprocess_condition`, also used by the regression
    baseline's pipeline so that both read conditions alike).

    Args:
        key (`str`): the condition's modality key.
        image: a PIL image, an array/tensor `(H, W)`, `(1, H, W)` or `(batch, 1, H, W)` in native units, or a
            list of those.

    Returns:
        `torch.Tensor` of shape `(batch, 1, image_size, image_size)` in `[-1, 1]`.
    """
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"conditions[{key!r}] is an empty list")
        return torch.cat([preprocess_condition_image(key, item, size) for item in image])
    if isinstance(image, PIL.Image.Image):
        if image.mode == "L":
            values = np.asarray(image, dtype=np.float32) / 255.0
        elif image.mode in ("I;16", "I;16B", "I;16L"):
            values = np.asarray(image, dtype=np.float32) / 65535.0
        elif image.mode == "F":
            values = np.asarray(image, dtype=np.float32)
            if not np.isfinite(values).all():
                raise ValueError(f"conditions[{key!r}] has NaN or infinite values")
        else:
            raise ValueError(
                f"conditions[{key!r}] must be a single-channel (greyscale) image; got PIL mode {image.mode!r} "
                f"with {len(image.getbands())} channels (convert it with image.convert('L') if it is grey)"
            )
        model = torch.from_numpy(np.clip(values, 0.0, 1.0) * 2.0 - 1.0)[None, None]
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        # Real numbers only: complex values would lose their imaginary part, objects/strings cannot convert.
        if isinstance(image, np.ndarray) and image.dtype.kind not in "biuf":
            raise ValueError(f"conditions[{key!r}] must hold real numbers; got dtype {image.dtype}")
        if isinstance(image, torch.Tensor) and (image.is_complex() or image.is_quantized):
            raise ValueError(f"conditions[{key!r}] must hold real numbers; got dtype {image.dtype}")
        # float64 first, so that NaN/inf is told apart from finite values that overflow float32.
        tensor = (torch.from_numpy(np.array(image, dtype=np.float64)) if isinstance(image, np.ndarray)
                  else image.detach().cpu().to(torch.float64))
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3 and tensor.shape[0] == 1:
            tensor = tensor[None]
        elif not (tensor.ndim == 4 and tensor.shape[1] == 1):
            raise ValueError(
                f"conditions[{key!r}] must have shape (H, W), (1, H, W) or (batch, 1, H, W) with one channel; "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.numel() == 0:
            raise ValueError(f"conditions[{key!r}] is empty; got shape {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"conditions[{key!r}] has NaN or infinite values")
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise ValueError(f"conditions[{key!r}] has values beyond the float32 range")
        model = to_model_range(tensor, key)
        if not torch.isfinite(model).all():  # e.g. MRI percentile scaling of values near the float32 limit
            raise ValueError(f"conditions[{key!r}] has values too large to scale to the model range")
    else:
        raise ValueError(f"conditions[{key!r}] must be a PIL image, a NumPy array or a torch tensor; got {type(image).__name__}")
    if model.shape[-2:] != (size, size):
        raise ValueError(
            f"conditions[{key!r}] must be {size}x{size} (this checkpoint's image size); got "
            f"{model.shape[-2]}x{model.shape[-1]}: resize or crop it first"
        )
    return model


def postprocess_images(target: str, images: torch.Tensor, output_type: str, ct_in_hu: bool, provenance: dict[str, Any]):
    """Model-range images `(batch, 1, H, W)` -> `"pt"` / `"np"` in `[0, 1]` (CT in HU with ``ct_in_hu``), or PIL images
    tagged synthetic with ``provenance``."""
    if output_type in ("np", "pt") and ct_in_hu and MODALITIES[target].family == "ct":
        values = from_model_range(images.float().cpu(), target)
    else:
        values = ((images.float().cpu().clamp(-1, 1) + 1) / 2)
    if output_type == "pt":
        return values
    if output_type == "np":
        return values[:, 0].numpy()
    quantised = (values[:, 0].numpy() * 255).round().astype(np.uint8)
    return [tag_synthetic(PIL.Image.fromarray(image, mode="L"), provenance) for image in quantised]


class MedM2GPipeline(DiffusionPipeline, MedM2GLoraLoaderMixin):
    r"""
    MedM2G: text -> image (one or several targets, generated jointly), image -> report, image -> image (MRI ->
    CT, CT -> X-ray, MRI contrast synthesis from one or several contrasts).

    Conditions are encoded by the aligned prompt encoders (C_m); every target's denoiser attends to the tokens
    of its conditions, reads clean image sources through its source slots (or through θ_c, per the model's
    config) and, when several targets are generated together, to V_B(z_t^B) of every other target through θ_c.

    Args:
        multiflow ([`MedM2GMultiFlowModel`]): the per-family denoisers, context encoders and θ_c.
        vae ([`AutoencoderKL`]): the image autoencoder shared by the imaging families (1 channel).
        text_vae ([`MedM2GTextVAE`]): the report autoencoder.
        prompt_encoders ([`MedM2GPromptEncoders`]): C_m of every family, in the shared space.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): the report tokenizer.
        scheduler ([`SchedulerMixin`]): DDIM by default; any diffusers scheduler with the same config works
            (e.g. `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`).

    LoRA adapters fine-tuned on your own data (``training/finetune_lora.py``) load with `load_lora_weights`, are
    chosen with `set_adapters` or per call with ``adapter_names``, and leave with `unload_lora_weights`
    ([`~medm2g_diffusers.loaders.MedM2GLoraLoaderMixin`]).

    Intensities: NumPy/torch conditions are in native units (CT in Hounsfield units, X-ray in `[0, 1]`, MRI in
    any signal scale, percentile-scaled per image); PIL conditions are display images (`[0, 255]` or 16-bit ->
    `[0, 1]`, the CT one being a window of [-1000, 1000] HU as our outputs are).
    """

    model_cpu_offload_seq = "prompt_encoders->multiflow->vae->text_vae"

    # Set by from_pretrained(targets=..., conditions=...): what this pipeline holds of its checkpoint.
    _partial_load: _PartialLoad | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        allow_pickle: bool = False,
        targets: Sequence[str] | None = None,
        conditions: Sequence[str] | None = None,
        **kwargs,
    ):
        r"""
        [`DiffusionPipeline.from_pretrained`], safetensors only, plus the names of the checkpoints bundled with
        the repository: `MedM2GPipeline.from_pretrained("medm2g-tiny")` loads `checkpoints/medm2g-tiny` offline.
        Its weights are stored in fp16 and load as fp32 unless `dtype` (`torch_dtype`) says otherwise.

        Args:
            allow_pickle (`bool`, defaults to `False`): a checkpoint with pickle weight files (`.bin`, `.pt`,
                `.ckpt`, ...) is refused with [`~medm2g_diffusers.checkpoints.UnsafeCheckpointError`] unless this
                is `True`, because unpickling can run arbitrary code. `trust_remote_code` and `custom_pipeline`
                are always refused: a MedM2G checkpoint is weights and configs, never code.
            targets (`list[str]`, *optional*): load only what generating these modality keys (or families) needs:
                their families' denoisers and context encoders, and the text VAE only when ``"text"`` is one. The
                other denoisers are neither built nor read from the safetensors
                ([`MedM2GMultiFlowModel.from_pretrained`] with ``families``). Default: every target.
            conditions (`list[str]`, *optional*): load only the prompt encoders of these modality keys or families,
                ``"text"`` being the prompt. Default: every condition. So ``targets=["xray"], conditions=["text"]``
                loads, for a text -> X-ray call, the X-ray denoiser and context encoder, the text prompt encoder,
                the image VAE (its decoder makes the image; its encoder is kept, image conditions need it), the
                tokenizer and the scheduler. A call that needs anything else is refused with a
                `ValueError` naming what to load, and so is `save_pretrained`. Both need a local folder (or a
                bundled name); what is loaded gives the outputs a full load gives, bit for bit.
            revision (`str`, *optional*): for a Hub repository, pin a commit hash so that what is loaded
                cannot change under you (the demo refuses a Hub model without one).
        """
        path = resolve_checkpoint(pretrained_model_name_or_path)
        check_safe_to_load(path, allow_pickle=allow_pickle, **kwargs)
        kwargs.setdefault("use_safetensors", None if allow_pickle else True)
        partial = None
        if targets is not None or conditions is not None:
            components, partial = cls._load_parts(path, str(pretrained_model_name_or_path), targets, conditions, kwargs)
            kwargs.update(components)
        pipe = super().from_pretrained(path, **kwargs)
        if path != pretrained_model_name_or_path:
            # Provenance names the model as the user did ("medm2g-tiny"), not a local folder.
            pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        pipe._partial_load = partial
        return pipe

    @classmethod
    def _load_parts(cls, path: str, name: str, targets, conditions, kwargs: dict[str, Any]) -> tuple[dict[str, Any], _PartialLoad]:
        """The components ``from_pretrained(targets=, conditions=)`` loads in part (diffusers loads the others)."""
        if not os.path.isdir(path):
            raise ValueError(
                f"targets= and conditions= read only the needed weights of a local folder; {name!r} is not one (download it "
                "first, e.g. huggingface_hub.snapshot_download(repo_id, revision=...), and pass the folder)"
            )
        passed = [key for key in ("multiflow", "prompt_encoders", "text_vae") if key in kwargs]
        if passed:
            raise ValueError(f"targets= and conditions= choose what is loaded of {passed}; pass either those components or targets/conditions")
        unsupported = [key for key in ("variant", "device_map") if kwargs.get(key) is not None]
        if unsupported:
            raise ValueError(f"{unsupported} cannot be combined with targets= or conditions=")
        dtype = loading_dtype(kwargs)  # one dtype for every part (diffusers' per-component dict is not supported here)
        multiflow_config = MedM2GMultiFlowModel.load_config(os.path.join(path, "multiflow"))
        denoisable = [family for family in family_keys() if family in multiflow_config["unet_configs"]]
        encodable = list(MedM2GPromptEncoders.load_config(os.path.join(path, "prompt_encoders"))["families"])
        denoisers = denoisable if targets is None else _families_of(targets, "targets", denoisable, "denoisers")
        encoders = encodable if conditions is None else _families_of(conditions, "conditions", encodable, "prompt encoders")
        if "text" in denoisers:  # the text prompt encoder chooses among report candidates (report_candidates)
            encoders = [family for family in encodable if family in encoders or family == "text"]
        components: dict[str, Any] = {}
        if targets is not None:
            # A source_guidance model reads a clean image source through that family's context encoder V_S, and so
            # does the text denoiser for the families of report_sources.
            guided = [f for f in denoisable if f != "text"] if multiflow_config.get("source_guidance") else []
            if "text" in denoisers:
                guided += [f for f in multiflow_config.get("report_sources") or [] if f not in guided]
            sources = [family for family in encoders if family in guided and family not in denoisers]
            components["multiflow"] = MedM2GMultiFlowModel.from_pretrained(
                path, subfolder="multiflow", families=denoisers, source_families=sources, dtype=dtype
            )
            if "text" not in denoisers:
                components["text_vae"] = None  # it only turns generated text latents into reports
        if conditions is not None:
            # input_windows belong to their family's encoder: keep only the loaded families' (a text-only load of an
            # encoder set with CT windows has no CT encoder to read them).
            with open(os.path.join(path, "prompt_encoders", "config.json")) as handle:
                windows = json.load(handle).get("input_windows") or {}
            components["prompt_encoders"] = load_model_subset(
                MedM2GPromptEncoders, os.path.join(path, "prompt_encoders"), dtype=dtype,
                config_updates={"families": encoders, "input_windows": {f: w for f, w in windows.items() if f in encoders}},
            )
        record = _PartialLoad(
            name=name, targets=None if targets is None else list(targets), conditions=None if conditions is None else list(conditions),
            denoisers=denoisers, prompt_encoders=encoders,
        )
        return components, record

    def _refuse_unloaded(self, prompt, conditions, targets) -> None:
        """A pipeline loaded with targets=/conditions= refuses a call that needs a part it did not load, naming it.
        Malformed inputs are left to the rest of `check_inputs`."""
        partial = self._partial_load
        if partial is None or not isinstance(targets, (list, tuple)) or not isinstance(conditions or {}, dict):
            return
        targets = [t for t in targets if isinstance(t, str) and t in MODALITIES]
        given = (["text"] if prompt is not None else []) + [k for k in conditions or {} if isinstance(k, str) and k in MODALITIES]
        missing_targets = [t for t in targets if MODALITIES[t].family not in partial.denoisers]
        missing_conditions = [k for k in given if MODALITIES[k].family not in partial.prompt_encoders]
        if not missing_targets and not missing_conditions:
            return
        lacks, load = [], []
        if missing_targets:
            lacks.append(f"the denoisers of targets {missing_targets}")
        if missing_conditions:
            lacks.append(f"the prompt encoders of conditions {missing_conditions}")
        for name, loaded, missing in (("targets", partial.targets, missing_targets), ("conditions", partial.conditions, missing_conditions)):
            if loaded is not None:
                load.append(f"{name}={loaded + [key for key in missing if key not in loaded]}")
        raise ValueError(
            f"this pipeline was loaded with targets={partial.targets}, conditions={partial.conditions} and lacks "
            f"{' and '.join(lacks)}: load it with MedM2GPipeline.from_pretrained({partial.name!r}, {', '.join(load)}) "
            "or without targets=/conditions="
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        r"""[`DiffusionPipeline.save_pretrained`]; refused while LoRA adapters are loaded, since the saved model would
        not reload (save the adapters with `save_lora_weights`, or `unload_lora_weights` first), and for a pipeline
        loaded with ``targets=`` / ``conditions=`` (it lacks the other parts)."""
        if self._partial_load is not None:
            raise ValueError(
                f"this pipeline was loaded with targets={self._partial_load.targets}, conditions={self._partial_load.conditions} "
                "and lacks the other parts of its checkpoint: load it whole to save it"
            )
        if self.get_list_adapters():
            raise ValueError(
                f"this pipeline holds LoRA adapters {self.get_list_adapters()}: save them with save_lora_weights(...), or call "
                "unload_lora_weights() before save_pretrained"
            )
        return super().save_pretrained(save_directory, *args, **kwargs)

    _callback_tensor_inputs = ["latents"]
    _optional_components = ["text_vae"]

    def __init__(
        self,
        multiflow: MedM2GMultiFlowModel,
        vae: AutoencoderKL,
        text_vae: MedM2GTextVAE,
        prompt_encoders: MedM2GPromptEncoders,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(
            multiflow=multiflow, vae=vae, text_vae=text_vae, prompt_encoders=prompt_encoders, tokenizer=tokenizer, scheduler=scheduler
        )

    # ------------------------------------------------------------------------------------------ properties

    @property
    def image_size(self) -> int:
        """Side of the images this checkpoint's prompt encoders read (conditions must have it)."""
        return int(self.prompt_encoders.config.sample_size)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def size_multiple(self, target: str) -> int:
        """Image sides ``target`` can be generated at are multiples of this (VAE and UNet downsampling)."""
        levels = len(self.multiflow.unets[MODALITIES[target].family].config.block_out_channels)
        return self.vae_scale_factor * 2 ** (levels - 1)

    def supported_targets(self) -> list[str]:
        """Modality keys this checkpoint can generate: every modality of a family it has a denoiser for, up to the
        contrasts that denoiser was trained on (its class embedding)."""
        families = set(self.multiflow.unets)
        if self.text_vae is None:
            families.discard("text")
        return [key for key in modality_keys() if MODALITIES[key].family in families
                and key in self.multiflow.modality_keys(MODALITIES[key].family)]

    def accepted_conditions(self, target: str) -> list[str]:
        """Modality keys that can condition ``target`` with this checkpoint (the prompt encoders must know them)."""
        known = set(self.prompt_encoders.modality_keys())
        if target == "text":
            return [key for key in image_modality_keys() if key in known]
        sources = self.multiflow.accepted_sources(MODALITIES[target].family)
        return ["text"] + [key for key in sources if key != target and key in known]

    # --------------------------------------------------------------------------------------------- inputs

    def check_inputs(
        self,
        prompt,
        conditions,
        targets,
        negative_prompt,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        output_type,
        latents,
        max_text_tokens,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        self._refuse_unloaded(prompt, conditions, targets)
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"targets must be a non-empty list of modality keys from {self.supported_targets()}; got {targets!r}")
        for target in targets:
            if not isinstance(target, str):
                raise ValueError(f"targets must be modality keys (strings) from {self.supported_targets()}; got {target!r}")
            get_modality(target, "targets")
            if target not in self.supported_targets():
                raise ValueError(f"this checkpoint cannot generate {target!r}: targets must be from {self.supported_targets()}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets must not repeat a modality; got {list(targets)}")
        conditions = conditions or {}
        if not isinstance(conditions, dict):
            raise ValueError(f"conditions must be a dict of modality key -> image; got {type(conditions).__name__}")
        for key in conditions:
            if key == "text":
                raise ValueError("conditions must hold images; pass report text as prompt=")
            get_modality(key, "conditions keys")
            if key in targets:
                raise ValueError(f"{key!r} is both a condition and a target")
        if prompt is None and not conditions:
            raise ValueError("pass a prompt, image conditions, or both")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a non-empty list of strings; got {type(prompt).__name__}")
            if any(not p.strip() for p in prompts):
                raise ValueError("prompt must not be empty or whitespace: write a report, or pass conditions instead")
            if "text" in targets:
                raise ValueError("'text' cannot be a target when a prompt is given (the prompt is the report)")
            limit = self.prompt_encoders.config.text_max_position_embeddings
            if not isinstance(max_text_tokens, int) or not 1 <= max_text_tokens <= limit:
                raise ValueError(f"max_text_tokens must be an integer in [1, {limit}] (the text encoder's positions); got {max_text_tokens!r}")
            lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
            if max(lengths) > max_text_tokens:
                raise ValueError(
                    f"prompt is {max(lengths)} tokens long; at most max_text_tokens={max_text_tokens} fit (shorten the report)"
                )
        if negative_prompt is not None and prompt is None:
            raise ValueError("negative_prompt needs a prompt")
        if negative_prompt is not None and not (
            isinstance(negative_prompt, str)
            or (isinstance(negative_prompt, list) and negative_prompt and all(isinstance(p, str) for p in negative_prompt))
        ):
            raise ValueError(f"negative_prompt must be a string or a non-empty list of strings; got {type(negative_prompt).__name__}")
        given = (["text"] if prompt is not None else []) + list(conditions)
        for target in targets:
            refused = [key for key in given if key not in self.accepted_conditions(target)]
            if refused:
                raise ValueError(
                    f"this checkpoint cannot condition {target!r} on {refused}; it accepts {self.accepted_conditions(target)}"
                )
        factor = max([self.size_multiple(t) for t in targets if MODALITIES[t].is_image] or [1])
        for name, value in (("height", height), ("width", width)):
            if value is not None and (not isinstance(value, int) or value <= 0 or value % factor):
                raise ValueError(f"{name} must be a positive multiple of {factor}; got {value!r}")
        if conditions and (height, width) != (self.image_size, self.image_size) and (height or width):
            raise ValueError(f"with image conditions, height and width must be this checkpoint's {self.image_size}; got {height}x{width}")
        # bool is an int subclass: True would silently mean 1. The top: DDIM with steps_offset 1 indexes past
        # its last training step at num_inference_steps == num_train_timesteps.
        config = self.scheduler.config
        max_steps = (config.get("num_train_timesteps") or 10**9) - (config.get("steps_offset") or 0)
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= max_steps:
            raise ValueError(f"num_inference_steps must be an integer in [1, {max_steps}] (this scheduler's training steps); got {num_inference_steps!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt!r}")
        # Python numbers (np.float64 is one): they are also recorded in the JSON provenance.
        scales = guidance_scale.values() if isinstance(guidance_scale, dict) else [] if guidance_scale is None else [guidance_scale]
        if isinstance(guidance_scale, dict) and not set(guidance_scale) <= set(targets):
            raise ValueError(f"guidance_scale keys must be targets of this call {list(targets)}; got {sorted(guidance_scale)}")
        if any(isinstance(g, bool) or not isinstance(g, (int, float)) or not np.isfinite(g) or g < 0 for g in scales):
            raise ValueError(
                "guidance_scale must be a finite Python int or float >= 0, a dict of target -> such a number, or None "
                f"(each target's default); got {guidance_scale!r}"
            )
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if latents is not None and (not isinstance(latents, dict) or set(latents) - set(targets)):
            raise ValueError(f"latents must be a dict keyed by targets {list(targets)}; got {type(latents).__name__}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be from {self._callback_tensor_inputs}; got {unknown}")

    def preprocess_condition(self, key: str, image: ImageInput) -> torch.Tensor:
        """One condition's images in the model range at this checkpoint's image size: see
        :func:`preprocess_condition_image`."""
        return preprocess_condition_image(key, image, self.image_size)

    # ----------------------------------------------------------------------------------------- encoding

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], max_text_tokens: int) -> Condition:
        """Report tokens of the text prompt encoder: ``(batch, length, embed_dim)`` with their mask."""
        batch = self.tokenizer(prompt, padding="longest", truncation=True, max_length=max_text_tokens, return_tensors="pt")
        inputs = {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}
        return Condition(self.prompt_encoders.encode("text", inputs).tokens, inputs["attention_mask"])

    @torch.no_grad()
    def encode_image(self, key: str, images: torch.Tensor) -> tuple[Condition, torch.Tensor]:
        """An image condition's prompt-encoder tokens and its clean VAE latent (posterior mode, scaled)."""
        images = images.to(device=self.device, dtype=self.vae.dtype)
        tokens = self.prompt_encoders.encode(key, images).tokens
        latent = self.vae.encode(images).latent_dist.mode() * self.vae.config.scaling_factor
        return Condition(tokens, torch.ones(tokens.shape[:2], dtype=torch.long, device=self.device)), latent

    @torch.no_grad()
    def choose_reports(self, reports: list[str], candidates: int, max_text_tokens: int = 160) -> torch.Tensor:
        """Minimum Bayes risk choice among report candidates.

        Args:
            reports (`list[str]`): ``batch * candidates`` reports, each sample's candidates consecutive.
            candidates (`int`): candidates per sample.
            max_text_tokens (`int`): tokens of a report the text prompt encoder reads.

        Returns:
            `torch.LongTensor` of shape `(batch,)`: the index into ``reports`` of each sample's report whose pooled
            text embedding has the highest summed cosine similarity to its candidates' (the consensus; ties go to
            the earlier candidate).
        """
        if candidates < 1 or len(reports) % candidates:
            raise ValueError(f"reports must hold `candidates` ({candidates}) reports per sample; got {len(reports)}")
        batch = self.tokenizer(reports, padding="longest", truncation=True, max_length=max_text_tokens, return_tensors="pt")
        inputs = {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}
        pooled = self.prompt_encoders.encode("text", inputs).pooled.float()
        pooled = pooled.view(-1, candidates, pooled.shape[-1])
        consensus = (pooled @ pooled.transpose(1, 2)).sum(-1)  # (samples, candidates)
        return consensus.argmax(-1).cpu() + torch.arange(pooled.shape[0]) * candidates

    def resolve_report_candidates(self, report_candidates: int | None, targets: Sequence[str], latents=None) -> int:
        """The call's report candidates: the default for its targets (1 when the caller fixed the initial noise:
        there is nothing to choose among), or ``report_candidates`` checked."""
        if report_candidates is None:
            return DEFAULT_REPORT_CANDIDATES if list(targets) == ["text"] and latents is None else 1
        if isinstance(report_candidates, bool) or not isinstance(report_candidates, int) or report_candidates < 1:
            raise ValueError(f"report_candidates must be a positive integer; got {report_candidates!r}")
        if report_candidates > 1 and "text" not in targets:
            raise ValueError(f"report_candidates chooses among generated reports: it needs 'text' among the targets; got {list(targets)}")
        return report_candidates

    @staticmethod
    def _repeat(condition: Condition, times: int) -> Condition:
        return Condition(condition.tokens.repeat_interleave(times, 0), condition.mask.repeat_interleave(times, 0))

    @staticmethod
    def _join(parts: list[Condition]) -> Condition:
        """Concatenates conditions along their tokens (a multi-source condition)."""
        return Condition(torch.cat([p.tokens for p in parts], 1), torch.cat([p.mask for p in parts], 1))

    # ----------------------------------------------------------------------------------------- latents

    def prepare_latents(self, target: str, batch: int, height: int, width: int, generator, latents: torch.Tensor | None, scheduler):
        if target == "text":
            shape = (batch, self.text_vae.config.text_latent_dim, 1, 1)
        else:
            shape = (batch, self.vae.config.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.multiflow.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents[{target!r}] must have shape {shape}; got {tuple(latents.shape)}")
        return latents.to(self.device) * scheduler.init_noise_sigma

    # ------------------------------------------------------------------------------------------- output

    def postprocess_image(self, target: str, images: torch.Tensor, output_type: str, ct_in_hu: bool, provenance: dict[str, Any]):
        """Model-range images `(batch, 1, H, W)` -> the requested output type: see :func:`postprocess_images`."""
        return postprocess_images(target, images, output_type, ct_in_hu, provenance)

    # --------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        conditions: dict[str, ImageInput] | None = None,
        targets: Sequence[str] = ("xray",),
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | dict[str, float] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: dict[str, torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
        max_text_tokens: int = 160,
        cross_guidance_scale: float = 1.0,
        ct_in_hu: bool = False,
        max_new_tokens: int = 160,
        batch_invariant: bool = False,
        adapter_names: str | list[str] | None = None,
        report_candidates: int | None = None,
    ):
        r"""
        Generates ``targets`` from a report and/or images.

        Args:
            prompt (`str` or `list[str]`, *optional*): report text (one per sample).
            conditions (`dict[str, image]`, *optional*): modality key -> condition image(s) (see the class
                docstring for intensities); several keys make a multi-source condition.
            targets (`list[str]`): modality keys to generate; several are generated jointly in one loop, each
                attending to the others.
            negative_prompt (`str` or `list[str]`, *optional*): replaces the null condition of guidance.
            height, width (`int`, *optional*): output size; defaults to (and, with image conditions, must be)
                the checkpoint's image size.
            num_inference_steps (`int`, defaults to 50): DDIM steps.
            guidance_scale (`float` or `dict[str, float]`, *optional*): classifier-free guidance weight, one for every
                target or a dict of target -> weight (1 or less: that target's conditional prediction alone). A
                target without one gets its kind's default: 2.0 for images, 3.0 for a report
                (`DEFAULT_GUIDANCE_SCALES`; docs/results/report-guidance.md).
            num_images_per_prompt (`int`, defaults to 1): samples per prompt / condition.
            eta (`float`, defaults to 0.0): DDIM eta (ignored by schedulers without it).
            generator (`torch.Generator` or a list, one per sample): the randomness.
            latents (`dict[str, torch.Tensor]`, *optional*): initial noise per target.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a [`MedM2GPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): ``fn(pipe, step, timestep, callback_kwargs) -> dict``
                after every step; ``callback_kwargs["latents"]`` is the dict of current latents, and a returned
                ``"latents"`` replaces it.
            callback_on_step_end_tensor_inputs (`list[str]`): what the callback receives (``["latents"]``).
            max_text_tokens (`int`, defaults to 160): longest prompt accepted, in tokens.
            cross_guidance_scale (`float`, defaults to 1.0): weight of the θ_c coupling between joint targets.
            ct_in_hu (`bool`, defaults to `False`): return CT in Hounsfield units (``np``/``pt`` outputs).
            max_new_tokens (`int`, defaults to 160): longest generated report, in tokens.
            batch_invariant (`bool`, defaults to `False`): generate the samples of a batch one by one, so that a
                sample is bit-identical whatever else is in the batch (with one generator per sample). A batched
                call differs from a one-sample call by float rounding only (about 1e-5 in `[0, 1]`, see
                `benchmarks/batch_rounding.py`; BLAS kernels depend on the number of rows), at a fraction of the
                time. The callback then sees one sample at a time.
            adapter_names (`str` or `list[str]`, *optional*): the LoRA adapters this call uses (``[]``: the base
                model); default: the pipeline's choice (`set_adapters`). Nothing changes for later calls.
            report_candidates (`int`, *optional*): with ``"text"`` among the targets, sample this many candidates of
                every sample and return the one whose report is closest on average (cosine of the text prompt
                encoder's pooled embeddings) to the other candidates' reports: minimum Bayes risk decoding, the
                consensus of the samples. The chosen candidate's other targets come with it. Costs that many times
                the sampling; ``latents`` then holds the initial noise of every candidate, each sample's consecutive.
                Default: `DEFAULT_REPORT_CANDIDATES` (16) when a report is the only target and ``latents`` is not given,
                else 1 (docs/results/report-candidates.md).

        Examples:

        Returns:
            [`MedM2GPipelineOutput`] or `tuple` ``(images, text, provenance)``.
        """
        # 0. Inputs; every per-call choice stays local (no pipeline state changes between calls).
        targets = list(targets) if isinstance(targets, (list, tuple)) else targets
        self.check_inputs(
            prompt, conditions, targets, negative_prompt, height, width, num_inference_steps, guidance_scale,
            num_images_per_prompt, output_type, latents, max_text_tokens, callback_on_step_end_tensor_inputs,
        )
        if generator is not None and not isinstance(generator, torch.Generator) and not (
            isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator)
        ):
            raise ValueError(f"generator must be a torch.Generator or a list of them, one per sample; got {type(generator).__name__}")
        if adapter_names is not None:  # an unknown name fails here, before any work
            self._check_adapter_names([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        report_candidates = self.resolve_report_candidates(report_candidates, targets, latents)
        if batch_invariant:
            return self._generate_one_by_one(
                prompt, conditions, negative_prompt, num_images_per_prompt, generator, latents, return_dict,
                dict(targets=targets, height=height, width=width, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, eta=eta, output_type=output_type, callback_on_step_end=callback_on_step_end,
                     callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, max_text_tokens=max_text_tokens,
                     cross_guidance_scale=cross_guidance_scale, ct_in_hu=ct_in_hu, max_new_tokens=max_new_tokens,
                     adapter_names=adapter_names, report_candidates=report_candidates),
            )
        conditions = dict(conditions or {})
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self.image_size
        width = width or self.image_size

        # 1. Encode the conditions: report tokens, and each image's tokens plus its clean latent.
        image_inputs = {key: self.preprocess_condition(key, image) for key, image in conditions.items()}
        batch_sizes = {len(prompts)} if prompts else set()
        batch_sizes |= {images.shape[0] for images in image_inputs.values()}
        if len(batch_sizes) != 1:
            raise ValueError(f"prompt and conditions must have the same batch size; got {sorted(batch_sizes)}")
        batch = batch_sizes.pop() * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)}; pass one per sample ({batch})")
        # Report candidates are extra samples of each sample, drawn from that sample's own generator, so a seeded
        # sample's candidates do not depend on the rest of the batch.
        copies, batch = num_images_per_prompt * report_candidates, batch * report_candidates
        if isinstance(generator, list):
            generator = [g for g in generator for _ in range(report_candidates)]
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt must have one entry per prompt ({len(prompts)}); got {len(negatives)}")
        encoded = {}
        if prompts:
            encoded["text"] = self._repeat(self.encode_prompt(prompts, max_text_tokens), copies)
        sources = {}
        for key, images in image_inputs.items():
            tokens, latent = self.encode_image(key, images)
            encoded[key], sources[key] = self._repeat(tokens, copies), latent.repeat_interleave(copies, 0)

        # One batch for every stream (the joint loop couples them), so the unconditional half runs when any target
        # is guided; a target at scale <= 1 then takes its conditional half alone.
        scales = guidance_scales(guidance_scale, targets)
        do_guidance = any(scale > 1.0 for scale in scales.values())
        negative = None
        if do_guidance and negative_prompt is not None:
            negative = self._repeat(self.encode_prompt(negatives, max_text_tokens), copies)
        stream_conditions, stream_sources = {}, {}
        for target in targets:
            condition = self._join([encoded[key] for key in encoded if key in self.accepted_conditions(target)])
            if do_guidance:
                condition = Condition.cat([negative if negative is not None else condition.null(), condition])
            stream_conditions[target] = condition
            own = {key: latent for key, latent in sources.items() if key in self.multiflow.accepted_sources(MODALITIES[target].family)}
            stream_sources[target] = {key: torch.cat([latent, latent]) if do_guidance else latent for key, latent in own.items()}

        # 2. One scheduler copy per target (schedulers are stateful), all on the same timesteps.
        schedulers = {target: copy.deepcopy(self.scheduler) for target in targets}
        for scheduler in schedulers.values():
            scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = schedulers[targets[0]].timesteps
        # A stochastic step (DDIM with eta > 0, SDE solvers) draws its noise from the call's generator, so a
        # seeded call is reproducible whatever the scheduler; deterministic steps never draw from it.
        step_parameters = inspect.signature(self.scheduler.step).parameters
        extra_step_kwargs = {name: value for name, value in (("eta", eta), ("generator", generator)) if name in step_parameters}

        # 3. Initial noise per target.
        latents = dict(latents or {})
        latents = {
            target: self.prepare_latents(target, batch, height, width, generator, latents.get(target), schedulers[target])
            for target in targets
        }

        # 4. The joint loop: every target's denoiser reads its conditions, its sources and V of the others (with
        #    this call's LoRA adapters, if any).
        self._num_timesteps = len(timesteps)
        with self.lora_scope(adapter_names), self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_inputs = {
                    target: schedulers[target].scale_model_input(torch.cat([z, z]) if do_guidance else z, t)
                    for target, z in latents.items()
                }
                predictions = self.multiflow(
                    model_inputs,
                    {target: t for target in targets},
                    stream_conditions,
                    cross_guidance_scale=cross_guidance_scale,
                    sources={target: stream_sources[target] for target in targets if stream_sources[target]},
                )
                for target in targets:
                    prediction = predictions[target]
                    if do_guidance:
                        unconditional, conditional = prediction.chunk(2)
                        prediction = (unconditional + scales[target] * (conditional - unconditional)
                                      if scales[target] > 1.0 else conditional)
                    latents[target] = schedulers[target].step(prediction, t, latents[target], **extra_step_kwargs).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 5. Reports: decode every candidate and keep, per sample, the consensus one with its other targets.
        text = None
        if ("text" in targets and output_type != "latent") or report_candidates > 1:
            text = self.text_vae.decode(
                latents["text"][:, :, 0, 0] / self.text_vae.config.scaling_factor, self.tokenizer, max_new_tokens=max_new_tokens
            )
        if report_candidates > 1:
            chosen = self.choose_reports(text, report_candidates, max_text_tokens)
            text = None if output_type == "latent" else [text[i] for i in chosen]
            latents = {target: z[chosen] for target, z in latents.items()}

        # 6. Decode the images and postprocess; every output carries its provenance.
        images, provenance = {}, {}
        seed = generator.initial_seed() if isinstance(generator, torch.Generator) else None
        for target in targets:
            provenance[target] = {
                "model": self.name_or_path or type(self).__name__,
                "modality": target,
                "task": f"{'+'.join((['text'] if prompts else []) + list(conditions))} -> {target}",
                "targets": targets,
                "prompt": prompts[0][:500] if prompts else None,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": scales[target],
                "scheduler": type(self.scheduler).__name__,
                "seed": seed,
                "lora_adapters": self._call_adapters(adapter_names),
                "report_candidates": report_candidates,
            }
            if output_type == "latent":
                images[target] = latents[target]
            elif target != "text":
                decoded = self.vae.decode(latents[target].to(self.vae.dtype) / self.vae.config.scaling_factor).sample
                images[target] = self.postprocess_image(target, decoded, output_type, ct_in_hu, provenance[target])

        self.maybe_free_model_hooks()
        if not return_dict:
            return images, text, provenance
        return MedM2GPipelineOutput(images=images, text=text, provenance=provenance)

    def _generate_one_by_one(self, prompt, conditions, negative_prompt, num_images_per_prompt, generator, latents, return_dict, call):
        """``batch_invariant=True``: one call per sample, each with that sample's prompt, conditions, generator and
        initial noise, and the outputs joined in order (BLAS results depend on how many rows a matmul has)."""
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        conditions = {key: self._condition_rows(image) for key, image in (conditions or {}).items()}
        batch = len(prompts) if prompts else len(next(iter(conditions.values())))
        negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
        total = batch * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"generator is a list of {len(generator)}; pass one per sample ({total})")
        rows = []
        for index in range(total):
            source = index // num_images_per_prompt
            rows.append(self(
                prompt=[prompts[source]] if prompts else None,
                conditions={key: images[source] for key, images in conditions.items()} or None,
                negative_prompt=None if negatives is None else [negatives[source]],
                generator=generator[index] if isinstance(generator, list) else generator,
                latents={target: z[index : index + 1] for target, z in (latents or {}).items()} or None,
                num_images_per_prompt=1, return_dict=True, batch_invariant=False, **call,
            ))
        images = {}
        for target in rows[0].images:
            parts = [row.images[target] for row in rows]
            images[target] = (sum(parts, []) if isinstance(parts[0], list) else
                              np.concatenate(parts) if isinstance(parts[0], np.ndarray) else torch.cat(parts))
        text = sum((row.text for row in rows), []) if rows[0].text is not None else None
        provenance = rows[0].provenance
        if not return_dict:
            return images, text, provenance
        return MedM2GPipelineOutput(images=images, text=text, provenance=provenance)

    @staticmethod
    def _condition_rows(image: ImageInput) -> list:
        """A condition as one input per sample (a batch array or a list is split; one image is one sample)."""
        if isinstance(image, (list, tuple)):
            return [row for item in image for row in MedM2GPipeline._condition_rows(item)]
        if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
            return [image[i : i + 1] for i in range(image.shape[0])]
        return [image]

