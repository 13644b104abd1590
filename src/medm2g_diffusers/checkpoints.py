"""The checkpoints that ship with the repository, found by name.

``checkpoints/medm2g-tiny`` is committed next to the package (fp16 safetensors, loaded as fp32). The
CLI, the demo and ``MedM2GPipeline.from_pretrained("medm2g-tiny")`` resolve the name here, so a fresh
clone generates offline without a path. A name that is also an existing local folder keeps its
ordinary meaning (diffusers' rule: a local folder wins).
"""

from __future__ import annotations

import os
from pathlib import Path

# The repository root when the package is installed from a clone (pip install -e .).
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_CHECKPOINTS: dict[str, Path] = {"medm2g-tiny": REPOSITORY_ROOT / "checkpoints" / "medm2g-tiny"}
DEFAULT_CHECKPOINT = "medm2g-tiny"


def bundled_checkpoint_path(name: str = DEFAULT_CHECKPOINT) -> Path:
    """The folder of a bundled checkpoint.

    Raises:
        ValueError: ``name`` is not a bundled checkpoint.
        FileNotFoundError: the package was installed without the repository's ``checkpoints/`` folder.
    """
    if name not in BUNDLED_CHECKPOINTS:
        raise ValueError(f"name must be one of the bundled checkpoints {sorted(BUNDLED_CHECKPOINTS)}; got {name!r}")
    path = BUNDLED_CHECKPOINTS[name]
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the bundled checkpoint {name!r} is not at {path}: it ships in the git repository, so install "
            "from a clone (`pip install -e .`) or pass the folder of a trained pipeline instead"
        )
    return path


def resolve_checkpoint(name_or_path: str | os.PathLike) -> str:
    """A local folder as given; a bundled checkpoint's name as its folder; anything else unchanged (Hub id)."""
    text = os.fspath(name_or_path)
    if text in BUNDLED_CHECKPOINTS and not os.path.isdir(text):
        return str(bundled_checkpoint_path(text))
    return text
