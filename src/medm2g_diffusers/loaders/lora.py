"""LoRA adapters for `MedM2GPipeline`: adapt a trained MedM2G to your own data, keep the base, switch per call.

An adapter is a folder of three files, written by ``training/finetune_lora.py`` or
:meth:`MedM2GLoraLoaderMixin.save_lora_weights`:

* ``adapter_config.json``: the `peft.LoraConfig` (rank, alpha, the exact module names it adapts);
* ``adapter_model.safetensors``: the LoRA weights of the multi-flow model (`peft.get_peft_model_state_dict`);
* ``medm2g_lora.json``: what peft does not know: the base model it was trained on, the source slots and MRI
  contrasts it needs (a BraTS adapter adds ``mri_t1c``, see below), the task and data it was trained for.

Adapters go into the multi-flow model only (the denoisers' attention, θ_c and first convolution by default:
:func:`lora_target_modules`); the autoencoders and prompt encoders stay the base model's. When an adapter
needs a source the base cannot read (T1 post-contrast for T1 + T1c + T2 -> FLAIR), loading it first grows the
base: `MedM2GMultiFlowModel.with_source_slots` appends the slot with zero weights and
`MedM2GPromptEncoders.with_contrasts` adds the contrast with a copy of the T1 embedding, so everything the
base could do it still does, bit for bit, and the adapter's LoRA on ``conv_in`` reads the new slot.

Several adapters can be loaded at once. `set_adapters` chooses the active ones (with weights) for every later
call; ``pipe(..., adapter_names=[...])`` chooses them for one call only (``[]``: the base model), and the
pipeline's choice is back in place when the call returns. A pipeline with adapters runs one denoising loop at
a time (a lock), since switching adapters changes the shared model.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_METADATA_NAME = "medm2g_lora.json"
LORA_TARGETS = ("attention", "all")
# Linear layers of diffusers' `Attention` (self, cross) and of θ_c (`CrossGuidedAttnProcessor2_0`).
ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "to_k_guide", "to_v_guide")


def lora_target_modules(multiflow: nn.Module, families: Sequence[str], targets: str = "attention") -> list[str]:
    r"""
    The module names of ``multiflow`` that a LoRA adapter for ``families`` adapts.

    Args:
        multiflow (`MedM2GMultiFlowModel`): the model the adapter goes into.
        families (`list[str]`): denoiser families to adapt (``["ct"]`` for MRI -> CT, ``["text", "xray"]`` for
            report <-> X-ray).
        targets (`str`, defaults to `"attention"`):
            ``"attention"``: every attention projection (query, key, value, output), the cross-guided θ_c
            projections, and the first convolution, which reads the concatenated sources of image -> image
            tasks (a new source slot has only zero weights there, so without it the slot would stay unread).
            ``"all"``: every `nn.Linear` and `nn.Conv2d` of those denoisers (convolutions, time embedding, MLPs).

    Returns:
        `list[str]`: full module names, e.g. ``"unets.ct.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"``.
    """
    if targets not in LORA_TARGETS:
        raise ValueError(f"targets must be one of {LORA_TARGETS}; got {targets!r}")
    unknown = [f for f in families if f not in multiflow.unets]
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of the model's denoisers {list(multiflow.unets)}; got {list(families)}")
    names = []
    for family in families:
        for name, module in multiflow.unets[family].named_modules():
            # A layer another adapter already wraps is named for its wrapper; its plain layer is "<name>.base_layer".
            if ".lora_" in name or name.startswith("lora_") or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            name = name.replace(".base_layer", "")
            wanted = targets == "all" or name == "conv_in" or any(name == leaf or name.endswith("." + leaf) for leaf in ATTENTION_LEAVES)
            if wanted:
                names.append(f"unets.{family}.{name}")
    return names


def is_lora_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a MedM2G LoRA adapter folder (it has ``medm2g_lora.json``)."""
    return (Path(path) / ADAPTER_METADATA_NAME).is_file()


def read_lora_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``medm2g_lora.json`` of an adapter folder, with a clear error when the folder is not one."""
    folder = Path(path)
    missing = [name for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_METADATA_NAME) if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{str(folder)!r} is not a MedM2G LoRA adapter folder: it lacks {missing} (write one with "
            "training/finetune_lora.py or pipe.save_lora_weights)"
        )
    return json.loads((folder / ADAPTER_METADATA_NAME).read_text())


@dataclass
class _LoraState:
    """Which adapters a pipeline holds and which it uses by default (not part of its config)."""

    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # adapter name -> medm2g_lora.json
    configs: dict[str, Any] = field(default_factory=dict)  # adapter name -> peft.LoraConfig
    selected: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    contrast_init: dict[str, str] = field(default_factory=dict)  # contrasts extend_for taught the prompt encoders
    lock: threading.RLock = field(default_factory=threading.RLock)


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


class MedM2GLoraLoaderMixin:
    r"""
    `load_lora_weights` / `save_lora_weights` / `set_adapters` / `disable_lora` / `unload_lora_weights` for
    `MedM2GPipeline`, as diffusers' LoRA loaders offer them for Stable Diffusion, backed by `peft`.

    ```py
    >>> pipe = MedM2GPipeline.from_pretrained("medm2g-tiny")
    >>> pipe.load_lora_weights("runs/real/harvard_mri_to_ct/lora", adapter_name="harvard")
    >>> ct = pipe(conditions={"mri_t2": t2}, targets=["ct"]).images["ct"][0]                    # with the adapter
    >>> base = pipe(conditions={"mri_t2": t2}, targets=["ct"], adapter_names=[]).images["ct"][0]  # this call without
    >>> pipe.unload_lora_weights()                                                             # the base model again
    ```
    """

    @property
    def _lora(self) -> _LoraState:
        state = self.__dict__.get("_lora_state")
        if state is None:
            state = self.__dict__["_lora_state"] = _LoraState()
        return state

    # ------------------------------------------------------------------------------------------ queries

    def get_list_adapters(self) -> list[str]:
        """Names of the adapters loaded, in load order."""
        return list(self._lora.metadata)

    def get_active_adapters(self) -> list[str]:
        """Names of the adapters later calls use (see `set_adapters`); empty when LoRA is disabled or none is loaded."""
        return list(self._lora.selected)

    def lora_metadata(self, adapter_name: str) -> dict[str, Any]:
        """What ``medm2g_lora.json`` of a loaded adapter says (base model, task, data, extensions)."""
        self._check_adapter_names([adapter_name])
        return dict(self._lora.metadata[adapter_name])

    def _call_adapters(self, adapter_names: str | Sequence[str] | None) -> list[dict[str, Any]]:
        """The adapters a call with ``adapter_names`` uses, for its provenance: name, weight, task, base model."""
        names = self._lora.selected if adapter_names is None else [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        return [
            {"name": name, "weight": self._lora.weights.get(name, 1.0) if adapter_names is None else 1.0,
             "task": self._lora.metadata[name].get("task"), "base_model": self._lora.metadata[name].get("base_model")}
            for name in names
        ]

    def _check_adapter_names(self, names: Sequence[str], parameter: str = "adapter_names") -> list[str]:
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{parameter} must be a list of adapter names (strings); got {names!r}")
        unknown = [n for n in names if n not in self._lora.metadata]
        if unknown:
            raise ValueError(f"{parameter} names adapters that are not loaded: {unknown}; loaded: {self.get_list_adapters()}")
        if len(set(names)) != len(names):
            raise ValueError(f"{parameter} must not repeat an adapter; got {list(names)}")
        return list(names)

    # ------------------------------------------------------------------------------------- adding

    def add_lora_adapter(self, lora_config, adapter_name: str = "default", metadata: dict[str, Any] | None = None) -> None:
        r"""
        Injects a new, freshly initialised LoRA adapter into the multi-flow model (what fine-tuning starts from) and
        makes it the only active one.

        Args:
            lora_config (`peft.LoraConfig`): its ``target_modules`` name modules of ``self.multiflow``
                (:func:`lora_target_modules`).
            adapter_name (`str`, defaults to `"default"`): a name not loaded yet.
            metadata (`dict`, *optional*): what to record in ``medm2g_lora.json`` (task, data, ...); the base
                model and the model extensions are recorded by the pipeline itself.
        """
        from peft import LoraConfig

        if not isinstance(lora_config, LoraConfig):
            raise ValueError(f"lora_config must be a peft.LoraConfig; got {type(lora_config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or adapter_name in self._lora.metadata:
            raise ValueError(f"adapter_name must be a new non-empty name; loaded: {self.get_list_adapters()}; got {adapter_name!r}")
        with self._lora.lock:
            self._inject(adapter_name, lora_config)
            self._lora.configs[adapter_name] = lora_config
            self._lora.metadata[adapter_name] = {**(metadata or {}), "base_model": (metadata or {}).get("base_model") or self.name_or_path}
            self._activate([adapter_name], {adapter_name: 1.0})
            self._lora.selected, self._lora.weights = [adapter_name], {adapter_name: 1.0}

    def extend_for(self, source_slots: dict[str, list[str]] | None = None, contrast_init: dict[str, str] | None = None) -> None:
        r"""
        Grows the base model so that it can read new sources: appends ``source_slots`` (family -> the full slot list
        wanted, which must start with the current one) to the multi-flow model, and teaches the prompt encoders the
        contrasts of ``contrast_init`` (new key -> the known contrast its embedding starts from). A no-op for what
        the model already has. Loaded adapters are carried over.
        """
        source_slots, contrast_init = dict(source_slots or {}), dict(contrast_init or {})
        extra = {}
        for family, wanted in source_slots.items():
            have, wanted = self.multiflow.source_slots_of(family), list(wanted)
            shorter, longer = sorted([have, wanted], key=len)
            if longer[: len(shorter)] != shorter:
                raise ValueError(
                    f"source_slots[{family!r}] = {wanted} and this model's slots {have} differ: the adapter was trained on "
                    "a base with other source slots (slots may only be appended)"
                )
            if len(wanted) > len(have):
                extra[family] = wanted[len(have):]
        new_contrasts = {key: init for key, init in contrast_init.items() if key not in self.prompt_encoders.modality_keys()}
        if not extra and not new_contrasts:
            return
        with self._lora.lock:
            carried = {name: self._adapter_state(name) for name in self._lora.metadata}
            if carried:
                self._remove_lora_layers()
            multiflow = self.multiflow.with_source_slots(extra) if extra else self.multiflow
            prompt_encoders = self.prompt_encoders.with_contrasts(new_contrasts) if new_contrasts else self.prompt_encoders
            self.register_modules(multiflow=multiflow, prompt_encoders=prompt_encoders)
            self._lora.contrast_init.update(new_contrasts)
            for name, state in carried.items():
                self._inject(name, self._lora.configs[name], state)
            if carried:
                self._activate(self._lora.selected, self._lora.weights)

    # ------------------------------------------------------------------------------------ load / save

    def load_lora_weights(self, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str | None = None) -> str:
        r"""
        Loads a MedM2G LoRA adapter folder and makes it the only active adapter.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder written by ``training/finetune_lora.py``
                or `save_lora_weights` (safetensors only; nothing is unpickled).
            adapter_name (`str`, *optional*): the name to load it under (default: the name it was saved with).

        Returns:
            `str`: the adapter's name.
        """
        from peft import LoraConfig, PeftType
        from safetensors.torch import load_file

        folder = Path(pretrained_model_name_or_path)
        metadata = read_lora_metadata(folder)
        name = adapter_name or metadata.get("adapter_name") or folder.name
        if name in self._lora.metadata:
            raise ValueError(f"an adapter named {name!r} is already loaded; pass another adapter_name")
        config = LoraConfig.from_pretrained(str(folder))
        if config.peft_type != PeftType.LORA:
            raise ValueError(f"{folder} holds a {config.peft_type} adapter; MedM2G loads LoRA adapters only")
        self.extend_for(metadata.get("source_slots"), metadata.get("contrast_init"))
        state = load_file(str(folder / ADAPTER_WEIGHTS_NAME), device=str(self.device))
        with self._lora.lock:
            self._inject(name, config, state)
            self._lora.configs[name], self._lora.metadata[name] = config, {**metadata, "adapter_name": name}
            self._lora.selected, self._lora.weights = [name], {name: 1.0}
            self._activate(self._lora.selected, self._lora.weights)
        return name

    def save_lora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        r"""
        Writes one loaded adapter as a folder `load_lora_weights` reads (atomically: an existing folder is replaced
        only once the new one is complete).

        Args:
            save_directory (`str` or `os.PathLike`): the adapter folder.
            adapter_name (`str`, *optional*): which adapter (default: the only one loaded).
        """
        from safetensors.torch import save_file

        from ..training_utils import atomic_save_folder

        if adapter_name is None:
            if len(self._lora.metadata) != 1:
                raise ValueError(f"adapter_name is required when more than one adapter is loaded ({self.get_list_adapters()})")
            adapter_name = self.get_list_adapters()[0]
        self._check_adapter_names([adapter_name], "adapter_name")
        state = {k: v.detach().to("cpu").contiguous() for k, v in self._adapter_state(adapter_name).items()}
        config = self._lora.configs[adapter_name]
        metadata = {
            **self._lora.metadata[adapter_name], "adapter_name": adapter_name,
            # The model the adapter now sits in, so that loading it grows a plain base the same way.
            "source_slots": dict(self.multiflow.config.source_slots or {}),
            "contrast_init": {**self._lora.metadata[adapter_name].get("contrast_init", {}), **self._lora.contrast_init},
        }

        def write(folder: Path) -> None:
            config.save_pretrained(str(folder))
            save_file(state, str(folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            (folder / ADAPTER_METADATA_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")

        atomic_save_folder(write, save_directory)

    # ----------------------------------------------------------------------------------- switching

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None) -> None:
        r"""
        Chooses the adapters every later call uses (until the next `set_adapters`), each with a weight that scales
        its LoRA update (1.0 as trained; 0.0 turns it off; several adapters add up).

        Args:
            adapter_names (`str` or `list[str]`): loaded adapters; ``[]`` uses the base model.
            adapter_weights (`float` or `list[float]`, *optional*): one per adapter, or one for all (default 1.0).
        """
        names = self._check_adapter_names([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)) and not isinstance(adapter_weights, bool):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = list(adapter_weights)
        if len(weights) != len(names) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and torch.isfinite(torch.tensor(float(w))) for w in weights):
            raise ValueError(f"adapter_weights must be finite numbers, one per adapter in {names}; got {adapter_weights!r}")
        with self._lora.lock:
            self._lora.selected, self._lora.weights = names, {n: float(w) for n, w in zip(names, weights)}
            self._activate(self._lora.selected, self._lora.weights)

    def disable_lora(self) -> None:
        """Later calls use the base model (the adapters stay loaded; `enable_lora` or `set_adapters` brings them back)."""
        with self._lora.lock:
            self._lora.selected = []
            self._activate([], {})

    def enable_lora(self) -> None:
        """Later calls use every loaded adapter at weight 1.0."""
        self.set_adapters(self.get_list_adapters())

    @contextlib.contextmanager
    def lora_scope(self, adapter_names: Sequence[str] | None = None):
        r"""
        A context in which the multi-flow model uses ``adapter_names`` (at weight 1.0; ``None``: the pipeline's
        choice from `set_adapters`), restoring the pipeline's choice afterwards. `__call__`'s ``adapter_names``
        uses it; it holds the pipeline's lock, so concurrent calls never see each other's adapters.
        """
        if adapter_names is not None:
            adapter_names = self._check_adapter_names([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        if not self._lora.metadata:
            yield
            return
        with self._lora.lock:
            if adapter_names is None:
                yield
                return
            self._activate(adapter_names, {name: self._lora.weights.get(name, 1.0) for name in adapter_names})
            try:
                yield
            finally:
                self._activate(self._lora.selected, self._lora.weights)

    # ----------------------------------------------------------------------------------- removing

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Removes adapters; when none is left the model is exactly the base again (as after `unload_lora_weights`)."""
        names = self._check_adapter_names([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        with self._lora.lock:
            keep = [n for n in self._lora.metadata if n not in names]
            carried = {n: self._adapter_state(n) for n in keep}
            self._remove_lora_layers()
            for name in names:
                self._lora.metadata.pop(name)
                self._lora.configs.pop(name)
            for name in keep:
                self._inject(name, self._lora.configs[name], carried[name])
            self._lora.selected = [n for n in self._lora.selected if n in keep]
            self._lora.weights = {n: w for n, w in self._lora.weights.items() if n in keep}
            if keep:
                self._activate(self._lora.selected, self._lora.weights)

    def unload_lora_weights(self) -> None:
        """Removes every adapter: each adapted layer is replaced by its untouched base layer. Extensions made for
        an adapter (an added source slot or contrast) stay; they do not change what the base computes."""
        with self._lora.lock:
            self._remove_lora_layers()
            self._lora.metadata.clear()
            self._lora.configs.clear()
            self._lora.selected, self._lora.weights = [], {}

    # ----------------------------------------------------------------------------------- internals

    def _inject(self, name: str, config, state: dict[str, torch.Tensor] | None = None) -> None:
        """Adds adapter ``name`` to the multi-flow model: freshly initialised, or with the weights of ``state``."""
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        with warnings.catch_warnings():  # several adapters in one model are this mixin's design, not an accident
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, self.multiflow, name)
        if state is None:
            return
        result = set_peft_model_state_dict(self.multiflow, self._fit_conv_in(state), adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        # Every LoRA tensor of the adapter must land (the base model's own keys are "missing" by design).
        missing = [k for k in getattr(result, "missing_keys", []) or [] if f".lora_A.{name}." in k or f".lora_B.{name}." in k]
        if unexpected or missing:
            raise ValueError(f"adapter {name!r} does not fit this model: unexpected {unexpected[:5]}, missing {missing[:5]}")

    def _fit_conv_in(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An adapter trained before a source slot was appended reads fewer input channels in ``conv_in``: its
        LoRA down-projection gets zero weights for the appended ones, which leaves its outputs exactly as trained."""
        fitted = dict(state)
        for family in self.multiflow.unets:
            key = f"unets.{family}.conv_in.lora_A.weight"
            if key not in state:
                continue
            weight = state[key]
            channels = self.multiflow.unets[family].config.in_channels
            if weight.shape[1] > channels:
                raise ValueError(f"the adapter's {key} reads {weight.shape[1]} channels; this model's conv_in has {channels}")
            if weight.shape[1] < channels:
                fitted[key] = torch.cat([weight, weight.new_zeros(weight.shape[0], channels - weight.shape[1], *weight.shape[2:])], 1)
        return fitted

    def _adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.multiflow, adapter_name=name)

    def _activate(self, names: Sequence[str], weights: dict[str, float]) -> None:
        for _, layer in _tuner_layers(self.multiflow):
            if not names:
                layer.enable_adapters(False)
                continue
            layer.enable_adapters(True)
            layer.set_adapter(list(names))
            for name in names:
                layer.set_scale(name, weights.get(name, 1.0))

    def _remove_lora_layers(self) -> None:
        for name, layer in _tuner_layers(self.multiflow):
            parent_name, _, child = name.rpartition(".")
            parent = self.multiflow.get_submodule(parent_name) if parent_name else self.multiflow
            setattr(parent, child, layer.get_base_layer())
        self.multiflow.__dict__.pop("peft_config", None)  # what inject_adapter_in_model attached
