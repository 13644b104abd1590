#!/usr/bin/env python
"""Measures stage 1's alignment schemes side by side on the same budget and writes the retrieval table.

Variants (each trained by ``training/train_alignment.py`` with the same config, steps, batch and seed):

* ``central_vi``: text as hub (text-xray, text-ct, text-mri), then ct-mri; + Barlow Twins visual invariant;
* ``central_no_vi``: the same without the visual invariant (``--no-vi``);
* ``pairwise``: all six pairs at once (``--pairwise``), + visual invariant;
* ``central_vi_minilm`` (only when asked with ``--variants``): ``central_vi`` with the text encoder
  initialised from all-MiniLM-L6-v2 and its own tokenizer, at ``text_learning_rate`` 1e-4;
* ``central_vi_soft`` (only when asked): ``central_vi`` with label-aware InfoNCE targets
  (``alignment.soft_targets=0.8``: reports the labeller reads as the same findings share 0.8 of the target);
* ``central_vi_ct_frozen`` (only when asked): ``central_vi`` with the CT encoder frozen in the ct-mri round
  (1,600 + 400 steps, tiny.yaml's), so that round cannot move CT away from the text it was aligned to;
  ``central_vi_ct_trainable``: with CT trainable in that round;
* ``central_vi_soft_ct_frozen`` (only when asked): both of the above;
* ``central_vi_mild_aug`` (only when asked): ``central_vi`` with the finding classifiers' mild augmentation
  instead of the config's (whose noise of up to 0.05, 50 HU on CT, exceeds the contrast of a head bleed);
* ``central_vi_mild_aug_ct_frozen`` (only when asked): the mild augmentation with the CT encoder frozen in the
  ct-mri round;
* ``central_vi_minimal_aug`` (only when asked): weaker augmentation still (views barely differ);
* ``central_vi_mild_aug_ct_frozen_ct_windows`` (only when asked): ``central_vi_mild_aug_ct_frozen`` whose CT
  encoder also reads the brain and soft-tissue windows as input channels (``model.input_windows``), as the
  finding classifiers do;
* ``central_vi_mild_aug_ct_windows`` (only when asked): the same with CT trainable in the ct-mri round (base.yaml).
* ``central_vi_strong_aug`` (only when asked): tiny.yaml's alignment before the r34 retrain (the bundled
  medm2g-tiny of cf78f35): strong views (70 % crops, 8 degrees, noise up to 0.05), CT trainable in the ct-mri
  round, no CT windows, 800 + 200 steps. The pages made before that retrain call it ``central_vi``.

Every variant overrides the config it is given, so a variant's name means a different setting under another
config; the pages name their config and the commit of tiny.yaml they ran with.

Every model is scored on the TEST split: Recall@1/@5 and top-1 finding agreement (with the agreement of a
random pairing as chance) for text<->xray, text<->ct, text<->mri, xray<->mri (never trained directly in the
central scheme), xray<->ct and ct<->mri, the central schemes also before their ct-mri round. Writes
``docs/results/alignment.md`` and ``docs/results/alignment.json``. Run from the repository root:

    python scripts/measure_alignment.py --config training/configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from medm2g_diffusers.evaluation.benchmark_tables import write_page_keeping_notes
from medm2g_diffusers.training_utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "central_vi": [],
    "central_no_vi": ["--no-vi"],
    "pairwise": ["--pairwise"],
    # A pretrained encoder takes a small step (the config's advice); the heads keep the config's rate.
    "central_vi_minilm": ["--set", "alignment.text_backbone=minilm", "--set", "alignment.text_learning_rate=1.0e-4"],
    "central_vi_soft": ["--set", "alignment.soft_targets=0.8"],
}


def central_rounds(ct_mri_trainable: str, hub_steps: int = 1600, ct_mri_steps: int = 400) -> list[str]:
    """``--set`` for the central schedule (hub round, then ct-mri with ``ct_mri_trainable`` moving)."""
    return ["--set", "alignment.rounds=[{name: hub, pairs: [[text, xray], [text, ct], [text, mri]], trainable: "
            f"[text, xray, ct, mri], steps: {hub_steps}}}, {{name: ct_mri, pairs: [[ct, mri]], trainable: "
            f"[{ct_mri_trainable}], steps: {ct_mri_steps}}}]"]


# tiny.yaml's schedule with CT frozen in the ct-mri round (only MRI moves toward CT), or with both moving.
VARIANTS["central_vi_ct_frozen"] = central_rounds("mri")
VARIANTS["central_vi_ct_trainable"] = central_rounds("ct, mri")
VARIANTS["central_vi_soft_ct_frozen"] = VARIANTS["central_vi_soft"] + VARIANTS["central_vi_ct_frozen"]
# The finding classifiers' augmentation strength (docs/decisions.md): about +-2 px of shift, 3 degrees, 5 % contrast,
# 0.01 brightness and noise of at most 0.005 (5 HU), below the contrast of the smallest findings.
VARIANTS["central_vi_mild_aug"] = ["--set", "alignment.augment.crop_scale=[0.88, 1.0]", "--set", "alignment.augment.crop_ratio=[0.95, 1.05]",
                                   "--set", "alignment.augment.max_rotation_deg=3", "--set", "alignment.augment.brightness=0.01",
                                   "--set", "alignment.augment.contrast=0.05", "--set", "alignment.augment.noise_std=0.005"]
VARIANTS["central_vi_mild_aug_ct_frozen"] = VARIANTS["central_vi_mild_aug"] + VARIANTS["central_vi_ct_frozen"]
# + the finding classifiers' CT input windows (brain -20..100 HU, soft tissue -160..240 HU) as extra input channels.
CT_WINDOWS = ["--set", "alignment.model.input_windows={ct: [[-0.02, 0.1], [-0.16, 0.24]]}"]
VARIANTS["central_vi_mild_aug_ct_frozen_ct_windows"] = VARIANTS["central_vi_mild_aug_ct_frozen"] + CT_WINDOWS
# base.yaml's alignment: CT trainable in the ct-mri round.
VARIANTS["central_vi_mild_aug_ct_windows"] = VARIANTS["central_vi_mild_aug"] + VARIANTS["central_vi_ct_trainable"] + CT_WINDOWS
VARIANTS["central_vi_strong_aug"] = [
    "--set", "alignment.augment.crop_scale=[0.7, 1.0]", "--set", "alignment.augment.crop_ratio=[0.8, 1.25]",
    "--set", "alignment.augment.max_rotation_deg=8", "--set", "alignment.augment.brightness=0.1",
    "--set", "alignment.augment.contrast=0.2", "--set", "alignment.augment.noise_std=0.05",
    "--set", "alignment.model.input_windows={}", *central_rounds("ct, mri", hub_steps=800, ct_mri_steps=200),
]
# Weaker still: about +-1 px, 1 degree, 2 % contrast, noise of at most 0.002 (the views barely differ for VI).
VARIANTS["central_vi_minimal_aug"] = ["--set", "alignment.augment.crop_scale=[0.95, 1.0]", "--set", "alignment.augment.crop_ratio=[0.98, 1.02]",
                                      "--set", "alignment.augment.max_rotation_deg=1", "--set", "alignment.augment.brightness=0.005",
                                      "--set", "alignment.augment.contrast=0.02", "--set", "alignment.augment.noise_std=0.002"]
TABLE_PAIRS = ("text-xray", "text-ct", "text-mri", "xray-mri", "xray-ct", "ct-mri")
ANATOMIES = ("chest", "head")
ANATOMY_PAIRS = (("text", "ct"), ("text", "mri"), ("ct", "mri"))


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_alignment", ROOT / "training" / "train_alignment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="training/configs/tiny.yaml")
    parser.add_argument("--dataset", default=None, help="default: the config's data.dataset")
    parser.add_argument("--workdir", default="runs/tiny/alignment-measure", help="where the variants train")
    parser.add_argument("--variants", nargs="+", default=["central_vi", "central_no_vi", "pairwise"], choices=list(VARIANTS))
    parser.add_argument("--max_train_steps", type=int, default=None, help="override the config's total steps (all variants)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override for all variants")
    parser.add_argument("--reuse", action="store_true", help="score variants already trained in --workdir instead of retraining")
    parser.add_argument("--out", default="docs/results/alignment", help="output path without suffix (.md and .json are written)")
    parser.add_argument("--note", default="", help="a sentence on how the run was made, added to the Markdown")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch threads; 1 was 4-6x faster than 2 on a shared 2-core machine (oversubscription)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    ta = load_training_script()
    config = ta.load_config(args.config, args.set)
    cfg = ta.stage_config(config, ta.SECTION)
    dataset_path = Path(args.dataset or config["data"]["dataset"])
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    dataset = ta.load_medm2g_dataset(dataset_path)
    image_keys = [k for f in ("xray", "ct", "mri") for k in ta.modalities_of_family(f)]
    test_data = ta.AlignmentData(dataset["test"], image_keys)
    # CT and MRI galleries mix chest and head patients; each anatomy is also scored on its own gallery.
    anatomy_data = {anatomy: ta.AlignmentData(dataset["test"].filter(lambda row: row["anatomy"] == anatomy).flatten_indices(), image_keys)
                    for anatomy in ANATOMIES}

    # One report tokenizer for every scratch variant: stage 0's if it exists, else trained once here.
    tokenizer_dir = Path(config.get("output_root", "runs/tiny")) / "tokenizer"
    if not tokenizer_dir.is_dir():
        tokenizer_dir = workdir / "tokenizer"
        if not tokenizer_dir.is_dir():
            reports = [r for r in dataset["train"]["report"] if r]
            ta.train_report_tokenizer(reports, vocab_size=cfg["tokenizer_vocab_size"]).save_pretrained(str(tokenizer_dir))

    results: dict[str, dict] = {}
    for name in args.variants:
        output_dir = workdir / name / "alignment"
        run_args = ["--config", args.config, "--dataset", str(dataset_path), "--output_dir", str(output_dir),
                    "--tokenizer", str(tokenizer_dir), "--set", f"output_root={workdir / name}", *VARIANTS[name]]
        for item in args.set:
            run_args += ["--set", item]
        if args.max_train_steps is not None:
            run_args += ["--max_train_steps", str(args.max_train_steps)]
        summary_path = workdir / name / "train_summary.json"
        if args.reuse and summary_path.is_file():
            summary = json.loads(summary_path.read_text())
        else:
            started = time.perf_counter()
            run = ta.main(run_args)
            summary = {"train_wall_time_s": run["train_wall_time_s"], "total_wall_time_s": time.perf_counter() - started,
                       "steps": len(run["losses"]), "final_loss": run["losses"][max(run["losses"])]}
            summary_path.write_text(json.dumps(summary, indent=2))

        tokenizer = (ta.AutoTokenizer.from_pretrained(str(output_dir / "tokenizer")) if "minilm" in name
                     else ta.PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir)))
        rounds, by_anatomy = {}, {}
        for round_dir in sorted((output_dir / "rounds").iterdir()):
            model = ta.MedM2GPromptEncoders.from_pretrained(str(round_dir))
            with torch.no_grad():
                rounds[round_dir.name] = ta.evaluate_retrieval(model, test_data, tokenizer, cfg["max_text_length"])
                by_anatomy[round_dir.name] = {
                    anatomy: ta.evaluate_retrieval(model, data, tokenizer, cfg["max_text_length"], pairs=ANATOMY_PAIRS)
                    for anatomy, data in anatomy_data.items()}
        final = "ct_mri" if "ct_mri" in rounds else sorted(rounds)[-1]
        results[name] = {**summary, "rounds": rounds, "by_anatomy": by_anatomy, "final_round": final}
        print(f"{name}: trained in {summary['train_wall_time_s']:.0f} s\n{ta.format_retrieval(rounds[final])}", flush=True)

    meta = {
        "command": "python scripts/measure_alignment.py " + " ".join(
            [f"--config {args.config}"] + ([f"--max_train_steps {args.max_train_steps}"] if args.max_train_steps else [])
            + ([f"--num_threads {args.num_threads}"] if args.num_threads else [])
            + [f"--set {s}" for s in args.set] + [f"--variants {' '.join(args.variants)}"]),
        "commit": git_commit(),
        "dataset": str(dataset_path),
        "split": "test",
        "test_patients": test_data.split.num_rows,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "finding_agreement": ta.finding_signature.__doc__.split("\n\n")[0].strip(),
        "note": args.note,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"meta": meta, "results": results}, indent=2))
    write_page_keeping_notes(out.with_suffix(".md"), render_markdown(meta, results).rstrip("\n").split("\n"))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def git_commit() -> str | None:
    """The checkout's short commit (a variant's meaning follows the config file of that commit), or None."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        return None
    return (commit + (" with uncommitted changes" if dirty.strip() else "")) or None


def render_markdown(meta: dict, results: dict) -> str:
    lines = [
        "# Stage 1: alignment schemes, measured side by side",
        "",
        f"Produced by `{meta['command']}`{' at commit ' + meta['commit'] if meta.get('commit') else ''} on "
        f"{meta['machine']}; dataset `{meta['dataset']}`, "
        f"{meta['split']} split ({meta['test_patients']} patients). Every variant has the same config (apart from what its name changes), step count, "
        "batch and seed. R@k: the paired sample among the top k by cosine similarity (mean of both directions; "
        "MRI averaged over T1/T2/PD/FLAIR). Agreement: the top-1 hit's findings equal the query's, as a set of "
        "(type, side, lobe) within the same anatomy; chance is the agreement of a random pairing.",
        *([ "", meta["note"]] if meta.get("note") else []),
        "",
        "| scheme | train wall time (s) | steps |",
        "|---|---|---|",
    ]
    for name, entry in results.items():
        lines.append(f"| {name} | {entry['train_wall_time_s']:.0f} | {entry['steps']} |")
    if len(results) > 1:
        lines += ["", "Top-1 finding agreement after each variant's last round (the sections below add R@k and earlier rounds):", "",
                  "| scheme | " + " | ".join(TABLE_PAIRS) + " |", "|---" * (len(TABLE_PAIRS) + 1) + "|"]
        for name, entry in results.items():
            final = entry["rounds"][entry["final_round"]]
            cells = [f"{final[p]['mean']['finding_agreement']:.3f}" if p in final else "–" for p in TABLE_PAIRS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any("by_anatomy" in entry for entry in results.values()):
        pairs = [f"{a}-{b}" for a, b in ANATOMY_PAIRS]
        lines += ["", "Top-1 finding agreement (chance) on each anatomy's own gallery, after each variant's last round:", "",
                  "| scheme | " + " | ".join(f"{p} {anatomy}" for p in pairs for anatomy in ANATOMIES) + " |",
                  "|---" * (len(pairs) * len(ANATOMIES) + 1) + "|"]
        for name, entry in results.items():
            if "by_anatomy" not in entry:
                continue
            final = entry["by_anatomy"][entry["final_round"]]
            cells = []
            for pair in pairs:
                for anatomy in ANATOMIES:
                    m = final[anatomy].get(pair, {}).get("mean")
                    cells.append("–" if m is None else f"{m['finding_agreement']:.3f} ({m['finding_agreement_chance']:.3f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, entry in results.items():
        lines += ["", f"## {name}", "", "| pair | round | R@1 | R@5 | top-1 finding agreement | chance | n |", "|---|---|---|---|---|---|---|"]
        final = entry["final_round"]
        for pair in TABLE_PAIRS:
            round_names = [r for r in entry["rounds"] if r != final and pair in ("ct-mri", "text-ct")] + [final]
            for round_name in round_names:
                m = entry["rounds"][round_name].get(pair, {}).get("mean")
                if m is None:
                    continue
                label = "after ct-mri" if round_name == "ct_mri" else f"after {round_name}"
                lines.append(
                    f"| {pair} | {label} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['finding_agreement']:.3f} | "
                    f"{m['finding_agreement_chance']:.3f} | {int(m['n'])} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
