"""Smoke test of `benchmarks/unet_flops.py`: it runs on the bundled checkpoint, counts the FLOPs and every
variant computes what the default computes. No speed thresholds (timing belongs to the benchmark run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_counts_flops_and_every_variant_matches_the_default(tmp_path):
    out = tmp_path / "unet_flops.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "unet_flops.py"), "--threads", "1", "--repeats", "1", "--iters", "1",
               "--no-compile", "--out", str(out)]
    completed = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                               timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["unet_forward_flops"] == sum(summary["flops_by_op"].values()) > 0
    assert summary["torch_compile"] is None  # --no-compile
    names = set(summary["variants"])
    assert {"default (contiguous, SDPA auto, 1 threads)", "channels_last (1 threads)", "mkldnn disabled (1 threads)",
            "channels_last + mkldnn disabled (1 threads)", "default, 1 thread"} <= names
    for name, variant in summary["variants"].items():
        assert variant["forward_ms_median"] > 0 and 0 < variant["ratio_achieved_vs_peak"]
        assert variant["max_abs_diff_vs_default"] < 1e-4, name
