"""Writes a checkpoint's model card from `medm2g evaluate`'s JSON (and copies it into the checkpoint as README.md).

    python scripts/write_model_card.py --results docs/results/benchmark.json --checkpoint checkpoints/medm2g-tiny --out model_cards/medm2g-tiny.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medm2g_diffusers.model_card import model_card_markdown
from medm2g_diffusers.training_utils import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="benchmark.json written by medm2g evaluate")
    parser.add_argument("--checkpoint", default="checkpoints/medm2g-tiny")
    parser.add_argument("--out", default="model_cards/medm2g-tiny.md")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    record_path = checkpoint / "training_record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    card = model_card_markdown(checkpoint.name, json.loads(Path(args.results).read_text()), record)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, card)
    atomic_write_text(checkpoint / "README.md", card)
    print(f"wrote {args.out} and {checkpoint / 'README.md'}")


if __name__ == "__main__":
    main()
