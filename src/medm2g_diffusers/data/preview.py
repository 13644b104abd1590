"""Preview montages: one row per sample, one column per imaging modality, for a quick look at a dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..modalities import image_modality_keys, to_model_range

HEADER_HEIGHT = 14


def display_range(array: np.ndarray, key: str) -> np.ndarray:
    """Native units -> ``[0, 1]`` for display, through the modality's own model-range map.

    CT is shown in the model's HU window, MRI with per-image percentile scaling, X-ray as is, so what a
    preview shows is what the network sees.
    """
    return (np.asarray(to_model_range(np.asarray(array, dtype=np.float32), key)) + 1.0) / 2.0


def montage(
    samples: Sequence[Mapping[str, np.ndarray | None]],
    modalities: Sequence[str] | None = None,
    tile: int | None = None,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """Lays samples out as a grey grid with column headers; a missing modality is a black tile.

    Args:
        samples: each a mapping ``modality -> (H, W)`` array in native units, or None.
        modalities: columns, default every imaging modality in the registry.
        tile: side of each tile in pixels (default: the first image's height, at least 64).
        labels: optional text drawn in the corner of each row's first tile.

    Returns:
        An 8-bit grey ``PIL.Image``.
    """
    modalities = list(modalities or image_modality_keys())
    if not samples:
        raise ValueError("samples must contain at least one sample")
    if tile is None:
        first = next((s[k] for s in samples for k in modalities if s.get(k) is not None), None)
        tile = max(64, first.shape[0]) if first is not None else 64
    canvas = Image.new("L", (tile * len(modalities), HEADER_HEIGHT + tile * len(samples)), 0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for col, key in enumerate(modalities):
        draw.text((col * tile + 2, 1), key, fill=255, font=font)
    for row, sample in enumerate(samples):
        for col, key in enumerate(modalities):
            array = sample.get(key)
            if array is None:
                continue
            grey = (np.clip(display_range(array, key), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            canvas.paste(Image.fromarray(grey).resize((tile, tile), Image.BILINEAR), (col * tile, HEADER_HEIGHT + row * tile))
        if labels is not None:
            draw.text((2, HEADER_HEIGHT + row * tile + 2), labels[row], fill=255, font=font)
    return canvas
