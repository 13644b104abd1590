"""A small per-modality CNN that says which findings an image shows: the judge of generated images.

The benchmark asks whether an X-ray generated from "large left pleural effusion" shows an effusion, and
whether a generated X-ray and CT agree. A :class:`MedM2GFindingClassifier` is trained on real phantom images
only (:func:`~medm2g_diffusers.evaluation.train_finding_classifier.train_finding_classifier`), one per
modality key, and its accuracy on real test images is reported beside every score it gives generated
images: a finding the phantom does not render in a modality (a nodule outside the single CT slice) caps both.

This file holds the model, the labels it is trained on (:func:`finding_labels`, :func:`finding_examples`)
and the metrics it is scored with (:func:`classifier_metrics`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..data.datasets import has_image
from ..data.phantoms import FINDING_VOCABULARY
from ..modalities import get_modality, to_model_range
from ..models.prompt_encoders import DownBlock, check_input_windows, stack_input_windows  # shared with the prompt encoders

DEFAULT_THRESHOLD = 0.5

LabelsLike = np.ndarray | torch.Tensor | Sequence[set]


def default_finding_types(anatomies: Sequence[str]) -> list[str]:
    """The types of :data:`FINDING_VOCABULARY` of the given anatomies, in vocabulary order."""
    known = sorted({spec["anatomy"] for spec in FINDING_VOCABULARY.values()})
    unknown = sorted(set(anatomies) - set(known))
    if unknown:
        raise ValueError(f"anatomies must be a subset of {known}; got {unknown}")
    return [name for name, spec in FINDING_VOCABULARY.items() if spec["anatomy"] in anatomies]


# Display windows of a radiologist's CT reading, in HU: brain (W80 L40, widened to take in CSF and acute
# blood) and soft tissue (W400 L40: effusion, consolidation, mediastinum).
CT_WINDOWS_HU = {"brain": (-20.0, 100.0), "soft_tissue": (-160.0, 240.0)}


def default_input_windows(modality: str) -> list[list[float]]:
    """Extra input windows for a modality, in the model range: the :data:`CT_WINDOWS_HU` for ``"ct"``.

    X-ray and MRI get none: X-ray has no calibrated units, and MRI is already percentile-scaled per image.
    """
    if modality != "ct":
        get_modality(modality, "modality")
        return []
    return [[round(float(to_model_range(np.float32(v), "ct")), 6) for v in (low, high)] for low, high in CT_WINDOWS_HU.values()]


def check_finding_types(finding_types: Sequence[str], parameter: str = "finding_types") -> list[str]:
    if isinstance(finding_types, str) or not all(isinstance(t, str) and t for t in finding_types):
        raise ValueError(f"{parameter} must be a list of non-empty strings; got {finding_types!r}")
    finding_types = list(finding_types)
    if not finding_types:
        raise ValueError(f"{parameter} must name at least one finding type")
    if len(set(finding_types)) != len(finding_types):
        raise ValueError(f"{parameter} must not repeat a type; got {finding_types}")
    return finding_types


# ------------------------------------------------------------------------------------------------ model


class MedM2GFindingClassifier(ModelMixin, ConfigMixin):
    r"""
    Multi-label finding classifier for one image modality: ``(B, 1, H, W)`` in ``[-1, 1]`` -> ``(B, n_types)`` logits.

    Optional fixed intensity windows are stacked onto the image as extra input channels, as a radiologist
    reads a head CT in a brain window: in the ``[-1000, 1000]`` HU model range, grey matter and an acute bleed
    differ by about 0.03, which a network must otherwise learn to amplify out of an image spanning 2.0.

    Then a 3x3 stem at full resolution, ``len(block_out_channels)`` stride-2 residual blocks (GroupNorm + SiLU),
    average pooling to a ``pool_size x pool_size`` grid (plus, by default, each channel's global maximum) and
    one linear layer. A grid larger than 1x1 keeps where a feature is (left or right, on the midline or off
    it), which global pooling would throw away.

    Args:
        modality (`str`): the modality key the classifier reads (``"xray"``, ``"ct"``, ``"mri_t1"``, ...).
            Only recorded (and checked to be an image key): the caller maps native units with
            ``modalities.to_model_range(x, modality)``.
        finding_types (`list[str]`): the labels, in logit order.
        image_size (`int`): side of the square input; other sizes are an error, not resized.
        stem_channels (`int`): channels of the full-resolution stem.
        block_out_channels (`list[int]`): channels of each stride-2 block.
        norm_num_groups (`int`): GroupNorm groups (must divide every channel count).
        pool_size (`int`): side of the pooled grid before the linear head (1 = global average pooling).
        threshold (`float`): probability at or above which :meth:`predict_findings` reports a finding.
        input_windows (`list[list[float]]`): ``[low, high]`` pairs in the model range; each adds the channel
            ``clip((x - low) / (high - low) * 2 - 1, -1, 1)``. See :func:`default_input_windows`.
        global_max_pool (`bool`): also feed the head the global maximum of each channel, which says that a
            small lesion is somewhere in the image even where averaging dilutes it.
    """

    @register_to_config
    def __init__(
        self,
        modality: str = "xray",
        finding_types: list[str] = ("pleural_effusion",),
        image_size: int = 64,
        stem_channels: int = 8,
        block_out_channels: list[int] = (8, 16, 32, 64),
        norm_num_groups: int = 8,
        pool_size: int = 2,
        threshold: float = DEFAULT_THRESHOLD,
        input_windows: list[list[float]] = (),
        global_max_pool: bool = True,
    ):
        super().__init__()
        if not get_modality(modality, "modality").is_image:
            raise ValueError(f"modality must be an image modality key; got {modality!r}")
        check_finding_types(finding_types)
        if not block_out_channels:
            raise ValueError("block_out_channels must list at least one block")
        for channels in (stem_channels, *block_out_channels):
            if channels % norm_num_groups:
                raise ValueError(f"norm_num_groups ({norm_num_groups}) must divide every channel count; got {channels}")
        reduction = 2 ** len(block_out_channels)
        if image_size % reduction:
            raise ValueError(f"image_size must be divisible by 2**len(block_out_channels) = {reduction}; got {image_size}")
        if not 1 <= pool_size <= image_size // reduction:
            raise ValueError(f"pool_size must be in [1, {image_size // reduction}] (the last feature map's side); got {pool_size}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1); got {threshold}")

        check_input_windows(input_windows)

        self.conv_in = nn.Conv2d(1 + len(input_windows), stem_channels, 3, padding=1)
        self.norm_in = nn.GroupNorm(norm_num_groups, stem_channels)
        channels = [stem_channels, *block_out_channels]
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[i], channels[i + 1], norm_num_groups) for i in range(len(block_out_channels))
        )
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        features = block_out_channels[-1] * (pool_size * pool_size + int(global_max_pool))
        self.classifier = nn.Linear(features, len(finding_types))

    @property
    def finding_types(self) -> list[str]:
        return list(self.config.finding_types)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        r"""
        Args:
            images (`torch.Tensor` of shape `(batch, 1, image_size, image_size)`): images in the model range ``[-1, 1]``.

        Returns:
            `torch.Tensor` of shape `(batch, n_types)`: one logit per finding type (sigmoid -> probability).
        """
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"images must have shape (batch, 1, {size}, {size}); got {tuple(images.shape)}")
        hidden_states = stack_input_windows(images, self.config.input_windows)
        hidden_states = F.silu(self.norm_in(self.conv_in(hidden_states)))
        for block in self.down_blocks:
            hidden_states = block(hidden_states)
        features = self.pool(hidden_states).flatten(1)
        if self.config.global_max_pool:
            features = torch.cat([features, hidden_states.amax(dim=(2, 3))], dim=1)
        return self.classifier(features)

    @torch.no_grad()
    def predict_probabilities(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        r"""
        Args:
            images (`np.ndarray` or `torch.Tensor` of shape `(batch, H, W)` or `(batch, 1, H, W)`): model range ``[-1, 1]``.
            batch_size (`int`): images per forward pass.

        Returns:
            `np.ndarray` of shape `(batch, n_types)`: sigmoid probabilities, float32.
        """
        images = torch.as_tensor(np.asarray(images, dtype=np.float32) if isinstance(images, np.ndarray) else images)
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.numel() and (images.min() < -1.01 or images.max() > 1.01):
            raise ValueError(
                "images must be in the model range [-1, 1] (map native units with modalities.to_model_range); "
                f"got [{images.min().item():.3g}, {images.max().item():.3g}]"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        was_training = self.training
        self.eval()
        out = [
            torch.sigmoid(self(chunk.to(self.device, self.dtype))).float().cpu()
            for chunk in images.split(batch_size)
        ]
        self.train(was_training)
        if not out:
            return np.zeros((0, len(self.finding_types)), dtype=np.float32)
        return torch.cat(out).numpy()

    def predict_findings(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> list[set[str]]:
        r"""
        Args:
            images (`np.ndarray` or `torch.Tensor` of shape `(batch, H, W)` or `(batch, 1, H, W)`): model range ``[-1, 1]``.

        Returns:
            `list[set[str]]`: per image, the types whose probability is at least ``config.threshold``.
        """
        return label_sets(self.predict_probabilities(images, batch_size) >= self.config.threshold, self.finding_types)


# ----------------------------------------------------------------------------------------------- labels


def finding_labels(findings: Sequence[str | list[dict[str, Any]]], finding_types: Sequence[str]) -> np.ndarray:
    """Multi-hot labels of a column of findings.

    Args:
        findings: per image, the dataset's ``findings`` JSON string (a list of dicts with a ``"type"``), or
            that list already parsed.
        finding_types: the label order; types in ``findings`` outside it are ignored (e.g. head findings for
            an X-ray classifier).

    Returns:
        `np.ndarray` of shape `(len(findings), len(finding_types))`, float32 0/1.
    """
    finding_types = check_finding_types(finding_types)
    index = {name: i for i, name in enumerate(finding_types)}
    labels = np.zeros((len(findings), len(finding_types)), dtype=np.float32)
    for row, entry in enumerate(findings):
        try:
            parsed = json.loads(entry) if isinstance(entry, str) else entry
            types = [item["type"] for item in parsed]
        except (TypeError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"findings[{row}] must be a JSON list of dicts with a 'type'; got {entry!r}") from error
        for name in types:
            if name in index:
                labels[row, index[name]] = 1.0
    return labels


def label_sets(labels: np.ndarray, finding_types: Sequence[str]) -> list[set[str]]:
    """0/1 (or boolean) labels `(N, n_types)` -> per row, the set of types that are 1."""
    return [{finding_types[j] for j in np.flatnonzero(row)} for row in np.asarray(labels)]


class FindingExamples(NamedTuple):
    """What :func:`finding_examples` returns.

    Args:
        images (`np.ndarray` of shape `(N, H, W)`): float32 in the model range ``[-1, 1]``.
        labels (`np.ndarray` of shape `(N, n_types)`): float32 0/1, from the rows' ``findings``.
        rows (`np.ndarray` of shape `(N,)`): the rows of the split they came from (where the image exists).
    """

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray


def finding_examples(split, modality: str, finding_types: Sequence[str]) -> FindingExamples:
    """The (image, labels) pairs of one modality in a ``datasets.Dataset`` split, rows without the image skipped.

    Images are mapped from native units (HU, X-ray ``[0, 1]``, MR signal) to ``[-1, 1]`` with
    ``modalities.to_model_range``.
    """
    if not get_modality(modality, "modality").is_image:
        raise ValueError(f"modality must be an image modality key; got {modality!r}")
    for column in (modality, "findings"):
        if column not in split.column_names:
            raise ValueError(f"split has no column {column!r}; columns are {split.column_names}")
    rows = np.flatnonzero(has_image(split, modality))
    subset = split.select(rows.tolist())
    labels = finding_labels(subset["findings"], finding_types)
    if len(rows) == 0:
        return FindingExamples(np.zeros((0, 0, 0), dtype=np.float32), labels, rows)
    images = np.asarray(subset.with_format("numpy", columns=[modality])[:][modality], dtype=np.float32)
    if np.isnan(images).any():
        raise ValueError(f"column {modality!r} has NaN pixels in rows that are not null")
    return FindingExamples(np.asarray(to_model_range(images, modality), dtype=np.float32), labels, rows)


# ---------------------------------------------------------------------------------------------- metrics


def _as_label_matrix(values: LabelsLike, finding_types: list[str], threshold: float, parameter: str) -> np.ndarray:
    """Sets of type names, or `(N, n_types)` probabilities / 0-1 labels -> boolean `(N, n_types)`."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim != 2 or values.shape[1] != len(finding_types):
            raise ValueError(f"{parameter} must have shape (N, {len(finding_types)}); got {values.shape}")
        if np.isnan(values).any() or values.min(initial=0.0) < 0.0 or values.max(initial=0.0) > 1.0:
            raise ValueError(f"{parameter} must hold probabilities or 0/1 labels in [0, 1]")
        return values >= threshold
    values = list(values)
    known = set(finding_types)
    matrix = np.zeros((len(values), len(finding_types)), dtype=bool)
    for row, entry in enumerate(values):
        if not isinstance(entry, (set, frozenset, list, tuple)):
            raise ValueError(f"{parameter}[{row}] must be a set of finding types; got {entry!r}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{parameter}[{row}] has types outside finding_types {finding_types}: {unknown}")
        for j, name in enumerate(finding_types):
            matrix[row, j] = name in entry
    return matrix


def classifier_metrics(
    predictions: LabelsLike, true_labels: LabelsLike, finding_types: Sequence[str], threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    r"""Scores multi-label predictions against the truth.

    Args:
        predictions: `(N, n_types)` probabilities or 0/1 labels (a type is predicted when ``>= threshold``),
            or a list of N sets of type names (what :meth:`MedM2GFindingClassifier.predict_findings` returns).
        true_labels: the truth, in either form.
        finding_types (`list[str]`): the label order (and the names allowed in sets).
        threshold (`float`): for probability arrays.

    Returns:
        `dict`: ``n`` (images), ``exact_set_accuracy`` (fraction of images with every type right),
        ``label_accuracy`` (fraction of (image, type) pairs right), ``macro_f1`` (mean of the per-type F1
        over the types where it is defined) and ``per_type``: per type ``f1``, ``precision``, ``recall``,
        ``accuracy``, ``support`` (true positives + false negatives) and ``predicted``. A ratio with a zero
        denominator (e.g. F1 of a type neither present nor predicted) is ``None`` and left out of the macro
        mean; ``macro_f1`` is ``None`` when no type has an F1.
    """
    finding_types = check_finding_types(finding_types)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    predicted = _as_label_matrix(predictions, finding_types, threshold, "predictions")
    truth = _as_label_matrix(true_labels, finding_types, threshold, "true_labels")
    if predicted.shape[0] != truth.shape[0]:
        raise ValueError(f"predictions and true_labels must have the same length; got {predicted.shape[0]} and {truth.shape[0]}")
    if predicted.shape[0] == 0:
        raise ValueError("predictions must hold at least one image")

    def ratio(numerator: float, denominator: float) -> float | None:
        return float(numerator / denominator) if denominator else None

    per_type = {}
    for j, name in enumerate(finding_types):
        tp = int(np.sum(predicted[:, j] & truth[:, j]))
        fp = int(np.sum(predicted[:, j] & ~truth[:, j]))
        fn = int(np.sum(~predicted[:, j] & truth[:, j]))
        per_type[name] = {
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn),
            "accuracy": float(np.mean(predicted[:, j] == truth[:, j])),
            "support": tp + fn,
            "predicted": tp + fp,
        }
    f1s = [entry["f1"] for entry in per_type.values() if entry["f1"] is not None]
    return {
        "n": int(predicted.shape[0]),
        "exact_set_accuracy": float(np.mean(np.all(predicted == truth, axis=1))),
        "label_accuracy": float(np.mean(predicted == truth)),
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "per_type": per_type,
    }
