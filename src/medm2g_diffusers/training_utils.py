"""What every training stage shares: configs, deterministic batches, atomic checkpoints, batch transforms.

Design choice (see docs/decisions.md): a step's data and randomness are a pure function of
``(seed, step, process_index)``. Batches come from :class:`StepBatchSampler` and the noise, timesteps and
augmentations of a step from :func:`step_generator`, so ``--resume_from_checkpoint latest`` reproduces the
uninterrupted run's next loss exactly without saving sampler state, and killing a run loses nothing but
the steps since its last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .modalities import get_modality, to_model_range

CHECKPOINT_PREFIX = "checkpoint-"


# ----------------------------------------------------------------------------------------------- config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Reads a YAML config and applies ``section.key=value`` overrides (values parsed as YAML scalars)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    with path.open() as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must be a YAML mapping at the top level")
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise ValueError(f"--set expects section.key=value; got {item!r}")
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {dotted}: {name!r} is not a section of the config")
        node[leaf] = yaml.safe_load(raw)
    return config


def stage_config(config: dict[str, Any], section: str) -> dict[str, Any]:
    """One stage's section merged over the shared ``defaults`` section (a stage's own keys win)."""
    if section not in config:
        raise ValueError(f"the config has no section {section!r} (sections: {sorted(config)})")
    merged = copy.deepcopy(config.get("defaults", {}))
    merged.update(copy.deepcopy(config[section]))
    return merged


def base_argument_parser(description: str) -> argparse.ArgumentParser:
    """The flags every stage script takes; scripts add their own on top."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. training/configs/tiny.yaml")
    parser.add_argument("--output_dir", default=None, help="where this stage writes (default: from the config)")
    parser.add_argument("--dataset", default=None, help="dataset directory from `medm2g phantoms`/`prepare` (default: from the config)")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint directory, or 'latest'")
    parser.add_argument("--max_train_steps", type=int, default=None, help="override the config's step count")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    return parser


# ------------------------------------------------------------------------------- deterministic batches


def step_generator(seed: int, step: int, process_index: int = 0, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, step, process_index, salt)``: the randomness of one step."""
    mixed = np.random.SeedSequence([seed, step, process_index, salt]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & 0x7FFF_FFFF_FFFF_FFFF)


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields the index batches of steps ``start_step .. max_steps - 1``; batch ``s`` depends on (seed, s) only.

    Each epoch-free step draws ``batch_size`` distinct indices, so resuming at step ``s`` yields exactly the
    batches an uninterrupted run would have seen from ``s`` on. With several processes each takes its own
    draw (``process_index`` is part of the seed).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, max_steps: int, start_step: int = 0, process_index: int = 0):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive; got {num_samples} (is the training split empty?)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.max_steps, self.start_step, self.process_index = max_steps, start_step, process_index

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.max_steps):
            yield self.draw(np.random.default_rng([self.seed, step, self.process_index]))

    def draw(self, rng: np.random.Generator) -> list[int]:
        """One batch from the step's generator; subclasses change how indices are drawn, not the stepping."""
        replace = self.batch_size > self.num_samples
        return rng.choice(self.num_samples, size=self.batch_size, replace=replace).tolist()


# -------------------------------------------------------------------------------------------- rounds


def round_at(rounds: list[dict], step: int) -> dict:
    for r in rounds:
        if r["start"] <= step < r["start"] + r["steps"]:
            return r
    raise ValueError(f"step {step} is past the schedule ({rounds[-1]['start'] + rounds[-1]['steps']} steps)")


def lr_lambda_for(rounds: list[dict], warmup_steps: int):
    """Per round (``{start, steps}`` dicts): linear warm-up, then cosine decay to 10%. Restarting per round lets a
    later round (ct-mri) learn."""

    def factor(step: int) -> float:
        r = round_at(rounds, min(step, rounds[-1]["start"] + rounds[-1]["steps"] - 1))
        local, length = step - r["start"], r["steps"]
        warmup = min(warmup_steps, max(1, length // 10))
        if local < warmup:
            return (local + 1) / warmup
        progress = (local - warmup) / max(1, length - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-<step>``) sorted by step; temp folders of a killed save are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest complete checkpoint or None; a path -> that path (must exist)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {resume!r} is not a checkpoint directory")
    return path


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    if match is None:
        raise ValueError(f"{path} is not named {CHECKPOINT_PREFIX}<step>")
    return int(match.group(1))


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep: int | None = 2) -> Path:
    """``accelerator.save_state`` into a temp folder, then one atomic rename to ``checkpoint-<step>``.

    A process killed mid-save leaves only a ``.tmp-`` folder that :func:`list_checkpoints` ignores, so the
    latest complete checkpoint always loads. Older checkpoints beyond ``keep`` are removed after the rename.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep is not None:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes a text file through a sibling temp file and a rename, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_pretrained(model, directory: str | Path, also: Sequence[Any] = (), **kwargs) -> None:
    """``model.save_pretrained`` into a sibling temp folder, then swap it in, so a reader never sees half a model.

    ``also``: objects with ``save_pretrained`` saved into the same folder (e.g. the scheduler a denoiser was
    trained for, whose ``scheduler_config.json`` sits beside the model's ``config.json``).
    """
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), **kwargs)
    for extra in also:
        extra.save_pretrained(str(tmp))
    old = directory.with_name(f".old-{directory.name}")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------- batch transforms


def images_to_model_range(batch: dict[str, Any], keys: Sequence[str]) -> dict[str, torch.Tensor | None]:
    """Stacks a batch's native-unit images into ``(B, 1, H, W)`` model-range tensors, per modality.

    A modality missing in any row of the batch gives ``None`` for that key (use :func:`present_rows`
    to select rows first); nothing is zero-filled silently.
    """
    out: dict[str, torch.Tensor | None] = {}
    for key in keys:
        get_modality(key)
        column = batch[key]
        if any(v is None for v in column):
            out[key] = None
            continue
        stacked = torch.stack([torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in column])
        if torch.isnan(stacked).any():
            # datasets' numpy/torch formats turn a missing Array2D into an all-NaN array; never train on it.
            raise ValueError(f"batch column {key!r} contains NaN (a missing image under numpy format?); select rows with present_rows first")
        out[key] = to_model_range(stacked, key).unsqueeze(1)
    return out


def present_rows(dataset, keys: Sequence[str]):
    """The rows of a ``datasets.Dataset`` in which every modality in ``keys`` is present (uses Arrow nulls)."""
    table = dataset.data
    mask = np.ones(dataset.num_rows, dtype=bool)
    for key in keys:
        column = table.column(key)
        mask &= ~np.asarray(column.is_null().to_numpy(zero_copy_only=False))
    return dataset.select(np.flatnonzero(mask).tolist())
