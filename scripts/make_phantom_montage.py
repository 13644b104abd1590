"""Draws the virtual-patient montage in ``docs/phantoms.md``: one row per patient, every modality, the impression.

Rows are the first patients (by index) that match a list of cases, so the figure shows normal studies and
each kind of finding while staying a pure function of ``--seed`` and ``--size``.

    python scripts/make_phantom_montage.py --out docs/images/phantoms_montage.png
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medm2g_diffusers.data.phantoms import MODALITY_KEYS, PhantomGenerator, VirtualPatient

# CT windows (level, width) in HU, as a radiologist would read each anatomy.
CT_WINDOWS = {"chest": (-400.0, 1200.0), "head": (40.0, 90.0)}

CASES: list[tuple[str, Callable[[VirtualPatient], bool]]] = [
    ("chest, normal", lambda p: p.anatomy == "chest" and p.is_normal),
    ("chest, effusion", lambda p: "pleural_effusion" in _types(p) and _attr(p, "pleural_effusion", "size") == "large"),
    ("chest, pneumothorax", lambda p: _types(p) >= {"pneumothorax"} and _attr(p, "pneumothorax", "size") == "large"),
    ("chest, mass/nodule", lambda p: bool(_types(p) & {"mass", "nodule"}) and "pacemaker" in _types(p)),
    ("chest, consolidation", lambda p: _types(p) >= {"consolidation", "cardiomegaly"}),
    ("head, normal", lambda p: p.anatomy == "head" and p.is_normal),
    ("head, tumour", lambda p: _types(p) >= {"tumour", "midline_shift"}),
    ("head, haemorrhage", lambda p: _types(p) == {"haemorrhage"}),
]


def _types(patient: VirtualPatient) -> set[str]:
    return {f["type"] for f in patient.findings}


def _attr(patient: VirtualPatient, kind: str, key: str):
    return next(f.get(key) for f in patient.findings if f["type"] == kind)


def to_grey(array: np.ndarray | None, key: str, anatomy: str) -> np.ndarray | None:
    """Native units -> uint8 for display: CT through its anatomy's window, MRI 0.5-99.5 percentiles."""
    if array is None:
        return None
    if key == "ct":
        level, width = CT_WINDOWS[anatomy]
        unit = (array - (level - width / 2.0)) / width
    elif key == "xray":
        unit = array
    else:
        lo, hi = np.percentile(array, [0.5, 99.5])
        unit = (array - lo) / max(hi - lo, 1e-6)
    return (np.clip(unit, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def impression(report: str) -> str:
    return report.split("IMPRESSION:", 1)[1].strip()


def pick_patients(generator: PhantomGenerator, limit: int) -> list[tuple[str, VirtualPatient]]:
    chosen: list[tuple[str, VirtualPatient]] = []
    remaining = list(CASES)
    for index in range(limit):
        if not remaining:
            break
        patient = generator.patient(index)
        for case in remaining:
            if case[1](patient):
                chosen.append((case[0], patient))
                remaining.remove(case)
                break
    if remaining:
        raise RuntimeError(f"no patient among the first {limit} matches {[name for name, _ in remaining]}")
    order = [name for name, _ in CASES]
    return sorted(chosen, key=lambda row: order.index(row[0]))


def draw(rows: list[tuple[str, VirtualPatient]], tile: int, text_width: int) -> Image.Image:
    header = 18
    font = ImageFont.load_default()
    width = tile * len(MODALITY_KEYS) + text_width
    canvas = Image.new("L", (width, header + tile * len(rows)), 0)
    pen = ImageDraw.Draw(canvas)
    for col, key in enumerate(MODALITY_KEYS):
        pen.text((col * tile + 4, 3), key, fill=255, font=font)
    pen.text((len(MODALITY_KEYS) * tile + 6, 3), "impression", fill=255, font=font)
    for row, (case, patient) in enumerate(rows):
        top = header + row * tile
        for col, key in enumerate(MODALITY_KEYS):
            grey = to_grey(patient.images[key], key, patient.anatomy)
            if grey is not None:
                canvas.paste(Image.fromarray(grey).resize((tile, tile), Image.BILINEAR), (col * tile, top))
        lines = [f"{patient.patient_id} ({case})"] + textwrap.wrap(impression(patient.report), 38)
        pen.multiline_text((len(MODALITY_KEYS) * tile + 6, top + 4), "\n".join(lines), fill=255, font=font)
    return canvas


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="phantom image size in pixels")
    parser.add_argument("--tile", type=int, default=128, help="displayed tile size in pixels")
    parser.add_argument("--search", type=int, default=400, help="how many patients to search for the cases")
    parser.add_argument("--out", type=Path, default=Path("docs/images/phantoms_montage.png"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rows = pick_patients(PhantomGenerator(seed=args.seed, size=args.size), args.search)
    image = draw(rows, args.tile, text_width=250)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({image.width}x{image.height}) from patients {[p.patient_id for _, p in rows]}")


if __name__ == "__main__":
    main()
