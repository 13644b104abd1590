"""Writes docs/results/tiny-recipe.md: one timed run of training/recipes/tiny.sh, and its model scored beside another
checkpoint (by default: is a rerun of the recipe within noise of the bundled medm2g-tiny?).

    CONFIG=runs/recipe_check/tiny.yaml bash training/recipes/tiny.sh      # tiny.yaml with output_root changed
    medm2g evaluate --model runs/recipe_check/pipeline --name rerun --baseline medm2g-tiny=checkpoints/medm2g-tiny \
        --tasks report_generation text_to_image image_to_image --no-fid --out runs/recipe_check/evaluate
    python scripts/write_recipe_page.py --times runs/recipe_check/recipe_times.log \
        --results runs/recipe_check/evaluate/benchmark.json

`--previous_times LOG` adds the seconds of an earlier run of the recipe beside each step, and their ratio, so a
step whose config did not change shows how fast the machine was on each day. `--title` and `--heading` rename
the page and the comparison (say, when the run became the bundled checkpoint and is
scored beside the one it replaced); `--also HEADING=JSON` adds an earlier comparison below it, such as the last rerun.
Everything above the notes marker is regenerated; the hand-written reading below it is kept.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from medm2g_diffusers.evaluation.benchmark_tables import run_section, titled_results, write_page_keeping_notes

_TOOK = re.compile(r"^\[tiny\.sh\] (?P<what>.+) took (?P<seconds>\d+) s$")


def recipe_times(log: str) -> list[tuple[str, int]]:
    """``(step, seconds)`` for every ``[tiny.sh] ... took N s`` line of a ``recipe_times.log``, in order."""
    times = []
    for line in log.splitlines():
        match = _TOOK.match(line.strip())
        if match:
            what = match["what"]
            what = re.sub(r"^launch \d+ training/", "", what)  # the launcher prefix says nothing about the step
            what = re.sub(r"^\S+ -m medm2g_diffusers\.cli ", "medm2g ", what)  # nor does the interpreter's path
            what = re.sub(r" --config \S+| --resume_from_checkpoint latest| --out \S+", "", what)
            times.append((what, int(match["seconds"])))
    if not any(what == "recipe" for what, _ in times):
        raise ValueError("the log has no '[tiny.sh] recipe took N s' line: the recipe did not finish")
    return times


TITLE = "training/recipes/tiny.sh end to end, and how close a rerun comes to the bundled checkpoint"
HEADING = "The rerun's model beside the bundled one"


def time_rows(times: list[tuple[str, int]], previous: list[tuple[str, int]] | None) -> list[str]:
    """The step table; with ``previous``, that run's seconds for the same step and this run's over them."""
    previous_seconds = {what: seconds for what, seconds in (previous or [])}
    header = ["| step | seconds |", "| --- | --- |"]
    if previous is not None:
        header = ["| step | seconds | previous run's seconds | ratio |", "| --- | --- | --- | --- |"]
    rows = []
    for what, seconds in times:
        cells = [what.replace("|", r"\|"), str(seconds)]  # a lanes line has a pipe
        if previous is not None:
            before = previous_seconds.get(what)
            cells += [str(before), f"{seconds / before:.2f}"] if before else ["–", "–"]
        rows.append("| " + " | ".join(cells) + " |")
    return header + rows


def page_lines(times: list[tuple[str, int]], results: dict, times_path: str, results_path: str, title: str = TITLE,
               heading: str = HEADING, also: list[tuple[str, dict]] = (), previous: list[tuple[str, int]] | None = None,
               previous_path: str | None = None) -> list[str]:
    """The page: the recipe's step times (beside ``previous``'s when given), then the comparison of ``results``,
    then each further ``(heading, results)``."""
    total = dict(times)["recipe"]
    command = f"scripts/write_recipe_page.py --times {times_path} --results {results_path}"
    if previous_path:
        command += f" --previous_times {previous_path}"
    lines = [
        f"# {title}", "",
        f"Made by `{command}` from the runs its docstring lists.", "",
        f"## Wall time: {total / 60:.1f} min", "",
        *time_rows(times, previous), "",
        "Steps inside `lanes lane1 | lane2` ran at the same time, one torch thread each; the lanes line is their wall "
        "time together. The phantom data step is absent when the data already existed.", "",
        *run_section(heading, results, paired=True),
    ]
    for extra_heading, extra in also:
        lines += ["", *run_section(extra_heading, extra, paired=True)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", required=True, help="recipe_times.log of a tiny.sh run")
    parser.add_argument("--results", required=True, help="benchmark.json of medm2g evaluate on its pipeline (with the bundled model as a baseline)")
    parser.add_argument("--out", default="docs/results/tiny-recipe.md")
    parser.add_argument("--previous_times", default=None, help="recipe_times.log of an earlier run, shown beside")
    parser.add_argument("--title", default=TITLE)
    parser.add_argument("--heading", default=HEADING, help="the section of --results")
    parser.add_argument("--also", action="append", default=[], metavar="HEADING=JSON",
                        help="a further comparison (benchmark.json of another medm2g evaluate run) under its own heading")
    args = parser.parse_args()
    try:
        also = titled_results(args.also)
    except ValueError as error:
        parser.error(str(error))
    times = recipe_times(Path(args.times).read_text())
    previous = recipe_times(Path(args.previous_times).read_text()) if args.previous_times else None
    results = json.loads(Path(args.results).read_text())
    write_page_keeping_notes(Path(args.out), page_lines(times, results, args.times, args.results, args.title, args.heading, also,
                                                        previous, args.previous_times))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
