"""Imports the stage scripts under `training/` (plain scripts, not a package) as modules for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TRAINING = Path(__file__).resolve().parents[1] / "training"


def load_training_script(name: str) -> ModuleType:
    """``load_training_script("train_ldm")`` imports ``training/train_ldm.py`` once and returns the module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TRAINING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules while the script executes
    spec.loader.exec_module(module)
    return module
