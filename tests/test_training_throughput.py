"""Smoke test of `benchmarks/training_throughput.py` at a toy size: it runs train_ldm.py (cached and uncached) and
the bare loop interleaved, and its JSON has the documented fields with positive rates.

No speed thresholds (timing belongs to the benchmark run, not to the tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("train_ldm_cached", "train_ldm_uncached", "bare")
PHASES = ("data", "forward", "loss_backward", "clip", "optimizer", "sched_zero_grad", "ema", "rest")


def test_quick_run_writes_the_documented_fields(tmp_path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "training_throughput.py"), "--quick", "--threads", "1",
               "--phantoms", "24", "--batch", "4", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    completed = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                               timeout=240, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(out.read_text())

    settings = summary["settings"]
    assert settings["batch_size"] == 4 and settings["rounds"] == 2 and settings["steps_per_segment"] == 1
    assert settings["round_orders"] == [list(VARIANTS), [*VARIANTS[1:], VARIANTS[0]]]  # rotated
    for name in VARIANTS:
        assert summary["samples_per_s_median"][name] > 0
        assert len(summary["samples_per_s_segments"][name]) == 2 and all(v > 0 for v in summary["samples_per_s_segments"][name])
        assert len(summary["step_ms_all"][name]) == 2
        assert set(summary["phase_ms_median"][name]) == {*PHASES, "step"}
        assert all(v >= 0 for v in summary["phase_ms_median"][name].values())
        assert 0 <= summary["data_loading_share_median"][name] < 1
        assert summary["losses_finite"][name]
    assert summary["phase_ms_median"]["bare"]["ema"] == 0 and summary["phase_ms_median"]["train_ldm_cached"]["ema"] > 0
    assert summary["same_unet_init"] == {"uncached_vs_cached": True, "bare_vs_cached": True}
    assert summary["cache_build_seconds"] > 0 and settings["train_items_cached"] > 0
    for key in ("ratio_cached_over_bare", "ratio_cached_over_bare_per_round_median", "speedup_cached_over_uncached",
                "ratio_expected_from_extras"):
        assert summary[key] > 0
    assert summary["target_ratio_cached_over_bare"] == 0.9 and isinstance(summary["met"]["cached_over_bare>=0.9"], bool)
    assert summary["machine"]["torch_threads_in_variant_threads"] == {name: 1 for name in VARIANTS}
    assert summary["bare_loop_omits"]
