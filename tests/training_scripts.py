"""Imports the repository's plain scripts (`training/`, `scripts/`: not a package) as modules for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "training"


def load_training_script(name: str) -> ModuleType:
    """``load_training_script("train_ldm")`` imports ``training/train_ldm.py`` once and returns the module."""
    return load_script(f"training/{name}.py")


def load_script(path: str) -> ModuleType:
    """``load_script("scripts/write_phantom_baselines_page.py")`` imports that file (relative to the repository
    root) once, as a module named after its stem, and returns it."""
    name = Path(path).stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules while the script executes
    spec.loader.exec_module(module)
    return module
