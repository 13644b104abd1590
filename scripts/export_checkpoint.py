"""Writes a trained pipeline folder as a bundled checkpoint: fp16 safetensors (half the bytes; loads as fp32).

    python scripts/export_checkpoint.py --pipeline runs/tiny/pipeline --out checkpoints/medm2g-tiny

fp16 storage changes generated images by < 1e-3 (display range) and reports not at all on the tiny model
(measured when medm2g-tiny was exported; see docs/decisions.md). The folder is swapped in atomically and a
`training_record.json` names the source folder and the git commit that exported it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.training_utils import atomic_save_pretrained, atomic_write_text

MAX_MEGABYTES = 60.0


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="a folder written by training/train_multiflow.py")
    parser.add_argument("--out", default="checkpoints/medm2g-tiny")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--record", default=None,
                        help='a JSON file with the stage wall times to include: {"recipe": {stage: seconds}, "notes": [how each '
                             'stage was trained, when not by one run of tiny.sh]}')
    args = parser.parse_args()

    pipe = MedM2GPipeline.from_pretrained(args.pipeline)
    pipe.to(getattr(torch, args.dtype))
    out = Path(args.out)
    atomic_save_pretrained(pipe, out)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    record = {"source": str(args.pipeline), "stored_dtype": args.dtype, "exported_at_commit": commit}
    if args.record:
        extra = json.loads(Path(args.record).read_text())
        unknown = set(extra) - {"recipe", "notes"}
        if unknown:
            raise SystemExit(f"--record {args.record}: unknown keys {sorted(unknown)}; expected 'recipe' and 'notes'")
        record.update(extra)
    atomic_write_text(out / "training_record.json", json.dumps(record, indent=2) + "\n")
    size = folder_megabytes(out)
    print(f"wrote {out}: {size:.1f} MB ({args.dtype})")
    if size > MAX_MEGABYTES:
        raise SystemExit(f"{out} is {size:.1f} MB, over the {MAX_MEGABYTES:.0f} MB limit for a bundled checkpoint")


if __name__ == "__main__":
    main()
