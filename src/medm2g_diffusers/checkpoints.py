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


# ------------------------------------------------------------------------------------ safe loading

# Weight files in these formats are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds pickle weight files and the caller did not opt in with ``allow_pickle=True``."""


def pickle_weight_files(folder: str | os.PathLike) -> list[Path]:
    """Pickle-format files in a local checkpoint folder and its component folders (two levels deep)."""
    folder = Path(folder)
    found = [p for pattern in ("*", "*/*") for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES]
    return sorted(found)


def check_safe_to_load(name_or_path: str | os.PathLike, allow_pickle: bool = False, **loading_kwargs) -> None:
    """Refuses what could run code on load, before anything is read.

    * pickle weight files (``.bin``, ``.pt``, ``.ckpt``, ...) in a local folder, unless ``allow_pickle=True``;
    * ``use_safetensors=False`` without ``allow_pickle=True``;
    * ``trust_remote_code`` or ``custom_pipeline``: MedM2G checkpoints are data, never code.

    Raises:
        UnsafeCheckpointError: one of the above.
    """
    for key in ("trust_remote_code", "custom_pipeline"):
        if loading_kwargs.get(key):
            raise UnsafeCheckpointError(
                f"{key} is not supported: MedM2G checkpoints are weights and configs only and never run code "
                f"from the checkpoint; got {key}={loading_kwargs[key]!r}"
            )
    if allow_pickle:
        return
    if loading_kwargs.get("use_safetensors") is False:
        raise UnsafeCheckpointError("use_safetensors=False loads pickle weights; pass allow_pickle=True as well if you trust the source")
    if os.path.isdir(name_or_path):
        found = pickle_weight_files(name_or_path)
        if found:
            names = ", ".join(str(p.relative_to(name_or_path)) for p in found[:5])
            raise UnsafeCheckpointError(
                f"{os.fspath(name_or_path)!r} holds pickle weight files ({names}{', ...' if len(found) > 5 else ''}); "
                "unpickling can run arbitrary code, so only safetensors are loaded by default. Convert them "
                "(load once with allow_pickle=True, then save_pretrained) or pass allow_pickle=True if you trust "
                "where the checkpoint came from"
            )
