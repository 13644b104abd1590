#!/usr/bin/env python
"""Compares text VAEs on how much of a report survives decode(encode(report)): its findings, not its phrasing.

    python scripts/measure_text_vae.py --text-vae 600-steps=checkpoints/medm2g-tiny/text_vae \\
        --text-vae 1500-steps=runs/textvae1500/text_vae --tokenizer checkpoints/medm2g-tiny/tokenizer

For every test report of the phantom set (greedy decoding, as the pipeline decodes): the micro finding F1 of the
rule-based labeller between decoded and real report (all reports, and chest reports alone: the reports that
X-ray -> report generation is scored on), exact match after the tokenizer's normalisation, and corpus BLEU-4
(sacrebleu). Image -> report generation decodes its sampled latents with the same decoder, so the chest F1 here
caps the report-generation finding F1 of ``medm2g evaluate``. Writes docs/results/text-vae.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import sacrebleu
import torch
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers import MedM2GTextVAE
from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.evaluation.benchmark_tables import write_page_keeping_notes
from medm2g_diffusers.evaluation.finding_labeller import finding_f1
from medm2g_diffusers.training_utils import atomic_write_text


@torch.no_grad()
def reconstruct(text_vae: MedM2GTextVAE, tokenizer, reports: list[str], batch_size: int = 64) -> list[str]:
    decoded = []
    for start in range(0, len(reports), batch_size):
        batch = tokenizer(reports[start : start + batch_size], padding=True, truncation=True,
                          max_length=text_vae.config.max_position_embeddings, return_tensors="pt")
        decoded += text_vae.decode(text_vae.encode(batch["input_ids"], batch["attention_mask"]).latent, tokenizer)
    return decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-vae", action="append", required=True, metavar="NAME=DIR", help="a text VAE folder (repeatable)")
    parser.add_argument("--tokenizer", default="checkpoints/medm2g-tiny/tokenizer")
    parser.add_argument("--dataset", default="runs/tiny/phantoms", help="medm2g phantoms --n 4000 --seed 0 --size 64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/results/text-vae.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    test = load_medm2g_dataset(args.dataset)["test"]
    reports, anatomy = list(test["report"]), list(test["anatomy"])
    references = [tokenizer.decode(tokenizer(r, truncation=True).input_ids, skip_special_tokens=True).strip() for r in reports]
    chest = [i for i, a in enumerate(anatomy) if a == "chest"]
    results = {"n": len(reports), "n_chest": len(chest), "models": {}}
    for name, folder in (item.split("=", 1) for item in args.text_vae):
        text_vae = MedM2GTextVAE.from_pretrained(folder).eval()
        decoded = reconstruct(text_vae, tokenizer, reports)
        results["models"][name] = {
            "folder": folder,
            "finding_f1_all": finding_f1(decoded, reports)["micro_f1"],
            "finding_f1_chest": finding_f1([decoded[i] for i in chest], [reports[i] for i in chest])["micro_f1"],
            "exact_match": sum(d == r for d, r in zip(decoded, references)) / len(reports),
            "bleu4": sacrebleu.corpus_bleu(decoded, [references]).score / 100.0,
            "example": {"real": reports[chest[0]], "decoded": decoded[chest[0]]},
        }
        print(name, {k: v for k, v in results["models"][name].items() if k != "example"}, flush=True)
    results["seconds"] = time.perf_counter() - started

    out = Path(args.out)
    command = "python scripts/measure_text_vae.py " + " ".join(f"--text-vae {t}" for t in args.text_vae) + f" --tokenizer {args.tokenizer}"
    lines = [
        "# Text VAE: what survives decode(encode(report))", "",
        f"Made by `{command}` ({platform.machine()}, {args.threads} threads; {results['seconds']:.0f} s). Raw numbers: "
        f"`{out.with_suffix('.json').name}`.", "",
        f"All {results['n']} test reports of the phantom set ({results['n_chest']} chest), greedy decoding. Finding F1: micro F1 of "
        "the rule-based labeller, decoded vs real report. Image -> report generation decodes with the same decoder, so the chest "
        "column caps its finding F1.", "",
        "| text VAE | finding F1, all | finding F1, chest | exact match | BLEU-4 |", "| --- | --- | --- | --- | --- |",
    ]
    for name, m in results["models"].items():
        lines.append(f"| {name} (`{m['folder']}`) | {m['finding_f1_all']:.3f} | {m['finding_f1_chest']:.3f} | {m['exact_match']:.3f} | {m['bleu4']:.3f} |")
    lines += [""]
    for name, m in results["models"].items():
        lines += [f"**{name}**, first chest test report:", "", f"- real: {m['example']['real']}", f"- decoded: {m['example']['decoded']}", ""]
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    write_page_keeping_notes(out, lines)
    print(out.read_text())


if __name__ == "__main__":
    main()
