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
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

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


def task_config_section(config: dict[str, Any], section: str, name: str) -> dict[str, Any]:
    """Task ``name`` of the config's ``tasks`` mapping, its keys over ``section`` over ``defaults`` (the scripts that
    train one task of several: ``finetune_lora.py``, ``train_regression_baseline.py``)."""
    tasks = config.get("tasks") or {}
    if name not in tasks:
        raise ValueError(f"--task must be one of the config's tasks {sorted(tasks)}; got {name!r}")
    cfg = stage_config(config, section)
    cfg.update(copy.deepcopy(tasks[name]))
    return cfg


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
#
# Kill safety (SIGKILL at any instant; checked by scripts/reliability/kill_resume.py): a folder
# named ``checkpoint-<step>`` is only ever created by one rename of a finished, fsynced temp folder carrying a
# manifest (file names and sizes), and is never deleted or rewritten in place: replacing one swaps it out
# atomically (or renames it aside to ``.old-`` first), pruning one renames it to ``.trash-`` first. Dot-prefixed
# leftovers of a killed save (``.tmp-``, ``.old-``, ``.trash-``) are ignored by :func:`list_checkpoints` and
# cleaned up by the next :func:`save_checkpoint`.

CHECKPOINT_MANIFEST = "checkpoint_manifest.json"
_STALE_CHECKPOINT = re.compile(rf"\.(tmp|old|trash)-{CHECKPOINT_PREFIX}(\d+)(-[0-9a-f]+)?")
_RENAME_EXCHANGE = 2  # linux/fs.h
_renameat2 = None


def _fsync_path(path: Path) -> None:
    """Flushes a file's (or a folder's entries') data to disk; best effort where a platform cannot fsync a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            _renameat2 = libc.renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError, TypeError):  # not Linux, or a libc without renameat2
            _renameat2 = False
    if not _renameat2:
        return False
    at_fdcwd = -100
    return _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _remove_dir(path: Path) -> None:
    """Deletes a folder without ever leaving it half-deleted under its own name: rename to ``.trash-``, then rmtree.

    A dot-prefixed folder (a temp or aside folder, ignored by listings) is deleted where it is.
    """
    if not path.exists():
        return
    if path.name.startswith("."):
        shutil.rmtree(path, ignore_errors=True)
        return
    trash = path.with_name(f".trash-{path.name}-{os.urandom(4).hex()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _install_dir(tmp: Path, final: Path) -> None:
    """Moves the finished folder ``tmp`` to ``final``; a reader sees the old ``final`` or the new one, never a mix.

    A missing ``final`` takes one rename. An existing one is swapped atomically where the OS can
    (``RENAME_EXCHANGE``), else renamed aside to ``.old-<name>`` first (a kill between the two renames leaves
    ``.old-`` complete, and :func:`clean_stale_checkpoints` puts it back).
    """
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        _remove_dir(tmp)  # now holds the replaced content
    else:
        old = final.with_name(f".old-{final.name}")
        _remove_dir(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _remove_dir(old)
    _fsync_path(final.parent)


def write_checkpoint_manifest(folder: str | Path, step: int) -> None:
    """Records every file of a finished checkpoint folder with its size; written last, so its presence means done."""
    folder = Path(folder)
    _fsync_tree(folder)
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKPOINT_MANIFEST
    }
    manifest = folder / CHECKPOINT_MANIFEST
    with manifest.open("w") as handle:
        json.dump({"step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_path(folder)


def checkpoint_is_complete(folder: str | Path) -> bool:
    """True when every file the manifest lists is there with its recorded size.

    A folder without a manifest counts as complete: checkpoints written before manifests existed (this
    module's own saves never leave a manifest-less ``checkpoint-<step>``: the manifest is in before the rename).
    """
    folder = Path(folder)
    manifest = folder / CHECKPOINT_MANIFEST
    if not folder.is_dir():
        return False
    if not manifest.exists():
        return True
    try:
        files = json.loads(manifest.read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def clean_stale_checkpoints(output_dir: str | Path) -> None:
    """Removes what a killed save left behind (``.tmp-``, ``.old-``, ``.trash-`` checkpoint folders).

    An ``.old-checkpoint-<step>`` whose ``checkpoint-<step>`` is missing (killed between the two renames of a
    replace) is complete: it is put back instead of deleted.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for path in output_dir.iterdir():
        match = _STALE_CHECKPOINT.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        final = output_dir / f"{CHECKPOINT_PREFIX}{match.group(2)}"
        if match.group(1) == "old" and not final.exists() and checkpoint_is_complete(path):
            os.replace(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-<step>``) sorted by step.

    Dot-prefixed leftovers of a killed save are ignored, and so is a ``checkpoint-<step>`` whose manifest
    does not match its files (see :func:`checkpoint_is_complete`).
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        p for p in output_dir.iterdir()
        if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name) and checkpoint_is_complete(p)
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest complete checkpoint or None; a path -> that path (must exist and
    be complete)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {resume!r} is not a checkpoint directory")
    if not checkpoint_is_complete(path):
        raise ValueError(f"resume_from_checkpoint {resume!r} is incomplete: its files do not match {CHECKPOINT_MANIFEST}")
    return path


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    if match is None:
        raise ValueError(f"{path} is not named {CHECKPOINT_PREFIX}<step>")
    return int(match.group(1))


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep: int | None = 2) -> Path:
    """``accelerator.save_state`` into a temp folder, then one atomic rename to ``checkpoint-<step>``.

    Safe against a kill at any instant: the temp folder is fsynced and gets its manifest before the rename,
    an existing ``checkpoint-<step>`` is swapped out atomically (or renamed aside first), and checkpoints
    beyond the newest ``keep`` are renamed to ``.trash-`` before they are deleted. So the latest complete
    checkpoint always loads, and :func:`list_checkpoints` never returns a partial one. Leftovers of a killed
    save are cleaned up here first.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_checkpoints(output_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_checkpoint_manifest(tmp, step)
        _install_dir(tmp, final)
        if keep is not None:
            for old in list_checkpoints(output_dir)[:-keep]:
                _remove_dir(old)
    accelerator.wait_for_everyone()
    return final


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes a text file through a fsynced sibling temp file and a rename, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_save_folder(write: Callable[[Path], None], directory: str | Path) -> None:
    """``write(tmp)`` fills a sibling temp folder, which is then swapped in, so a reader never sees half of it."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    old = directory.with_name(f".old-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if old.is_dir() and not directory.exists():
        os.replace(old, directory)  # a kill between the two renames of a replace: the old folder was complete
    shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    _install_dir(tmp, directory)


def atomic_save_pretrained(model, directory: str | Path, also: Sequence[Any] = (), **kwargs) -> None:
    """``model.save_pretrained`` into a sibling temp folder, then swap it in, so a reader never sees half a model.

    ``also``: objects with ``save_pretrained`` saved into the same folder (e.g. the scheduler a denoiser was
    trained for, whose ``scheduler_config.json`` sits beside the model's ``config.json``).
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), **kwargs)
        for extra in also:
            extra.save_pretrained(str(tmp))

    atomic_save_folder(write, directory)


# ------------------------------------------------------------------------------------------ step logs


def _read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """Parsed records of a JSONL file and whether any line was unreadable (a line torn by a kill mid-write)."""
    records, torn = [], False
    if not path.is_file():
        return records, torn
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn = True
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            torn = True
    return records, torn


def read_step_log(path: str | Path, step_key: str = "step") -> list[dict]:
    """One record per step of an append-only JSONL step log, sorted by step.

    Where a step was logged twice (a run killed after logging it and resumed from an earlier checkpoint)
    the last record wins; lines torn by a kill mid-write are skipped.
    """
    records, _ = _read_jsonl(Path(path))
    by_step = {r[step_key]: r for r in records if step_key in r}
    return [by_step[s] for s in sorted(by_step)]


class StepLog:
    """An append-only JSONL log of per-step records that survives a kill and a resume.

    Each :meth:`append` writes one line and flushes it, so a SIGKILL loses at most the line being written.
    Opening the log for a run that starts (or resumes) at ``resume_step`` first drops what that run will log
    again: records whose ``step_key`` is past ``resume_step``, duplicate steps and torn lines (rewritten
    atomically, only when something is dropped). So after any number of kills and resumes the file holds
    each step once, as the run that reached the end computed it.
    """

    def __init__(self, path: str | Path, resume_step: int, step_key: str = "step"):
        self.path, self.step_key = Path(path), step_key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records, torn = _read_jsonl(self.path)
        by_step = {r[step_key]: r for r in records if step_key in r and r[step_key] <= resume_step}
        kept = [by_step[s] for s in sorted(by_step)]
        if torn or len(kept) != len(records):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._handle = self.path.open("a")

    def append(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
