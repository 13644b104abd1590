"""The ``medm2g`` command line: ``medm2g phantoms`` and ``medm2g prepare``.

Each sub-command is a thin shell over a library function, so everything here is also reachable from
Python. Errors that are the user's (bad arguments, unreadable files) print one line and exit with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def _window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU, got {text!r}") from None
    return low, high


def cmd_phantoms(args: argparse.Namespace) -> int:
    from .data.datasets import build_phantom_dataset, save_dataset, summarize
    from .data.io import write_png
    from .data.preview import montage

    dataset = build_phantom_dataset(args.n, seed=args.seed, size=args.size)
    save_dataset(dataset, args.out)
    test = dataset["test"] if dataset["test"].num_rows else dataset["train"]
    # Python format keeps a missing modality as None (numpy format would turn it into an all-NaN array).
    rows = list(test.select(range(min(args.preview_rows, test.num_rows))))
    labels = [f"{row['patient_id'][-6:]} {row['anatomy']}" for row in rows]
    image = montage(rows, tile=96, labels=labels)
    preview = Path(args.out) / "preview.png"
    write_png(
        preview,
        np.asarray(image, dtype=np.float32) / 255.0,
        provenance={"model": "medm2g phantom generator", "seed": str(args.seed), "size": str(args.size)},
    )
    print(json.dumps(summarize(dataset), indent=2))
    print(f"wrote {args.n} virtual patients to {args.out} and a preview montage to {preview}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.datasets import CsvColumns, prepare_dataset, save_dataset, summarize

    dataset = prepare_dataset(
        args.images,
        args.reports,
        size=args.size,
        seed=args.seed,
        modality_map=dict(args.modality_map or []),
        csv_columns=CsvColumns.parse(args.csv_columns),
        patient_regex=args.patient_regex,
        png_ct_window=args.png_ct_window,
    )
    save_dataset(dataset, args.out)
    print(json.dumps(summarize(dataset), indent=2))
    print(f"wrote the dataset to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medm2g", description="MedM2G medical any-to-any generation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("phantoms", help="write a synthetic dataset of virtual patients (HF save_to_disk) and a preview")
    p.add_argument("--n", type=_positive_int, default=200, help="number of patients (default 200)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed: patient i depends only on (seed, i)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels, 32-512, multiple of 8 (default 64)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--preview-rows", type=_positive_int, default=6, help="patients shown in preview.png")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("prepare", help="turn a folder of DICOM/NIfTI/PNG files (+ reports CSV) into a dataset")
    p.add_argument("--images", required=True, help="folder of images (modality sub-folders when no CSV is given)")
    p.add_argument("--reports", default=None, help="CSV with columns file, modality, report, patient_id")
    p.add_argument("--csv-columns", default=None, help="rename CSV columns, e.g. report=clinical_notes,patient_id=patientid")
    p.add_argument(
        "--modality-map", type=_key_value, action="append", metavar="NAME=KEY",
        help="map a folder/CSV modality name to a registry key, e.g. MRI=mri_t2 (repeatable)",
    )
    p.add_argument("--patient-regex", default=None, help="regex with one group giving the patient id from a file stem")
    p.add_argument("--png-ct-window", type=_window, default=(-1000.0, 1000.0), help="HU window an 8-bit CT PNG stands for")
    p.add_argument("--size", type=int, default=256, help="side of the square images written (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-wise split")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data.io import MedicalImageError

    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, MedicalImageError) as error:
        print(f"medm2g {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
