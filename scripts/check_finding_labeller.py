#!/usr/bin/env python
"""Measures the rule-based finding labeller against the phantoms' ground-truth findings; prints the numbers.

    OMP_NUM_THREADS=1 python scripts/check_finding_labeller.py --dataset runs/tiny/phantoms
    OMP_NUM_THREADS=1 python scripts/check_finding_labeller.py --dataset runs/tiny/phantoms \
        --iu-reports ../shared/data/iu-xray-reports/iu_reports.csv --iu-n 300 --iu-show 20

Every report of every split is labelled with ``label_report`` and scored against the types of its
``findings`` column (micro / macro F1, exact match, per type); each disagreement is printed with its report.
With ``--iu-reports`` it also labels real Indiana University chest X-ray reports (findings + impression;
there is no ground truth in our finding types): agreement with the collection's MeSH annotation on the six
types it names, and a sample printed with its mentions, negated ones marked, for a reader to check.
"""

from __future__ import annotations

import argparse
import csv
import random

from datasets import load_from_disk

from medm2g_diffusers.evaluation.finding_labeller import (
    FINDING_TYPES,
    find_mentions,
    finding_f1,
    finding_types,
    label_report,
)


def check_phantoms(path: str, max_misses: int) -> None:
    dataset = load_from_disk(path)
    reports, references, splits = [], [], []
    for split in dataset:
        columns = dataset[split].select_columns(["report", "findings", "anatomy"])
        for row in columns:
            reports.append(row["report"])
            references.append(finding_types(row["findings"]))
            splits.append(f"{split}/{row['anatomy']}")
    result = finding_f1(reports, references)
    print(f"phantom reports: n={result['n']} ({', '.join(f'{s}: {dataset[s].num_rows}' for s in dataset)})")
    print(f"micro P/R/F1 {result['micro_precision']:.4f} / {result['micro_recall']:.4f} / {result['micro_f1']:.4f}")
    print(f"macro P/R/F1 {result['macro_precision']:.4f} / {result['macro_recall']:.4f} / {result['macro_f1']:.4f} "
          f"over {len(result['types'])} types")
    print(f"exact match {result['exact_match']:.4f}")
    print("| type | support | precision | recall | F1 |\n| --- | --- | --- | --- | --- |")
    for t in FINDING_TYPES:
        if t in result["per_type"]:
            r = result["per_type"][t]
            print(f"| {t} | {r['support']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} |")
    misses = [(s, rep, ref) for s, rep, ref in zip(splits, reports, references) if label_report(rep) != ref]
    print(f"disagreements: {len(misses)}")
    for split, report, reference in misses[:max_misses]:
        print(f"- [{split}] labelled {sorted(label_report(report))}, truth {sorted(reference)}\n  {report}")


# The collection's MeSH annotation, where one of its major terms names one of our types (pacemakers hide in
# "Implanted Medical Device" with other devices, head findings do not occur): a second reader to compare with.
_MESH = {
    "pleural_effusion": ("Pleural Effusion", "Hydropneumothorax"),
    "cardiomegaly": ("Cardiomegaly",),
    "nodule": ("Nodule",),
    "mass": ("Mass",),
    "pneumothorax": ("Pneumothorax", "Hydropneumothorax", "Hemopneumothorax"),
    "consolidation": ("Consolidation", "Airspace Disease"),
}


def show_iu(path: str, n: int, show: int, seed: int) -> None:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if (r["findings"] or r["impression"]).strip()]
    texts = [f"{r['findings']} {r['impression']}".strip() for r in rows]
    mesh = [{term.split("/")[0].strip() for term in r["mesh_major"].split(";")} for r in rows]
    predicted = [{t for t in label_report(text) if t in _MESH} for text in texts]
    reference = [{t for t, terms in _MESH.items() if mesh_terms & set(terms)} for mesh_terms in mesh]
    agreement = finding_f1(predicted, reference)
    print(f"\nIU X-ray reports (findings + impression), all {len(rows)}: labeller vs. the MeSH annotation "
          f"on {len(_MESH)} types")
    print(f"micro P/R/F1 {agreement['micro_precision']:.3f} / {agreement['micro_recall']:.3f} / {agreement['micro_f1']:.3f}")
    print("| type | MeSH support | precision | recall | F1 |\n| --- | --- | --- | --- | --- |")
    for t in _MESH:
        r = agreement["per_type"].get(t, {"support": 0, "precision": 0.0, "recall": 0.0, "f1": 0.0})
        print(f"| {t} | {r['support']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} |")

    sample = random.Random(seed).sample(range(len(rows)), min(n, len(rows)))
    counts = {t: [0, 0] for t in FINDING_TYPES}
    for i in sample:
        mentions = find_mentions(texts[i])
        for t in {m.finding for m in mentions if m.affirmed}:
            counts[t][0] += 1
        for t in {m.finding for m in mentions if not m.affirmed}:
            counts[t][1] += 1
    print(f"\n{len(sample)} sampled reports (seed {seed}):")
    print("| type | reports affirming | reports negating / hypothetical |\n| --- | --- | --- |")
    for t in FINDING_TYPES:
        print(f"| {t} | {counts[t][0]} | {counts[t][1]} |")
    print(f"\nFirst {show} sampled reports with their mentions (NOT: negated, HYP: hypothetical):")
    for i in sample[:show]:
        mentions = find_mentions(texts[i])
        marks = ", ".join(
            f"{'NOT ' if m.negated else 'HYP ' if m.hypothetical else ''}{m.finding} ({m.phrase!r})" for m in mentions
        ) or "-"
        print(f"\n[{rows[i]['report_id']}] {texts[i]}\n  MeSH: {rows[i]['mesh_major']}\n  mentions: {marks}\n"
              f"  labels: {sorted(label_report(texts[i]))}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="runs/tiny/phantoms", help="a phantom DatasetDict (save_to_disk folder)")
    parser.add_argument("--max-misses", type=int, default=50, help="disagreements to print")
    parser.add_argument("--iu-reports", default=None, help="iu_reports.csv of the IU X-ray collection")
    parser.add_argument("--iu-n", type=int, default=300, help="IU reports to label")
    parser.add_argument("--iu-show", type=int, default=20, help="IU reports to print with their mentions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    check_phantoms(args.dataset, args.max_misses)
    if args.iu_reports:
        show_iu(args.iu_reports, args.iu_n, args.iu_show, args.seed)


if __name__ == "__main__":
    main()
