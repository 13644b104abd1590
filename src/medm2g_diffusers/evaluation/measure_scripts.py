"""Plumbing shared by the measurement scripts in ``scripts/`` that write a results page and its JSON.

Each such script takes ``--page`` (the Markdown page; its JSON lies beside it), ``--threads`` and ``--page_only``
(rewrite the page's tables from the JSON, training and scoring nothing), and runs its training steps as logged
subprocesses with a fixed thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .benchmark_tables import write_page_keeping_notes


def add_page_arguments(parser: argparse.ArgumentParser, page: Path) -> None:
    """``--page`` (default ``page``), ``--threads`` and ``--page_only``."""
    parser.add_argument("--page", type=Path, default=page, help="the results page (its JSON is written beside it)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    parser.add_argument("--page_only", action="store_true", help="rewrite the page from the JSON beside it; run nothing")


def rewrote_page_only(args: argparse.Namespace, page_lines: Callable[[dict], list[str]]) -> bool:
    """With ``--page_only``, rewrites ``args.page`` from its JSON (keeping the hand-written notes) and returns True."""
    if not args.page_only:
        return False
    write_page_keeping_notes(args.page, page_lines(json.loads(args.page.with_suffix(".json").read_text())))
    return True


def made_by_line(record: dict, json_name: str) -> str:
    """A page's first line: the command that made it (``record["command"]``), machine, threads and minutes."""
    threads = record["threads"]
    return (f"Made by `{record['command']}` ({record['machine']}, {threads} torch thread{'s' if threads != 1 else ''}; "
            f"{record['seconds'] / 60:.0f} min). Raw numbers: `{json_name}`.")


def run_logged(cmd: list[str], log: Path, threads: int, cwd: Path) -> float:
    """Runs ``cmd`` in ``cwd`` with ``threads`` OpenMP/MKL threads and its output in ``log``; returns its wall
    seconds. A failing command raises `subprocess.CalledProcessError` (its log says why)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(cmd, check=True, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return time.perf_counter() - start
