"""Training survives SIGKILL at any instant: the hardened checkpoint/log helpers of `training_utils`, and
`scripts/reliability/kill_resume.py` killing and resuming `training/train_ldm.py`.

The unit tests simulate a kill by raising :class:`Killed` from inside a save (from `accelerator.save_state`,
`os.replace` or `shutil.rmtree`) and then look at what a resumed run would see."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from medm2g_diffusers import training_utils
from medm2g_diffusers.training_utils import (
    CHECKPOINT_MANIFEST,
    StepLog,
    atomic_save_pretrained,
    atomic_write_text,
    checkpoint_is_complete,
    clean_stale_checkpoints,
    list_checkpoints,
    read_step_log,
    resolve_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs (a BaseException, so no `except Exception` eats it)."""


class FakeAccelerator:
    """What `save_checkpoint` uses of an `Accelerator`; `save_state` writes two files (or dies between them)."""

    is_main_process = True

    def __init__(self, die_after_first_file: bool = False):
        self.die_after_first_file = die_after_first_file

    def wait_for_everyone(self):
        pass

    def save_state(self, path: str):
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(b"m" * 64)
        if self.die_after_first_file:
            raise Killed
        (folder / "optimizer.bin").write_bytes(b"o" * 32)


def steps(output_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in list_checkpoints(output_dir)]


def hidden(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir() if p.name.startswith("."))


def save(output_dir: Path, step: int, keep: int | None = 2, **kwargs):
    return save_checkpoint(FakeAccelerator(**kwargs), output_dir, step, keep=keep)


def kill_on_call(monkeypatch, module, name: str, call: int, partial=None):
    """Makes the ``call``-th call (1-based) of ``module.name`` raise :class:`Killed`, after ``partial(args)``."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            if partial is not None:
                partial(*args)
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def delete_one_file(path, *args):
    """A kill mid-rmtree: one file of the folder is gone, the rest is still there."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    if files:
        files[0].unlink()


# ------------------------------------------------------------------------------------ checkpoints


def test_save_writes_a_manifest_and_prunes_to_keep(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step)
    assert steps(tmp_path) == [4, 5]
    assert hidden(tmp_path) == []
    manifest = json.loads((tmp_path / "checkpoint-5" / CHECKPOINT_MANIFEST).read_text())
    assert manifest == {"step": 5, "files": {"model.safetensors": 64, "optimizer.bin": 32}}


def test_kill_inside_save_state_leaves_only_a_temp_folder_that_the_next_save_removes(tmp_path):
    save(tmp_path, 2)
    with pytest.raises(Killed):
        save(tmp_path, 4, die_after_first_file=True)
    assert steps(tmp_path) == [2]
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    assert hidden(tmp_path) == [".tmp-checkpoint-4"]
    save(tmp_path, 6)
    assert steps(tmp_path) == [2, 6] and hidden(tmp_path) == []


def test_kill_before_the_rename_keeps_the_previous_latest(tmp_path, monkeypatch):
    save(tmp_path, 2)
    kill_on_call(monkeypatch, training_utils.os, "replace", 1)
    with pytest.raises(Killed):
        save(tmp_path, 4)
    monkeypatch.undo()
    assert steps(tmp_path) == [2]
    # the temp folder is complete (manifest and all) but never listed under its temp name
    assert checkpoint_is_complete(tmp_path / ".tmp-checkpoint-4")
    save(tmp_path, 4)
    assert steps(tmp_path) == [2, 4] and hidden(tmp_path) == []


@pytest.mark.parametrize("kill_at", ["aside", "swap"])
def test_replacing_a_checkpoint_without_atomic_exchange_is_never_half_visible(tmp_path, monkeypatch, kill_at):
    """Without RENAME_EXCHANGE the old folder is renamed aside first; a kill between the renames loses nothing."""
    save(tmp_path, 2, keep=None)
    save(tmp_path, 4, keep=None)
    monkeypatch.setattr(training_utils, "_exchange", lambda a, b: False)
    # os.replace calls of the replace: final -> .old- (1), tmp -> final (2)
    kill_on_call(monkeypatch, training_utils.os, "replace", 1 if kill_at == "aside" else 2)
    with pytest.raises(Killed):
        save(tmp_path, 4, keep=None)
    monkeypatch.undo()
    if kill_at == "aside":
        assert steps(tmp_path) == [2, 4]
    else:  # checkpoint-4 is aside as .old-checkpoint-4, complete: the latest listed is still a complete one
        assert steps(tmp_path) == [2]
        assert ".old-checkpoint-4" in hidden(tmp_path)
        clean_stale_checkpoints(tmp_path)  # what the next save does first: the complete .old- goes back
        assert steps(tmp_path) == [2, 4]
    save(tmp_path, 6, keep=None)
    assert steps(tmp_path) == [2, 4, 6] and hidden(tmp_path) == []


def test_replacing_a_checkpoint_swaps_atomically(tmp_path, monkeypatch):
    save(tmp_path, 4)
    (tmp_path / "checkpoint-4" / "marker-of-the-old-one").write_text("old")
    # a kill while deleting the swapped-out old content: the new checkpoint-4 is already in place
    kill_on_call(monkeypatch, training_utils.shutil, "rmtree", 1, partial=delete_one_file)
    with pytest.raises(Killed):
        save(tmp_path, 4)
    monkeypatch.undo()
    assert steps(tmp_path) == [4]
    assert not (tmp_path / "checkpoint-4" / "marker-of-the-old-one").exists()
    assert checkpoint_is_complete(tmp_path / "checkpoint-4")
    save(tmp_path, 6)
    assert hidden(tmp_path) == []


def test_kill_while_pruning_never_lists_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 2)
    save(tmp_path, 4)
    # the first rmtree of save 6 (nothing stale to clean) is the prune of checkpoint-2, renamed to .trash- first
    kill_on_call(monkeypatch, training_utils.shutil, "rmtree", 1, partial=delete_one_file)
    with pytest.raises(Killed):
        save(tmp_path, 6)
    monkeypatch.undo()
    assert steps(tmp_path) == [4, 6]
    (trash,) = hidden(tmp_path)
    assert trash.startswith(".trash-checkpoint-2-")
    save(tmp_path, 8)
    assert steps(tmp_path) == [6, 8] and hidden(tmp_path) == []


def test_leftovers_of_a_killed_run_are_ignored_and_cleaned(tmp_path):
    save(tmp_path, 2)
    for name in (".tmp-checkpoint-4", ".old-checkpoint-2", ".trash-checkpoint-1-0a1b2c3d"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-validation.json").write_text("{}")  # not a checkpoint leftover: left alone
    assert steps(tmp_path) == [2]
    save(tmp_path, 4)
    assert steps(tmp_path) == [2, 4] and hidden(tmp_path) == [".tmp-validation.json"]


def test_manifest_rejects_a_truncated_checkpoint_and_accepts_legacy_ones(tmp_path):
    save(tmp_path, 2, keep=None)
    save(tmp_path, 4, keep=None)
    with (tmp_path / "checkpoint-4" / "optimizer.bin").open("r+b") as handle:
        handle.truncate(5)
    assert steps(tmp_path) == [2]
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-4"))
    legacy = tmp_path / "checkpoint-6"  # written before manifests existed
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"m")
    assert steps(tmp_path) == [2, 6]
    assert resolve_checkpoint(tmp_path, str(legacy)) == legacy


# ------------------------------------------------------------------------------ atomic files/models


class FakeModel:
    def __init__(self, text: str):
        self.text = text

    def save_pretrained(self, directory: str, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(self.text)


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_save_pretrained_survives_a_kill_between_renames(tmp_path, monkeypatch, exchange):
    target = tmp_path / "unet"
    atomic_save_pretrained(FakeModel("v1"), target)
    if not exchange:
        monkeypatch.setattr(training_utils, "_exchange", lambda a, b: False)
        kill_on_call(monkeypatch, training_utils.os, "replace", 2)  # after unet -> .old-unet
        with pytest.raises(Killed):
            atomic_save_pretrained(FakeModel("v2"), target)
        monkeypatch.undo()
        assert not target.exists() and (tmp_path / ".old-unet" / "config.json").read_text() == "v1"
    atomic_save_pretrained(FakeModel("v3"), target)
    assert (target / "config.json").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_atomic_write_text_keeps_the_old_file_on_a_kill(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    kill_on_call(monkeypatch, training_utils.os, "replace", 1)
    with pytest.raises(Killed):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


# ------------------------------------------------------------------------------------- step logs


def test_step_log_drops_what_a_resumed_run_logs_again_and_torn_lines(tmp_path):
    path = tmp_path / "train_log.jsonl"
    with StepLog(path, resume_step=0) as log:
        for step in range(1, 6):
            log.append({"step": step, "loss": step / 10})
    with path.open("a") as handle:
        handle.write('{"step": 6, "lo')  # killed mid-write
    assert [r["step"] for r in read_step_log(path)] == [1, 2, 3, 4, 5]
    with StepLog(path, resume_step=4) as log:  # resumed from checkpoint-4: steps 5.. are logged again
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
        log.append({"step": 5, "loss": 0.55})
    assert read_step_log(path)[-1] == {"step": 5, "loss": 0.55}
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_read_step_log_keeps_the_last_record_of_a_step(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 2}\nnot json\n{"step": 2, "loss": 3}\n')
    assert read_step_log(path) == [{"step": 1, "loss": 1}, {"step": 2, "loss": 3}]
    assert read_step_log(tmp_path / "missing.jsonl") == []


def test_step_log_rewrites_nothing_when_nothing_is_dropped(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 1}\n')
    inode = path.stat().st_ino
    StepLog(path, resume_step=1).close()
    assert path.stat().st_ino == inode  # nothing dropped: not rewritten


# -------------------------------------------------------------------------------- kill and resume


def _kill_resume():
    name = "kill_resume"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "reliability" / "kill_resume.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _assert_survived(summary: dict, trials: int, mid_save: int):
    assert summary["failures"] == [] and summary["ok"]
    assert summary["trials"] == trials
    assert summary["kills_mid_save"] == mid_save and summary["kills_elsewhere"] == trials - mid_save
    assert summary["corrupt"] == 0
    assert summary["loads_ok"] + summary["kills_before_first_checkpoint"] == trials
    assert summary["max_loss_diff"] <= 1e-7 and summary["max_final_weight_diff"] <= 1e-7
    assert summary["log_lines"] == summary["steps"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the bounded run forks pre-imported stage processes")
def test_killed_and_resumed_training_matches_an_uninterrupted_run(tmp_path):
    """3 SIGKILLs (one as soon as a save has begun), resumed with `latest` each time: same losses, same model."""
    summary = _kill_resume().run_kill_resume(tmp_path, trials=3, mid_save=1, launcher="fork", save_delay=0.0, seed=1)
    _assert_survived(summary, trials=3, mid_save=1)
    assert summary["kills_mid_save_left_temp"] == 1  # killed before that save's rename
    assert summary["max_loss_diff"] == 0.0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_twelve_kills_of_real_stage_processes(tmp_path):
    """The full check: 12 SIGKILLs of `python training/train_ldm.py` subprocesses, half aimed at a save."""
    summary = _kill_resume().run_kill_resume(tmp_path, trials=12, launcher="subprocess", seed=0)
    _assert_survived(summary, trials=12, mid_save=6)
    assert summary["kills_mid_save_left_temp"] >= 4
    shutil.rmtree(tmp_path, ignore_errors=True)
