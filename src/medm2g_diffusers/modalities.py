"""The single registry of modalities: keys, families and intensity conventions.

Every tensor that enters a model is in the model range ``[-1, 1]``; every tensor that leaves the package
is back in the modality's own units. The maps between the two live here and nowhere else:

| key | family | native units | to ``[-1, 1]`` |
| --- | --- | --- | --- |
| ``text`` | text | report string | tokenizer (not an intensity map) |
| ``xray`` | xray | transmission image in ``[0, 1]`` (bone bright) | linear ``[0, 1] -> [-1, 1]`` |
| ``ct`` | ct | Hounsfield units | window ``[-1000, 1000]`` HU, clipped (like MONAI ``ScaleIntensityRanged``) |
| ``mri_t1`` ``mri_t2`` ``mri_pd`` ``mri_flair`` ``mri_t1c`` | mri | arbitrary scanner signal | per-image 0.5-99.5 percentile scaling, clipped |

All ``mri_*`` keys share one MRI encoder and one MRI diffuser; ``contrast_index`` tells them apart. A model
knows the contrasts below its ``num_contrasts`` (``num_class_embeds``): ``mri_t1c`` (T1 after gadolinium, as in
BraTS) comes last, so checkpoints trained on the four phantom contrasts keep their indices and gain T1c only
through a fine-tune that adds it (``training/finetune_lora.py``).
Adding a modality (ultrasound, PET) is one :func:`register_modality` call here plus its encoder, diffuser
and alignment round; the pipeline never names a modality itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _clip(x: ArrayLike, low: float, high: float) -> ArrayLike:
    return torch.clamp(x, low, high) if isinstance(x, torch.Tensor) else np.clip(x, low, high)


def _as_float(x: ArrayLike) -> ArrayLike:
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)


@dataclass(frozen=True)
class WindowIntensity:
    """Linear map of a fixed native window ``[low, high]`` onto ``[-1, 1]``; values outside are clipped.

    Used for CT (a Hounsfield window) and X-ray (``[0, 1]``). Inside the window the round trip is exact up
    to float rounding, far below 1 HU.
    """

    low: float
    high: float
    units: str

    def __post_init__(self):
        if not self.high > self.low:
            raise ValueError(f"window high must exceed low; got low={self.low}, high={self.high}")

    def to_model(self, x: ArrayLike) -> ArrayLike:
        x = _as_float(x)
        return _clip((x - self.low) / (self.high - self.low) * 2.0 - 1.0, -1.0, 1.0)

    def from_model(self, y: ArrayLike, stats: ArrayLike | None = None) -> ArrayLike:
        y = _clip(_as_float(y), -1.0, 1.0)
        return (y + 1.0) / 2.0 * (self.high - self.low) + self.low


@dataclass(frozen=True)
class PercentileIntensity:
    """Per-image percentile scaling (MRI has no absolute units): ``[p_low, p_high] -> [-1, 1]``, clipped.

    ``to_model`` also returns the per-image percentiles so ``from_model`` can restore the original signal
    scale; without them ``from_model`` returns ``[0, 1]``. Percentiles are taken over the last two
    (spatial) axes, so a batch ``(B, C, H, W)`` is scaled image by image.
    """

    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    units: str = "signal"

    def __post_init__(self):
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(
                "percentiles must satisfy 0 <= lower_percentile < upper_percentile <= 100; "
                f"got {self.lower_percentile}, {self.upper_percentile}"
            )

    def percentiles(self, x: ArrayLike) -> ArrayLike:
        """Returns the per-image ``(low, high)`` percentiles stacked on a last axis of size 2."""
        x = _as_float(x)
        q = [self.lower_percentile / 100.0, self.upper_percentile / 100.0]
        if isinstance(x, torch.Tensor):
            flat = x.reshape(*x.shape[:-2], -1)
            return torch.quantile(flat, torch.tensor(q, dtype=flat.dtype, device=flat.device), dim=-1).movedim(0, -1)
        flat = x.reshape(*x.shape[:-2], -1)
        return np.moveaxis(np.quantile(flat, q, axis=-1), 0, -1).astype(x.dtype)

    def to_model(self, x: ArrayLike) -> ArrayLike:
        x = _as_float(x)
        stats = self.percentiles(x)
        low, high = stats[..., 0, None, None], stats[..., 1, None, None]
        # A constant image has high == low; the epsilon maps it to -1 instead of dividing by zero.
        scale = _clip(high - low, 1e-8, float("inf"))
        return _clip((x - low) / scale * 2.0 - 1.0, -1.0, 1.0)

    def from_model(self, y: ArrayLike, stats: ArrayLike | None = None) -> ArrayLike:
        unit = (_clip(_as_float(y), -1.0, 1.0) + 1.0) / 2.0
        if stats is None:
            return unit
        return unit * (stats[..., 1, None, None] - stats[..., 0, None, None]) + stats[..., 0, None, None]


IntensityMap = Union[WindowIntensity, PercentileIntensity]


@dataclass(frozen=True)
class Modality:
    """One registry entry.

    Args:
        key: the name used everywhere (dataset column, pipeline ``targets``, CLI).
        family: modalities of one family share a prompt encoder and a diffuser.
        description: human-readable name for docs, the demo and DICOM series descriptions.
        intensity: the native-units <-> ``[-1, 1]`` map, or ``None`` for text.
        contrast_index: position within its family (MRI contrasts), fed to a learned contrast embedding.
        dicom_modality: the DICOM ``Modality`` code written for synthetic outputs.
    """

    key: str
    family: str
    description: str
    intensity: IntensityMap | None = None
    contrast_index: int = 0
    dicom_modality: str | None = None

    @property
    def is_image(self) -> bool:
        return self.intensity is not None


CT_WINDOW_HU = (-1000.0, 1000.0)

MODALITIES: dict[str, Modality] = {}


def register_modality(modality: Modality) -> Modality:
    """Adds a modality to the registry; re-registering an existing key is an error, not a silent overwrite."""
    if modality.key in MODALITIES:
        raise ValueError(f"modality {modality.key!r} is already registered")
    MODALITIES[modality.key] = modality
    return modality


register_modality(Modality("text", "text", "radiology report"))
register_modality(Modality("xray", "xray", "chest X-ray", WindowIntensity(0.0, 1.0, "unit"), dicom_modality="DX"))
register_modality(Modality("ct", "ct", "CT", WindowIntensity(*CT_WINDOW_HU, "HU"), dicom_modality="CT"))
for _index, (_key, _name) in enumerate(
    [("mri_t1", "MRI T1-weighted"), ("mri_t2", "MRI T2-weighted"), ("mri_pd", "MRI proton density"), ("mri_flair", "MRI FLAIR"),
     ("mri_t1c", "MRI T1-weighted post-contrast")]
):
    register_modality(Modality(_key, "mri", _name, PercentileIntensity(), contrast_index=_index, dicom_modality="MR"))


def modality_keys() -> list[str]:
    """All registered keys, in registration order."""
    return list(MODALITIES)


def image_modality_keys() -> list[str]:
    """Keys of the imaging modalities (everything but text)."""
    return [k for k, m in MODALITIES.items() if m.is_image]


def family_keys() -> list[str]:
    """Distinct families in registration order."""
    return list(dict.fromkeys(m.family for m in MODALITIES.values()))


def modalities_of_family(family: str) -> list[str]:
    keys = [k for k, m in MODALITIES.items() if m.family == family]
    if not keys:
        raise ValueError(f"family must be one of {family_keys()}; got {family!r}")
    return keys


def get_modality(key: str, parameter: str = "modality") -> Modality:
    """Looks a key up, with an error that names the parameter and lists the valid keys."""
    if key not in MODALITIES:
        raise ValueError(f"{parameter} must be one of {modality_keys()}; got {key!r}")
    return MODALITIES[key]


def to_model_range(x: ArrayLike, key: str) -> ArrayLike:
    """Native units -> ``[-1, 1]`` (for MRI, per image; see :class:`PercentileIntensity`)."""
    modality = get_modality(key)
    if modality.intensity is None:
        raise ValueError(f"modality {key!r} has no intensity map (it is not an image)")
    return modality.intensity.to_model(x)


def from_model_range(y: ArrayLike, key: str, stats: ArrayLike | None = None) -> ArrayLike:
    """``[-1, 1]`` -> native units (CT in HU, X-ray in ``[0, 1]``, MRI in ``[0, 1]`` or, given ``stats``, signal)."""
    modality = get_modality(key)
    if modality.intensity is None:
        raise ValueError(f"modality {key!r} has no intensity map (it is not an image)")
    return modality.intensity.from_model(y, stats)
