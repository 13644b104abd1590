"""Writes the CSV that ``medm2g prepare`` reads for the SynthRAD CT slices (see ``prepare_all.sh`` beside it).

The slices (``GT_<patient>-<slice>.png``) come without any text. Each one gets a caption made from its file
name alone: SynthRAD2023 task 1 codes the region in the patient id (``1B...`` brain, ``1P...`` pelvis), so the
caption is "Axial CT slice of the brain." or "Axial CT slice of the pelvis.". These captions are derived
from file names, not radiology reports, and say nothing else about the patient.

Columns: ``file, modality, report, patient_id, anatomy`` (the defaults of ``medm2g prepare --reports``)::

    .venv/bin/python scripts/real_data/synthrad_captions.py --images ../shared/data/synthrad-ct-slices \\
        --out runs/real/synthrad_ct_captions.csv [--every 4]
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from pathlib import Path

from medm2g_diffusers.training_utils import atomic_write_text

FILE_NAME = re.compile(r"GT_(?P<patient>1(?P<region>[BP])[A-Z]\d{3})-(?P<slice>\d+)\.png")
REGIONS = {"B": ("head", "Axial CT slice of the brain."), "P": ("pelvis", "Axial CT slice of the pelvis.")}


def caption_rows(images: Path, every: int = 1) -> list[dict[str, str]]:
    """One row per kept slice, sorted by patient and slice number; every ``every``-th slice of each patient."""
    slices: dict[str, list[tuple[int, str, str]]] = {}
    for path in sorted(images.glob("*.png")):
        match = FILE_NAME.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path.name} is not named GT_<1B|1P patient>-<slice>.png; captions come from that name")
        slices.setdefault(match["patient"], []).append((int(match["slice"]), path.name, match["region"]))
    if not slices:
        raise ValueError(f"no GT_*.png slices under {images}")
    rows = []
    for patient, entries in sorted(slices.items()):
        for _, name, region in sorted(entries)[::every]:
            anatomy, caption = REGIONS[region]
            rows.append({"file": name, "modality": "CT", "report": caption, "patient_id": patient, "anatomy": anatomy})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="the synthrad-ct-slices folder")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write (replaced atomically)")
    parser.add_argument("--every", type=int, default=1, help="keep every N-th slice of each patient (default 1: all)")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every must be a positive integer; got {args.every}")
    try:
        rows = caption_rows(args.images, args.every)
    except ValueError as error:
        print(f"synthrad_captions: error: {error}", file=sys.stderr)
        return 2
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, buffer.getvalue())
    print(f"wrote {len(rows)} captions of {len({r['patient_id'] for r in rows})} patients to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
