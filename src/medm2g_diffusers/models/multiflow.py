"""The multi-flow container of MedM2G (stage 3): every family's denoiser, coupled by cross-guided attention.

``MedM2GMultiFlowModel`` holds, as one diffusers model:

* ``unets``: one denoiser per family, the stage-2 single-flow models: a `UNet2DConditionModel` per imaging
  family (the MRI one with its contrast class embedding) and a :class:`~.text_unet.MedM2GTextUNet` for text,
  each rebuilt from a config dict stored in this model's config;
* ``context_encoders``: one :class:`~.context_encoder.ContextEncoder` V_m per family, holding the adaptive
  tokens f_m;
* the cross-guided processors θ_c (:class:`~.attention_processor.CrossGuidedAttnProcessor2_0`), installed on
  the denoisers' attention layers in ``__init__`` from this model's config. `Attention.set_processor`
  registers a processor that is an ``nn.Module`` as the layer's ``processor`` submodule, so θ_c is part of the
  state dict (``unets.<family>.<layer>.processor.to_k_guide.weight``) and ``save_pretrained`` /
  ``from_pretrained`` rebuild and reload it with no extra step.

One joint denoising step (:meth:`MedM2GMultiFlowModel.forward`) runs every stream A's denoiser on its own
latent, with its own condition tokens as ``encoder_hidden_states`` and, as guidance, the concatenated
``V_B(z_t^B, t_B)`` of every *other* stream B. A never sees its own latent through the guidance path, and a
stream generated alone gets no guidance at all: it is exactly its single-flow model.

Image -> image conditioning (MRI -> CT, contrast synthesis, CT -> X-ray) enters an imaging denoiser through
*source slots* (``source_slots``): a fixed list of modalities per family whose clean latents are concatenated
to the noisy latent, each followed by a presence-mask channel, zero-filled when that source is absent
(``shared/notes/image-to-image.md``: cross-attention alone learned nothing within a CPU budget). One denoiser
then serves text -> image (no slot filled), one-source and multi-source synthesis. ``source_guidance=True``
also (or, with no slots, only) routes each clean source through θ_c as ``V_S(z_0^S, t=0)``, the paper's
cross-guided route, so both can be measured. A report has no latent to concatenate to: an image -> report call
reaches the text denoiser through θ_c only, as ``V_S(z_0^S, t=0)`` of the image families in ``report_sources``,
beside that image's prompt-encoder tokens.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from accelerate import init_empty_weights
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from torch import nn

from ..modalities import family_keys, get_modality, modalities_of_family
from ..single_flow import Condition, unet_condition_kwargs
from .attention_processor import CrossGuidedAttnProcessor2_0, GuidanceAwareAttnProcessor2_0
from .context_encoder import ContextEncoder
from .text_unet import MedM2GTextUNet

ConditionLike = Union[Condition, tuple[torch.Tensor, Union[torch.Tensor, None]]]
# Context-encoder settings inferred from each denoiser; from_single_flow refuses them as overrides.
INFERRED_CONTEXT_KEYS = ("in_channels", "latent_type")


def is_text_family(family: str) -> bool:
    """A family whose modalities have no intensity map (the reports) is denoised by a `MedM2GTextUNet`."""
    return not any(get_modality(key).is_image for key in modalities_of_family(family))


def _plain_config(model: ModelMixin) -> dict[str, Any]:
    """A model's init config as JSON types (tuples become lists), without diffusers' private ``_`` keys."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


# ------------------------------------------------------------------------------------- partial loading


def read_safetensors(folder: str | os.PathLike, names: Sequence[str]) -> dict[str, torch.Tensor]:
    r"""
    Reads the tensors ``names``, and only those, from the weights ``save_pretrained`` wrote in ``folder``:
    ``diffusion_pytorch_model.safetensors``, or the shards its ``.index.json`` lists (only the shards that hold
    one of ``names`` are opened). `safetensors.safe_open` maps a file and copies out just the tensors asked for,
    so the others never enter memory.

    Returns:
        `dict[str, torch.Tensor]`: name -> tensor, in the dtype it is stored in.

    Raises:
        FileNotFoundError: ``folder`` has neither file (pickle weights are never read here).
        ValueError: a tensor of ``names`` is not in the weights, or the index names a file outside ``folder``.
    """
    folder = Path(folder)
    single, index = folder / SAFETENSORS_WEIGHTS_NAME, folder / SAFE_WEIGHTS_INDEX_NAME
    if single.is_file():
        files = dict.fromkeys(names, single)
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = [name for name in names if name not in weight_map]
        if missing:
            raise ValueError(
                f"{index} lists no shard for {len(missing)} tensors of the model, e.g. {missing[:3]}: the weights do not match config.json"
            )
        outside = sorted({shard for shard in weight_map.values() if Path(shard).name != shard})
        if outside:
            raise ValueError(f"{index} names shard files outside {folder}: {outside[:3]}")
        files = {name: folder / weight_map[name] for name in names}
    else:
        raise FileNotFoundError(
            f"{folder} has no {SAFETENSORS_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}; partial loading reads safetensors only"
        )
    tensors = {}
    for path in dict.fromkeys(files.values()):
        wanted = [name for name, file in files.items() if file == path]
        with safe_open(str(path), framework="pt") as handle:
            missing = sorted(set(wanted) - set(handle.keys()))
            if missing:
                raise ValueError(f"{path} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}: the weights do not match config.json")
            for name in wanted:
                tensors[name] = handle.get_tensor(name)
    return tensors


def loading_dtype(kwargs: dict[str, Any]) -> torch.dtype | None:
    """The weights' dtype among from_pretrained options: ``dtype``, or diffusers' older name ``torch_dtype``."""
    dtype, torch_dtype = kwargs.get("dtype"), kwargs.get("torch_dtype")
    if dtype is not None and torch_dtype is not None:
        raise ValueError(f"pass dtype or torch_dtype (its older name), not both; got dtype={dtype!r}, torch_dtype={torch_dtype!r}")
    dtype = dtype if dtype is not None else torch_dtype
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be one floating torch.dtype such as torch.bfloat16; got {dtype!r}")
    return dtype


def load_model_subset(
    model_class: type[ModelMixin],
    folder: str | os.PathLike,
    *,
    config_updates: dict[str, Any] | None = None,
    prune: Callable[[ModelMixin], None] | None = None,
    dtype: torch.dtype | None = None,
) -> ModelMixin:
    r"""
    Loads a part of a diffusers model saved in a local folder, reading only that part's tensors.

    The model is built with empty (meta) weights, as ``ModelMixin.from_pretrained`` builds it, from the folder's
    ``config.json`` updated by ``config_updates`` (e.g. ``{"families": ["text"]}`` for a `MedM2GPromptEncoders`
    with its text encoder only); ``prune`` may then delete submodules; exactly the tensors of what is left are read
    with :func:`read_safetensors` and assigned. Floating tensors are cast to ``dtype``, or to the model's own dtype
    without one, as diffusers casts them, so every part holds the values a full load gives it.

    Args:
        model_class (`type[ModelMixin]`): the model's class.
        folder (`str` or `os.PathLike`): a local folder written by ``save_pretrained``.
        config_updates (`dict`, *optional*): config values to change before building.
        prune (`Callable[[ModelMixin], None]`, *optional*): called on the empty model; deletes what is not loaded.
        dtype (`torch.dtype`, *optional*): the dtype to build in and cast floating weights to.

    Returns:
        The model, on the CPU in eval mode, with ``_name_or_path`` set to ``folder``.
    """
    dtype = loading_dtype({"dtype": dtype})
    config = dict(model_class.load_config(str(folder)))
    config.update(config_updates or {})
    default_dtype = torch.get_default_dtype()
    try:
        if dtype is not None:  # what diffusers does, so that buffers built in __init__ get the dtype too
            torch.set_default_dtype(dtype)
        with init_empty_weights():
            model = model_class.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    if prune is not None:
        prune(model)
    expected = model.state_dict()
    state = read_safetensors(folder, list(expected))
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name} in {folder} has shape {tuple(tensor.shape)}; config.json builds {tuple(expected[name].shape)}")
        if dtype is None:
            state[name] = tensor.to(expected[name].dtype)
        elif tensor.is_floating_point():
            state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.register_to_config(_name_or_path=str(folder))
    return model.eval()


class MedM2GMultiFlowModel(ModelMixin, ConfigMixin):
    r"""
    Per-family denoisers coupled by context encoders V and cross-guided attention θ_c.

    Build it from trained single-flow models with :meth:`from_single_flow`; reload a saved one with
    ``from_pretrained``. Do not call the denoisers' ``set_default_attn_processor`` (or enable xformers) on it:
    that would replace the installed processors and drop θ_c.

    Args:
        unet_configs (`dict[str, dict]`):
            Family -> init config of its denoiser (``UNet2DConditionModel`` for imaging families,
            ``MedM2GTextUNet`` for the text family). Families are registry families (`modalities.family_keys`).
        context_encoder_configs (`dict[str, dict]`):
            Family -> init config of its `ContextEncoder`; same families as ``unet_configs``. All must share one
            ``cross_attention_dim``, the width of the guidance tokens.
        apply_to_self_attention (`bool`, defaults to `False`):
            Whether self-attention layers (``attn1`` of the UNets' transformer blocks) also get θ_c. By default
            only cross-attention layers do, as in IP-Adapter: they already read external tokens, and it keeps
            θ_c at half the layers (the self-attention variant is unmeasured). Layers without θ_c still accept
            the guidance kwargs, silently.
        source_slots (`dict[str, list[str]]`, *optional*):
            Imaging family -> modality keys whose clean latents that family's denoiser can take, concatenated to
            its input in this order, each followed by one presence-mask channel. The denoiser's ``in_channels``
            must be ``C * (1 + n) + n`` for ``C`` latent channels and ``n`` slots.
        source_guidance (`bool`, defaults to `False`):
            Whether clean sources also reach an imaging target through θ_c as ``V_S(z_0^S, t=0)`` tokens.
        report_sources (`list[str]`, *optional*):
            Imaging families whose clean image (any of its modalities) the text denoiser reads through θ_c as
            ``V_S(z_0^S, t=0)`` when it writes a report from that image. Empty: a report is conditioned on the
            image's prompt-encoder tokens alone (the stage-2 path).
    """

    @register_to_config
    def __init__(
        self,
        unet_configs: dict[str, dict[str, Any]],
        context_encoder_configs: dict[str, dict[str, Any]],
        apply_to_self_attention: bool = False,
        source_slots: dict[str, list[str]] | None = None,
        source_guidance: bool = False,
        report_sources: list[str] | None = None,
    ):
        super().__init__()
        if not unet_configs:
            raise ValueError("unet_configs must name at least one family")
        unknown = [f for f in unet_configs if f not in family_keys()]
        if unknown:
            raise ValueError(f"unet_configs keys must be families from {family_keys()}; got {unknown}")
        if set(context_encoder_configs) != set(unet_configs):
            raise ValueError(
                f"context_encoder_configs must have the families of unet_configs, {list(unet_configs)}; "
                f"got {list(context_encoder_configs)}"
            )

        # Registry order, not dict order: a saved config.json sorts its keys, and parameter order (hence
        # optimizer state on resume) must not depend on whether the model was built or reloaded.
        families = [family for family in family_keys() if family in unet_configs]
        self.context_encoders = nn.ModuleDict(
            {family: ContextEncoder.from_config(context_encoder_configs[family]) for family in families}
        )
        guidance_dims = {encoder.config.cross_attention_dim for encoder in self.context_encoders.values()}
        if len(guidance_dims) != 1:
            raise ValueError(
                "every context encoder must have the same cross_attention_dim (guidance tokens of several families "
                f"are concatenated); got {sorted(guidance_dims)}"
            )
        self.guidance_dim = guidance_dims.pop()

        self.unets = nn.ModuleDict()
        for family in families:
            unet_class = MedM2GTextUNet if is_text_family(family) else UNet2DConditionModel
            self.unets[family] = unet_class.from_config(unet_configs[family])
            self._install_processors(self.unets[family])
        self._check_source_slots(source_slots or {})
        self._check_report_sources(report_sources or [])

    def _check_report_sources(self, report_sources: list[str]) -> None:
        if not report_sources:
            return
        if not any(is_text_family(family) for family in self.unets):
            raise ValueError(f"report_sources needs a text denoiser; this model has {list(self.unets)}")
        imaging = [family for family in self.unets if not is_text_family(family)]
        if not isinstance(report_sources, (list, tuple)) or any(f not in imaging for f in report_sources) or len(set(report_sources)) != len(report_sources):
            raise ValueError(f"report_sources must list distinct imaging families of this model, {imaging}; got {report_sources!r}")

    def _check_source_slots(self, source_slots: dict[str, list[str]]) -> None:
        for family, slots in source_slots.items():
            if family not in self.unets or is_text_family(family):
                raise ValueError(f"source_slots keys must be imaging families of this model; got {family!r}")
            for key in slots:
                if not get_modality(key, "source_slots").is_image:
                    raise ValueError(f"source_slots[{family!r}] must list imaging modality keys; got {key!r}")
            if len(set(slots)) != len(slots):
                raise ValueError(f"source_slots[{family!r}] lists a modality twice: {slots}")
            config = self.unets[family].config
            expected = config.out_channels * (1 + len(slots)) + len(slots)
            if config.in_channels != expected:
                raise ValueError(
                    f"the {family!r} denoiser takes {config.in_channels} input channels; with source slots {slots} it "
                    f"must take {expected} (latent + {len(slots)} x (latent + mask))"
                )

    def modality_keys(self, family: str) -> list[str]:
        """The modality keys ``family``'s denoiser can generate: all of the family's, or, with a class embedding
        (the MRI contrast), the first ``num_class_embeds`` of them."""
        if family not in self.unets:
            raise ValueError(f"family must be one of {list(self.unets)}; got {family!r}")
        keys = modalities_of_family(family)
        num_classes = getattr(self.unets[family].config, "num_class_embeds", None)
        return keys[:num_classes] if num_classes else keys

    def source_slots_of(self, family: str) -> list[str]:
        """The modality keys whose clean latents ``family``'s denoiser takes as concatenated sources."""
        return list((self.config.source_slots or {}).get(family, []))

    def accepted_sources(self, family: str) -> list[str]:
        """Modality keys a ``family`` target can be conditioned on image-wise (slots, or any imaging family's
        modality through θ_c when ``source_guidance`` is on; for text, the modalities of ``report_sources``)."""
        if is_text_family(family):
            return [key for source in self.config.report_sources or [] for key in modalities_of_family(source)]
        keys = self.source_slots_of(family)
        if self.config.source_guidance:
            keys += [
                key for other in self.checkpoint_families if not is_text_family(other)
                for key in modalities_of_family(other) if key not in keys
            ]
        return keys

    def _install_processors(self, unet: nn.Module) -> None:
        """θ_c on cross-attention layers (and on self-attention ones if configured); the guidance-aware stock
        processor everywhere else, so every layer accepts the guidance kwargs."""
        processors = {}
        for name in unet.attn_processors:
            attn = unet.get_submodule(name[: -len(".processor")])
            if attn.is_cross_attention or self.config.apply_to_self_attention:
                processors[name] = CrossGuidedAttnProcessor2_0(
                    attn.to_k.out_features, attn.to_v.out_features, self.guidance_dim
                )
            else:
                processors[name] = GuidanceAwareAttnProcessor2_0()
        unet.set_attn_processor(processors)

    # ----------------------------------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        families: Sequence[str] | None = None,
        source_families: Sequence[str] | None = None,
        **kwargs,
    ) -> "MedM2GMultiFlowModel":
        r"""
        ``ModelMixin.from_pretrained``, or, with ``families``, only some families' parts of the model.

        Without ``families`` this is diffusers' own loading, unchanged. With it, the other families' denoisers
        (and their θ_c) and context encoders are neither built nor read: :func:`load_model_subset` reads just the
        loaded parts' tensors from the safetensors. Such a model generates its loaded families as the whole model
        does, bit for bit; a stream of another family is refused with a `ValueError` naming it, and so is
        ``save_pretrained`` (it would write a checkpoint without the other families).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): with ``families``, a local folder.
            families (`Sequence[str]`, *optional*): the families whose denoiser and context encoder to load, e.g.
                ``["xray"]`` for text -> X-ray (conditions enter through the prompt encoders, not a denoiser).
            source_families (`Sequence[str]`, *optional*): families whose context encoder only is loaded too: the
                clean image sources of a ``source_guidance`` model, which reach θ_c as ``V_S(z_0^S, 0)``. Needs
                ``families``.
            kwargs: diffusers' loading options; with ``families`` only ``subfolder``, ``dtype`` (or ``torch_dtype``)
                and ``use_safetensors`` (not `False`) are supported.
        """
        if families is None:
            if source_families is not None:
                raise ValueError("source_families needs families: pass the families whose denoisers to load as well")
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        unsupported = sorted(set(kwargs) - {"subfolder", "dtype", "torch_dtype", "use_safetensors"})
        if unsupported:
            raise ValueError(f"with families=, only subfolder, dtype (torch_dtype) and use_safetensors are supported; got {unsupported}")
        dtype = loading_dtype(kwargs)
        if kwargs.get("use_safetensors") is False:
            raise ValueError("with families=, weights are read from safetensors only; got use_safetensors=False")
        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if not folder.is_dir():
            raise ValueError(
                f"with families=, pretrained_model_name_or_path must be a local folder; {os.fspath(folder)!r} is not one "
                "(download a Hub model first, e.g. with huggingface_hub.snapshot_download)"
            )
        checkpoint = [family for family in family_keys() if family in cls.load_config(str(folder))["unet_configs"]]
        named = {}
        for name, value in (("families", families), ("source_families", source_families or [])):
            if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(f, str) for f in value):
                raise ValueError(f"{name} must be a list of family names from {checkpoint}; got {value!r}")
            unknown = [family for family in value if family not in checkpoint]
            if unknown or len(set(value)) != len(value):
                raise ValueError(f"{name} must list distinct families of this checkpoint, {checkpoint}; got {list(value)}")
            named[name] = set(value)
        if not named["families"]:
            raise ValueError(f"families must name at least one family of {checkpoint}; got []")

        def prune(model: "MedM2GMultiFlowModel") -> None:
            for family in checkpoint:
                if family not in named["families"]:
                    del model.unets[family]
                    if family not in named["source_families"]:
                        del model.context_encoders[family]

        return load_model_subset(cls, folder, prune=prune, dtype=dtype)

    @property
    def checkpoint_families(self) -> list[str]:
        """The families this model has denoisers for in its config (registry order), whether loaded or not."""
        return [family for family in family_keys() if family in self.config.unet_configs]

    @property
    def is_partial(self) -> bool:
        """Whether some family's denoiser or context encoder was not loaded (``from_pretrained(families=...)``)."""
        return list(self.unets) != self.checkpoint_families or list(self.context_encoders) != self.checkpoint_families

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        r"""``ModelMixin.save_pretrained``; refused for a partially loaded model, whose config names families it does
        not hold (the saved checkpoint would not load)."""
        if self.is_partial:
            raise ValueError(
                f"this model holds the denoisers {list(self.unets)} and context encoders {list(self.context_encoders)} of "
                f"{self.checkpoint_families} (loaded with families=); load it whole to save it"
            )
        return super().save_pretrained(save_directory, *args, **kwargs)

    # DiffusionPipeline.save_pretrained passes safe_serialization, variant and max_shard_size only to save methods
    # whose signature names them.
    save_pretrained.__signature__ = inspect.signature(ModelMixin.save_pretrained)

    def _loaded(self, modules: nn.ModuleDict, family: str, what: str) -> nn.Module:
        """``modules[family]``, or a ValueError that names what to load when a partial load skipped it."""
        if family not in modules:
            raise ValueError(
                f"the {family!r} {what} is not loaded: this model was loaded with families={list(self.unets)}; load it with "
                f"from_pretrained(..., families=[..., {family!r}]) or without families="
            )
        return modules[family]

    @classmethod
    def from_single_flow(
        cls,
        unets: dict[str, nn.Module],
        context_encoder_kwargs: dict[str, Any] | None = None,
        apply_to_self_attention: bool = False,
        source_slots: dict[str, list[str]] | None = None,
        source_guidance: bool = False,
        report_sources: list[str] | None = None,
    ) -> "MedM2GMultiFlowModel":
        r"""
        Builds the container around trained stage-2 denoisers, copying their weights exactly.

        θ_c starts with zero values (the model predicts exactly what the single-flow models do) and, where the
        shapes match, keys copied from the layer's own ``to_k`` (as IP-Adapter initialises its key projection),
        so guidance tokens in the shared space are keyed like condition tokens from the first step.

        Args:
            unets (`dict[str, nn.Module]`):
                Family -> trained denoiser (`UNet2DConditionModel` or `MedM2GTextUNet`), with stock processors.
            context_encoder_kwargs (`dict`, *optional*):
                `ContextEncoder` settings shared by every family (``hidden_dim``, ``num_adaptive_tokens``,
                ``token_grid``, ...). ``in_channels`` and ``latent_type`` come from each denoiser;
                ``cross_attention_dim`` defaults to the denoisers' common ``cross_attention_dim`` (the prompt
                encoders' shared space, so adaptive tokens can be initialised from C_m embeddings).
            apply_to_self_attention (`bool`, defaults to `False`): see the class docstring.
            source_slots (`dict[str, list[str]]`, *optional*):
                Family -> source modalities (see the class docstring). The denoiser's first convolution is
                widened for them with zero weights (as InstructPix2Pix does), so the model still starts exactly
                at the single-flow one.
            source_guidance (`bool`, defaults to `False`): see the class docstring.
            report_sources (`list[str]`, *optional*): see the class docstring.

        Returns:
            `MedM2GMultiFlowModel` in float32 on the CPU; move it with ``.to()``.
        """
        if not unets:
            raise ValueError("unets must map at least one family to its single-flow denoiser")
        context_encoder_kwargs = dict(context_encoder_kwargs or {})
        inferred = [k for k in INFERRED_CONTEXT_KEYS if k in context_encoder_kwargs]
        if inferred:
            raise ValueError(f"context_encoder_kwargs must not set {inferred}: they are read from each denoiser")
        if "cross_attention_dim" not in context_encoder_kwargs:
            dims = [unet.config.cross_attention_dim for unet in unets.values()]
            if not all(isinstance(d, int) for d in dims) or len(set(dims)) != 1:
                raise ValueError(
                    "the denoisers do not share one integer cross_attention_dim "
                    f"({dims}); pass context_encoder_kwargs['cross_attention_dim']"
                )
            context_encoder_kwargs["cross_attention_dim"] = dims[0]

        source_slots = {family: list(keys) for family, keys in (source_slots or {}).items() if keys}
        unet_configs = {family: _plain_config(unet) for family, unet in unets.items()}
        for family, keys in source_slots.items():
            if family not in unet_configs or is_text_family(family):
                raise ValueError(f"source_slots keys must be imaging families of unets {list(unets)}; got {family!r}")
            config = unet_configs[family]
            if config["in_channels"] != config["out_channels"]:
                raise ValueError(f"unets[{family!r}] already takes extra input channels; pass a single-flow denoiser")
            config["in_channels"] = config["out_channels"] * (1 + len(keys)) + len(keys)
        model = cls(
            unet_configs=unet_configs,
            context_encoder_configs={
                family: {
                    # out_channels is the latent alone, even for a UNet that also takes concatenated sources.
                    "in_channels": unet.config.in_channels if is_text_family(family) else unet.config.out_channels,
                    "latent_type": "text" if is_text_family(family) else "image",
                    **context_encoder_kwargs,
                }
                for family, unet in unets.items()
            },
            apply_to_self_attention=apply_to_self_attention,
            source_slots=source_slots,
            source_guidance=source_guidance,
            report_sources=list(report_sources or []),
        )
        for family, unet in unets.items():
            model._load_single_flow(family, unet)
        return model

    @torch.no_grad()
    def with_source_slots(self, extra_slots: dict[str, list[str]]) -> "MedM2GMultiFlowModel":
        r"""
        A copy of this model whose imaging denoisers take more source slots, e.g. ``{"mri": ["mri_t1c"]}`` so
        that FLAIR can be synthesised from T1 + T1c + T2 after fine-tuning.

        The new slots are appended after the existing ones, and the first convolution gets their channels
        (latent + mask each) with zero weights, as :meth:`from_single_flow` does: for every input the model
        already served, the copy predicts what this model does (the new channels add exact zeros). They learn
        to read the new source in a fine-tune (LoRA on ``conv_in``: ``training/finetune_lora.py``).

        Args:
            extra_slots (`dict[str, list[str]]`): imaging family -> modality keys to add; keys a family already
                has are an error (nothing is silently skipped).

        Returns:
            `MedM2GMultiFlowModel`, a new model (this one is unchanged), on this model's device and dtype.
        """
        if self.is_partial:
            raise ValueError(f"with_source_slots needs the whole model; this one was loaded with families={list(self.unets)}")
        slots = {family: self.source_slots_of(family) for family in self.unets if not is_text_family(family)}
        for family, keys in extra_slots.items():
            if family not in slots:
                raise ValueError(f"extra_slots keys must be imaging families of this model {list(slots)}; got {family!r}")
            repeated = [key for key in keys if key in slots[family]]
            if repeated or not keys:
                raise ValueError(f"extra_slots[{family!r}] must name new source modalities; {family!r} already has {slots[family]}, got {keys}")
            if not slots[family] and self.unets[family].config.in_channels != self.unets[family].config.out_channels:
                raise ValueError(f"the {family!r} denoiser takes extra input channels that are not source slots")
            slots[family] = slots[family] + list(keys)
        unet_configs = {family: dict(config) for family, config in self.config.unet_configs.items()}
        for family in extra_slots:
            latent = unet_configs[family]["out_channels"]
            unet_configs[family]["in_channels"] = latent * (1 + len(slots[family])) + len(slots[family])
        extended = type(self).from_config(
            {**{k: v for k, v in self.config.items() if not k.startswith("_")}, "unet_configs": unet_configs,
             "source_slots": {family: keys for family, keys in slots.items() if keys}}
        )
        state = self.state_dict()
        for family in extra_slots:
            name = f"unets.{family}.conv_in.weight"
            weight = torch.zeros_like(extended.get_parameter(name))
            weight[:, : state[name].shape[1]] = state[name]
            state[name] = weight
        extended.load_state_dict(state, strict=True)
        extended.to(self.device)  # a dtype cast only when needed: to(dtype) on a float32 model warns in diffusers
        return (extended.to(self.dtype) if self.dtype != extended.dtype else extended).train(self.training)

    @torch.no_grad()
    def _load_single_flow(self, family: str, unet: nn.Module) -> None:
        target = self.unets[family]
        guided = {
            f"{name}.{parameter}"
            for name, module in target.named_modules()
            if isinstance(module, CrossGuidedAttnProcessor2_0)
            for parameter, _ in module.named_parameters()
        }
        state = dict(unet.state_dict())
        conv_in = target.get_submodule("conv_in") if hasattr(target, "conv_in") else None
        if conv_in is not None and "conv_in.weight" in state and state["conv_in.weight"].shape != conv_in.weight.shape:
            # Source slots: the latent's channels keep their weights, the new ones start at zero.
            weight = torch.zeros_like(conv_in.weight)
            weight[:, : state["conv_in.weight"].shape[1]] = state["conv_in.weight"]
            state["conv_in.weight"] = weight
        missing, unexpected = target.load_state_dict(state, strict=False)
        # Only θ_c may be absent from a single-flow state dict; anything else means a different architecture.
        if unexpected or set(missing) - guided:
            raise ValueError(
                f"unets[{family!r}] does not match the denoiser built from its config: missing "
                f"{sorted(set(missing) - guided)}, unexpected {sorted(unexpected)}"
            )
        for attn, processor in self._cross_guided_layers(family):
            if attn.to_k.bias is None and attn.to_k.weight.shape == processor.to_k_guide.weight.shape:
                processor.to_k_guide.weight.copy_(attn.to_k.weight)

    # ------------------------------------------------------------------------------------------- training

    def _cross_guided_layers(self, family: str) -> list[tuple[Attention, CrossGuidedAttnProcessor2_0]]:
        return [
            (module, module.processor)
            for module in self.unets[family].modules()
            if isinstance(module, Attention) and isinstance(module.processor, CrossGuidedAttnProcessor2_0)
        ]

    def trainable_parameters(
        self, families: str | Iterable[str] | None = None, denoisers: str | Iterable[str] = ()
    ) -> list[nn.Parameter]:
        r"""
        Freezes the whole model, then unfreezes and returns what stage 3 trains for ``families``: their context
        encoders V (adaptive tokens f included) and the θ_c projections inside their denoisers.

        Args:
            families (`str` or iterable of `str`, *optional*):
                Families whose V and θ_c train (e.g. ``["text", "xray"]`` for the first round, ``["ct"]`` for the
                text-ct round with text frozen). Defaults to every family of the model.
            denoisers (`str` or iterable of `str`, *optional*):
                Families whose whole denoiser also trains: the image -> image rounds, where the widened first
                convolution must learn to read the source slots.

        Returns:
            `list[nn.Parameter]`, the parameters to hand to the optimizer.
        """
        as_list = lambda value: [value] if isinstance(value, str) else list(value)  # noqa: E731
        requested = list(self.unets) if families is None else as_list(families)
        denoisers = as_list(denoisers)
        unknown = [f for f in requested + denoisers if f not in self.unets]
        if unknown:
            raise ValueError(f"families and denoisers must be subsets of {list(self.unets)}; got {unknown}")
        self.requires_grad_(False)
        parameters = []
        for family in self.unets:  # model order, for a stable optimizer state
            if family in requested:
                parameters.extend(self.context_encoders[family].parameters())
            if family in denoisers:
                parameters.extend(self.unets[family].parameters())
            elif family in requested:
                for _, processor in self._cross_guided_layers(family):
                    parameters.extend(processor.parameters())
        for parameter in parameters:
            parameter.requires_grad_(True)
        return parameters

    # -------------------------------------------------------------------------------------------- forward

    def family_of(self, key: str) -> str:
        """The family of a stream key, which is a family (``"mri"``) or a modality key (``"mri_t1"``)."""
        families = self.checkpoint_families
        family = key if key in families else get_modality(key, "latents key").family
        if family not in families:
            raise ValueError(f"latents key {key!r} is of family {family!r}; this model has denoisers for {families}")
        return family

    def guidance_tokens(
        self, latents: dict[str, torch.Tensor], timesteps: dict[str, torch.Tensor | float | int]
    ) -> dict[str, torch.Tensor]:
        r"""
        Runs each stream's context encoder: ``V_B(z_t^B, t_B)`` for every key B of ``latents``.

        Returns:
            `dict[str, torch.Tensor]`: key -> tokens of shape `(batch, N_B + K_B, guidance_dim)`.
        """
        return {
            key: self._loaded(self.context_encoders, self.family_of(key), "context encoder")(sample, timesteps[key])
            for key, sample in latents.items()
        }

    def forward(
        self,
        latents: dict[str, torch.Tensor],
        timesteps: dict[str, torch.Tensor | float | int],
        conditions: dict[str, ConditionLike],
        class_labels: dict[str, torch.Tensor] | None = None,
        cross_guidance_scale: float = 1.0,
        sources: dict[str, dict[str, torch.Tensor]] | None = None,
        source_keep: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        r"""
        One joint denoising step of every stream in ``latents``.

        Stream A's denoiser attends to ``conditions[A]`` through its usual cross-attention and, through θ_c, to
        ``cat_B V_B(z_t^B, t_B)`` over every other stream B (nothing when A is alone).

        Args:
            latents (`dict[str, torch.Tensor]`):
                Stream key -> noisy latent: `(batch, C, H, W)` for an image family, `(batch, D, 1, 1)` for text.
                A key is a family (``"ct"``, ``"mri"``) or a modality key (``"mri_t1"``); two contrasts of one
                family can be generated jointly as two streams. Every stream has the same batch size.
            timesteps (`dict[str, torch.Tensor | float | int]`):
                Key -> timestep, a scalar or `(batch,)`; one for every key of ``latents``.
            conditions (`dict[str, Condition | tuple]`):
                Key -> condition tokens for that stream's denoiser: a `Condition`, or ``(tokens, mask)`` with
                tokens `(batch, tokens, cross_attention_dim)` and mask `(batch, tokens)` or `None`.
            class_labels (`dict[str, torch.Tensor]`, *optional*):
                Key -> `(batch,)` labels for denoisers with a class embedding (the MRI contrast). For a modality
                key (``"mri_t2"``) it defaults to the registry's ``contrast_index``.
            cross_guidance_scale (`float`, defaults to 1.0):
                Weight of the guidance branch of every θ_c layer (0 turns the coupling off).
            sources (`dict[str, dict[str, torch.Tensor]]`, *optional*):
                Stream key -> {source modality key -> clean scaled latent `(batch, C, H, W)`}: the image -> image
                conditions of that stream, from :meth:`accepted_sources`. Slots with no source are zero-filled
                with a zero mask.
            source_keep (`dict[str, dict[str, torch.Tensor]]`, *optional*):
                Stream key -> {source key -> `(batch,)` bool}: rows where a given source counts as absent
                (source dropout in training, and the unconditional branch of guidance). Applies to slots.

        Returns:
            `dict[str, torch.Tensor]`: key -> the denoiser's prediction, shaped like that latent.
        """
        if not latents:
            raise ValueError("latents must hold at least one stream")
        for name, given in [("timesteps", timesteps), ("conditions", conditions)]:
            missing = [key for key in latents if key not in given]
            if missing:
                raise ValueError(f"{name} must have an entry for every key of latents; missing {missing}")
        batch_sizes = {key: sample.shape[0] for key, sample in latents.items()}
        if len(set(batch_sizes.values())) != 1:
            raise ValueError(f"every latent must have the same batch size; got {batch_sizes}")
        class_labels = class_labels or {}
        unknown = [key for key in class_labels if key not in latents]
        if unknown:
            raise ValueError(f"class_labels keys must be keys of latents {list(latents)}; got {unknown}")

        sources, source_keep = sources or {}, source_keep or {}
        unknown = [key for key in list(sources) + list(source_keep) if key not in latents]
        if unknown:
            raise ValueError(f"sources and source_keep keys must be keys of latents {list(latents)}; got {unknown}")

        guidance = self.guidance_tokens(latents, timesteps) if len(latents) > 1 else {}
        predictions = {}
        for key, sample in latents.items():
            family = self.family_of(key)
            unet = self._loaded(self.unets, family, "denoiser")
            stream_sources = sources.get(key, {})
            accepted = self.accepted_sources(family)
            refused = [source for source in stream_sources if source not in accepted]
            if refused:
                raise ValueError(
                    f"sources[{key!r}] has {refused}; the {family!r} denoiser of this model accepts image sources {accepted}"
                )
            model_input = sample
            if self.source_slots_of(family):
                model_input = torch.cat([sample, self.source_input(family, stream_sources, source_keep.get(key), sample)], dim=1)
            tokens, mask = self._unpack_condition(key, conditions[key])
            extra = {}
            labels = self._class_labels(key, family, class_labels.get(key), sample)
            if labels is not None:
                extra["class_labels"] = labels
            others = [tokens_b for other, tokens_b in guidance.items() if other != key]
            if self.config.source_guidance or is_text_family(family):
                # The paper's route for a clean source (a report's only one): its context tokens at t = 0.
                others += [
                    self._loaded(self.context_encoders, self.family_of(src), "context encoder")(latent, 0)
                    for src, latent in stream_sources.items()
                ]
            cross_attention_kwargs = None
            if others:
                cross_attention_kwargs = {
                    "guidance_hidden_states": torch.cat(others, dim=1),
                    "guidance_scale": cross_guidance_scale,
                }
            predictions[key] = unet(
                model_input,
                timesteps[key],
                **unet_condition_kwargs(unet, tokens, mask),
                cross_attention_kwargs=cross_attention_kwargs,
                **extra,
            ).sample
        return predictions

    def source_input(
        self,
        family: str,
        sources: dict[str, torch.Tensor],
        keep: dict[str, torch.Tensor] | None,
        like: torch.Tensor,
    ) -> torch.Tensor:
        r"""
        The source-slot channels of ``family``'s denoiser: for every slot, the clean latent then its presence
        mask, zero where the source is absent or not kept.

        Returns:
            `torch.Tensor` of shape `(batch, n_slots * (C + 1), H, W)` for ``like`` of shape `(batch, C, H, W)`.
        """
        batch, channels, height, width = like.shape
        keep = keep or {}
        parts = []
        for slot in self.source_slots_of(family):
            latent = sources.get(slot)
            present = torch.zeros(batch, 1, 1, 1, dtype=like.dtype, device=like.device)
            if latent is None:
                latent = torch.zeros_like(like)
            else:
                if latent.shape != like.shape:
                    raise ValueError(
                        f"source {slot!r} must be a latent of shape {tuple(like.shape)}, like the target's; got {tuple(latent.shape)}"
                    )
                present = present + 1
                if slot in keep:
                    present = present * keep[slot].to(device=like.device, dtype=like.dtype).view(batch, 1, 1, 1)
                latent = latent.to(like.dtype) * present
            parts += [latent, present.expand(batch, 1, height, width)]
        return torch.cat(parts, dim=1)

    @staticmethod
    def _unpack_condition(key: str, condition: ConditionLike) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(condition, Condition):
            return condition.tokens, condition.mask
        if isinstance(condition, (tuple, list)) and len(condition) == 2 and torch.is_tensor(condition[0]):
            return condition[0], condition[1]
        raise ValueError(
            f"conditions[{key!r}] must be a Condition or a (tokens, mask) tuple; got {type(condition).__name__}"
        )

    def _class_labels(
        self, key: str, family: str, labels: torch.Tensor | None, sample: torch.Tensor
    ) -> torch.Tensor | None:
        has_class_embedding = bool(getattr(self.unets[family].config, "num_class_embeds", None))
        if not has_class_embedding:
            if labels is not None:
                raise ValueError(f"class_labels[{key!r}] was given, but the {family!r} denoiser has no class embedding")
            return None
        if labels is not None:
            return labels
        if key != family:  # a modality key names its contrast
            if key not in self.modality_keys(family):
                raise ValueError(
                    f"latents key {key!r} is a contrast the {family!r} denoiser was not trained on; it knows {self.modality_keys(family)}"
                )
            return torch.full((sample.shape[0],), get_modality(key).contrast_index, dtype=torch.long, device=sample.device)
        raise ValueError(
            f"class_labels[{key!r}] is required: the {family!r} denoiser has a class embedding (e.g. the MRI contrast); "
            f"pass (batch,) labels or use a modality key such as {modalities_of_family(family)[0]!r}"
        )
