"""Evaluation: metrics and diagnostics behind `medm2g evaluate` and the scripts in `scripts/`."""
