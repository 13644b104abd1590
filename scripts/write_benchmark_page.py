"""Writes docs/results/benchmark.md from the JSON of `medm2g evaluate` runs (tables by code, never by hand).

    python scripts/write_benchmark_page.py --main runs/tiny/evaluate/benchmark.json \
        --ablation runs/ablation/evaluate/benchmark.json --out docs/results/benchmark.md

Other results pages built from `medm2g evaluate` runs use the same writer with their own title and sections:

    python scripts/write_benchmark_page.py --title "..." --heading "test split" --main test.json \
        --also "validation split=validation.json" --out docs/results/page.md

Everything above the notes marker is regenerated; the hand-written reading of the tables below it is kept.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from medm2g_diffusers.evaluation.benchmark_tables import (
    evaluate_command,
    markdown_tables,
    run_section,
    titled_results,
    write_page_keeping_notes,
)


def ablation_time_table(log: str) -> list[str]:
    """The wall time of every stage of every variant, from ablation.sh's ``recipe_times.log`` lines
    ``[ablation.sh] <command> took <N> s``."""
    rows = []
    for line in log.splitlines():
        root, took = re.search(r"(?:output_root=|--root )(\S+)", line), re.search(r" took (\d+) s$", line)
        if not root or not took:
            continue
        family = re.search(r"--family (\w+)", line)
        stage = next((name for name in ("train_alignment", "train_ldm", "export_single_flow_pipeline", "train_multiflow") if name in line), "?")
        rows.append((Path(root.group(1)).name, stage + (f" --family {family.group(1)}" if family else ""), int(took.group(1))))
    if not rows:
        return []
    total = sum(seconds for *_, seconds in rows)
    return ["Ablation training wall times (`recipe_times.log`):", "",
            "| variant | stage | seconds |", "| --- | --- | --- |",
            *(f"| {variant} | {stage} | {seconds:,} |" for variant, stage, seconds in rows),
            f"| every variant | total | {total:,} ({total / 60:.0f} min) |", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", required=True, help="benchmark.json of the full run on medm2g-tiny")
    parser.add_argument("--ablation", default=None, help="benchmark.json of training/recipes/ablation.sh evaluate")
    parser.add_argument("--ablation_times", default=None,
                        help="ablation.sh's recipe_times.log (default: beside the ablation run, two folders above its JSON)")
    parser.add_argument("--also", action="append", default=[], metavar="HEADING=JSON",
                        help="another run's benchmark.json, as a section after the main one (repeatable)")
    parser.add_argument("--title", default="The phantom benchmark")
    parser.add_argument("--heading", default="medm2g-tiny against the same checkpoint's stage-2 LDMs", help="the main run's section")
    parser.add_argument("--out", default="docs/results/benchmark.md")
    args = parser.parse_args()

    out = Path(args.out)
    main_results = json.loads(Path(args.main).read_text())
    lines = [f"# {args.title}", "",
             "Made by `scripts/write_benchmark_page.py` from the JSON of the runs below (rerun them to reproduce).", "",
             *run_section(args.heading, main_results)]
    try:
        also = titled_results(args.also)
    except ValueError as error:
        parser.error(str(error))
    for heading, results in also:
        lines += run_section(heading, results)
    if args.ablation:
        ablation = json.loads(Path(args.ablation).read_text())
        lines += ["## Ablation (text <-> X-ray, every variant retrained on one budget: `training/recipes/ablation.sh`)", "",
                  "Variants: `baseline` = single-flow LDMs on unaligned prompt encoders; `ca` + central alignment; "
                  "`ca_lcga` + cross-guided generation; `ca_vi` + visual invariant; `all` = all three.", "",
                  f"```bash\nbash training/recipes/ablation.sh && bash training/recipes/ablation.sh evaluate\n# = {evaluate_command(ablation)}\n```", "",
                  markdown_tables(ablation)]
        times = Path(args.ablation_times) if args.ablation_times else Path(args.ablation).parents[1] / "recipe_times.log"
        if times.is_file():
            lines += ablation_time_table(times.read_text())
    write_page_keeping_notes(out, lines)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
