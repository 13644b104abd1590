#!/usr/bin/env python
"""The best top-1 finding agreement text <-> image retrieval can reach if the images hide some finding types.

    python scripts/measure_retrieval_ceiling.py --dataset runs/tiny/phantoms

Stage 1's retrieval gate (top-1 finding agreement, ``training/train_alignment.py:retrieval_metrics``) asks the
top-1 hit to have exactly the query's findings: the same set of (type, side, lobe). A report names every finding;
an image encoder can only match what the image shows, and at 64 px nodules are not in the chest X-ray for any
probe we trained, masses barely ([xray-probes.md](xray-probes.md)). This script computes, from the split's finding
labels alone (no model), the agreement of an encoder that sees every other finding perfectly and the hidden types
not at all:

* text -> image: the hit is any image whose visible findings match the report's; it agrees with probability
  ``count(signature) / count(visible signature)``, averaged over the queries;
* image -> text: the hit can be the most common report among those with the image's visible findings; averaged
  over the queries, that is ``sum over visible signatures of max count / n``.

The page's number is their mean, as ``retrieval_metrics`` reports (the mean of both directions). Everything seen
gives 1.0; the gate is reachable only below the ceiling of the types the encoders truly miss. Writes
``docs/results/retrieval-ceiling.md`` and its JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import time
from collections import Counter, defaultdict
from pathlib import Path

from datasets import load_from_disk

from medm2g_diffusers.evaluation.measure_scripts import write_record

ROOT = Path(__file__).resolve().parents[1]
HIDDEN_SETS = ((), ("nodule",), ("nodule", "mass"))


def load_training_script():
    """train_alignment.py is a script, not a module; its ``finding_signature`` defines agreement."""
    spec = importlib.util.spec_from_file_location("train_alignment", ROOT / "training" / "train_alignment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def agreement_ceiling(signatures: list[tuple], hidden: tuple[str, ...]) -> dict[str, float]:
    """Upper bounds of top-1 finding agreement when the image side cannot see the ``hidden`` finding types.

    Args:
        signatures: one ``(anatomy, frozenset of (type, side, lobe))`` per patient of the gallery (the patients
            with both the report and the image).
        hidden: finding types the image encoder cannot see.
    """
    groups: dict[tuple, Counter] = defaultdict(Counter)
    for anatomy, findings in signatures:
        visible = (anatomy, frozenset(f for f in findings if f[0] not in hidden))
        groups[visible][(anatomy, findings)] += 1
    n = len(signatures)
    text_to_image = sum(sum(c * c for c in g.values()) / sum(g.values()) for g in groups.values()) / n
    image_to_text = sum(max(g.values()) for g in groups.values()) / n
    return {"text_to_image": text_to_image, "image_to_text": image_to_text, "mean": (text_to_image + image_to_text) / 2}


def measure(dataset: Path, splits: list[str]) -> list[dict]:
    train_alignment = load_training_script()
    data = load_from_disk(str(dataset))
    rows = []
    for split in splits:
        for image in ("xray", "ct"):  # X-ray galleries hold chest patients only; CT ones chest and head
            present = [r for r in data[split].select_columns(["anatomy", "findings", image]) if r[image] is not None]
            signatures = [train_alignment.finding_signature(r["findings"], r["anatomy"]) for r in present]
            for hidden in HIDDEN_SETS:
                rows.append({"split": split, "pair": f"text-{image}", "hidden": list(hidden), "n": len(signatures),
                             **agreement_ceiling(signatures, hidden)})
    return rows


def page_lines(record: dict) -> list[str]:
    lines = [
        "# Retrieval: the top-1 finding agreement an encoder that misses some findings can reach",
        "",
        f"Made by `{record['command']}` ({record['machine']}; {record['seconds']:.0f} s; no model). Raw numbers: "
        "`retrieval-ceiling.json`.",
        "",
        "Top-1 finding agreement (the metric of [alignment-1000.md](alignment-1000.md): the hit's set of (type, side, "
        "lobe) equals the query's, mean of both directions) of a perfect encoder that cannot see the hidden finding "
        "types in the image, computed from the split's labels alone. The issue's gate is 0.8 for text <-> X-ray and "
        "text <-> CT; the probes of [xray-probes.md](xray-probes.md) read nodules at F1 0.00-0.12 and masses at "
        "0.00-0.34 from 64 px chest X-rays.",
        "",
        "| split | pair | n | hidden in the image | text -> image | image -> text | mean (the metric) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in record["rows"]:
        hidden = ", ".join(row["hidden"]) or "none"
        lines.append(f"| {row['split']} | {row['pair']} | {row['n']} | {hidden} | {row['text_to_image']:.3f} | "
                     f"{row['image_to_text']:.3f} | {row['mean']:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT / "runs" / "tiny" / "phantoms",
                        help="a canonical dataset folder (default: the tiny recipe's phantoms)")
    parser.add_argument("--splits", nargs="+", default=["test", "validation"])
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "results" / "retrieval-ceiling.md")
    args = parser.parse_args()
    if not (args.dataset / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"--dataset {args.dataset} is not a saved DatasetDict (make it with `medm2g phantoms "
                                "--n 4000 --seed 0 --size 64 --out runs/tiny/phantoms`)")
    started = time.perf_counter()
    rows = measure(args.dataset, args.splits)
    command = "python scripts/measure_retrieval_ceiling.py --dataset " + str(args.dataset)
    record = {"command": command, "machine": platform.machine(), "seconds": time.perf_counter() - started, "rows": rows}
    write_record(args.page, record, page_lines)
    print("\n".join(page_lines(record)))


if __name__ == "__main__":
    main()
