#!/usr/bin/env python
"""Kills a training run with SIGKILL at random points, resumes it each time, and checks nothing is ever lost.

The stage is `training/train_ldm.py` on the tiny workspace of `tests/tiny_workspace.py`, built in a temp
folder (a phantom dataset plus stage-0/1 components), checkpointing every `--checkpointing_steps` steps with
`checkpoints_total_limit` 3 (so pruning runs too). Two runs of `--steps` steps share that workspace, each
with its own `output_root`:

* `reference/`: uninterrupted;
* `killed/`: launched with `--resume_from_checkpoint latest`, SIGKILLed, relaunched the same way, for
  `--trials` kills, then run to the end. `--mid_save` of the kills (default: half) are aimed at a save:
  the harness polls for the `.tmp-checkpoint-<step>` folder of this launch's save (files newer than the
  launch) and kills 0..`--save_delay` seconds after it appears, i.e. anywhere in `save_state`, the manifest,
  the rename or the pruning. The others kill 0..`--max_delay` seconds after the run logged a random step
  1..2*checkpointing_steps past where it resumed (mid-step, mid-log, mid-save, mid-validation alike).

After every kill: the latest complete checkpoint exists (once the first save finished), never goes back
in step, and every file of every listed checkpoint loads (safetensors, torch pickles, the manifest); no
visible `checkpoint-<step>` folder is partial. The relaunch itself then runs `accelerator.load_state` on
the latest. At the end: the killed run's `train_log.jsonl` holds each step exactly once, its loss curve
equals the reference's (max abs difference, expected 0), its final model equals the reference's, and no
temp/aside folders are left. A JSON summary is printed and written to `--out`; the exit status is 1 on any
failure.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/reliability/kill_resume.py --trials 12 --out kill_resume.json

`--launcher fork` (used by the bounded test) starts each run by forking this process after it imported the
stage script once, instead of a fresh `python training/train_ldm.py`: the same SIGKILL of a separate
process, without paying the ~15 s import per launch on a small CPU machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per run, as the tests run

REPO = Path(__file__).resolve().parents[2]
STAGE_SCRIPT = REPO / "training" / "train_ldm.py"
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # tiny_workspace

from medm2g_diffusers.training_utils import (
    CHECKPOINT_MANIFEST,
    CHECKPOINT_PREFIX,
    checkpoint_is_complete,
    list_checkpoints,
    read_step_log,
)

COMPONENTS = ("tokenizer", "prompt_encoders", "vae", "text_vae")
LEFTOVER = re.compile(rf"\.(tmp|old|trash)-{CHECKPOINT_PREFIX}\d+.*")
POLL_S = 0.002


# ------------------------------------------------------------------------------------------ launchers


class Launched:
    """A running stage process: a `subprocess.Popen`, or a forked child of this process."""

    def __init__(self, popen: subprocess.Popen | None = None, pid: int | None = None):
        self.popen, self.pid = popen, popen.pid if popen is not None else pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait(60)


def launch_subprocess(argv: list[str], log: Path) -> Launched:
    with log.open("w") as handle:
        popen = subprocess.Popen([sys.executable, str(STAGE_SCRIPT), *argv], stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    return Launched(popen=popen)


def _stage_module():
    name = STAGE_SCRIPT.stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, STAGE_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def launch_fork(argv: list[str], log: Path) -> Launched:
    module = _stage_module()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: run the stage, never return into the caller
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            logging.root.handlers = []  # a test runner's capture handlers: log to the file like a fresh process
            module.main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - the child reports any failure through its exit status
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return Launched(pid=pid)


LAUNCHERS = {"subprocess": launch_subprocess, "fork": launch_fork}


# ------------------------------------------------------------------------------------------- checks


def _load_file(path: Path) -> None:
    """Reads one checkpoint file the way `accelerator.load_state` would; raises when it is corrupt."""
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        load_file(str(path))
    elif path.suffix in (".bin", ".pkl", ".pt", ".pth"):
        torch.load(path, map_location="cpu", weights_only=False)
    elif path.suffix == ".json":
        json.loads(path.read_text())


def check_output(output_dir: Path) -> dict[str, Any]:
    """What a kill left: the listed checkpoints, whether each loads, partial visible folders, leftovers."""
    listed = list_checkpoints(output_dir)
    visible = sorted(p for p in output_dir.iterdir() if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)) if output_dir.is_dir() else []
    problems = [f"{p.name}: visible but incomplete" for p in visible if not checkpoint_is_complete(p)]
    loaded = 0
    for checkpoint in listed:
        if not (checkpoint / CHECKPOINT_MANIFEST).is_file():
            problems.append(f"{checkpoint.name}: no {CHECKPOINT_MANIFEST}")
        try:
            for path in sorted(checkpoint.iterdir()):
                _load_file(path)
            loaded += 1
        except Exception as exc:  # noqa: BLE001 - any failure to read is corruption
            problems.append(f"{checkpoint.name}: {type(exc).__name__}: {exc}")
    leftovers = sorted(p.name for p in output_dir.iterdir() if LEFTOVER.fullmatch(p.name)) if output_dir.is_dir() else []
    return {
        "listed": [p.name for p in listed],
        "latest": int(listed[-1].name[len(CHECKPOINT_PREFIX):]) if listed else 0,
        "loaded": loaded,
        "problems": problems,
        "leftovers": leftovers,
    }


def _last_logged_step(log: Path, launched_ns: int) -> int | None:
    """The newest step in the loss log once this launch has written it (mtime after the launch), else None."""
    try:
        if log.stat().st_mtime_ns <= launched_ns:
            return None
    except FileNotFoundError:
        return None
    records = read_step_log(log)
    return records[-1]["step"] if records else 0


def _save_started(output_dir: Path, step: int, launched_ns: int) -> bool:
    """This launch is inside the save of ``step``: its temp folder holds a file written after the launch."""
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{step}"
    try:
        return any(entry.stat().st_mtime_ns > launched_ns for entry in os.scandir(tmp))
    except (FileNotFoundError, NotADirectoryError):
        return False


def raw_log_steps(log: Path) -> list[int]:
    steps = []
    for line in log.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            steps.append(-1)
    return steps


# ---------------------------------------------------------------------------------------------- run


def build(workdir: Path) -> Path:
    """The tiny workspace (built once per workdir); returns its config."""
    from tiny_workspace import build_workspace

    config = workdir / "workspace" / "config.yaml"
    if not config.is_file():
        build_workspace(workdir / "workspace")
    return config


def stage_argv(config: Path, run_dir: Path, family: str, steps: int, every: int) -> list[str]:
    root = run_dir / "root"
    root.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        link = root / name
        if not link.exists():
            link.symlink_to(config.parent / "out" / name, target_is_directory=True)
    return [
        "--config", str(config), "--family", family, "--output_dir", str(run_dir / "ldm"), "--max_train_steps", str(steps),
        "--set", f"output_root={root}", "--set", f"ldm.checkpointing_steps={every}", "--set", "ldm.checkpoints_total_limit=3",
        "--set", "ldm.validation_steps=1000000", "--resume_from_checkpoint", "latest",
    ]


def run_kill_resume(
    workdir: Path,
    trials: int = 12,
    mid_save: int | None = None,
    steps: int | None = None,
    checkpointing_steps: int = 2,
    family: str = "xray",
    seed: int = 0,
    launcher: str = "subprocess",
    max_delay: float = 0.3,
    save_delay: float = 0.05,
    launch_timeout: float = 300.0,
) -> dict[str, Any]:
    started = time.perf_counter()
    workdir = Path(workdir)
    rng = random.Random(seed)
    every = checkpointing_steps
    mid_save = math.ceil(trials / 2) if mid_save is None else mid_save
    if not 0 <= mid_save <= trials:
        raise ValueError(f"--mid_save must be within 0..{trials}; got {mid_save}")
    # Enough that the kills, not the schedule, end the run: a kill lands at most 2*every steps + max_delay past
    # where its launch resumed.
    steps = steps or 3 * every * trials + 4 * every
    launch = LAUNCHERS[launcher]
    config = build(workdir)
    failures: list[str] = []

    t0 = time.perf_counter()
    reference = launch(stage_argv(config, workdir / "reference", family, steps, every), workdir / "reference.log")
    if reference.wait(launch_timeout) != 0:
        reference.kill()
        raise RuntimeError(f"the reference run failed (rc {reference.returncode}); see {workdir / 'reference.log'}")
    reference_seconds = time.perf_counter() - t0

    run_dir = workdir / "killed"
    output_dir = run_dir / "ldm"
    log = output_dir / "train_log.jsonl"
    argv = stage_argv(config, run_dir, family, steps, every)
    kinds = ["mid_save"] * mid_save + ["elsewhere"] * (trials - mid_save)
    rng.shuffle(kinds)
    details: list[dict[str, Any]] = []
    previous_latest = 0
    for trial, kind in enumerate(kinds):
        start = previous_latest
        launched_ns = time.time_ns()
        proc = launch(argv, workdir / f"trial-{trial:02d}.log")
        deadline = time.monotonic() + launch_timeout
        if kind == "mid_save":
            first_save = (start // every + 1) * every
            target = min(first_save + every * rng.randint(0, 1), steps)
            delay = rng.uniform(0.0, save_delay)
            def ready(target=target, launched_ns=launched_ns) -> bool:
                return _save_started(output_dir, target, launched_ns)
        else:
            target = start + rng.randint(1, 2 * every)
            if start == 0:
                target = max(target, every + 1)  # after the first save, so there is a checkpoint to check
            target = min(target, steps)
            delay = rng.uniform(0.0, max_delay)
            def ready(target=target, launched_ns=launched_ns) -> bool:
                return (_last_logged_step(log, launched_ns) or 0) >= target
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        time.sleep(delay)
        if proc.poll() is not None:
            failures.append(f"trial {trial}: the run ended (rc {proc.returncode}) before it was killed; see trial-{trial:02d}.log")
            details.append({"trial": trial, "kind": kind, "start": start, "target": target, "killed": False, "rc": proc.returncode})
            break
        if time.monotonic() >= deadline:
            failures.append(f"trial {trial}: timed out waiting for step {target}")
        proc.kill()
        logged = _last_logged_step(log, launched_ns)
        state = check_output(output_dir)
        # This launch's first save already cleaned what earlier kills left, so leftovers now are this kill's.
        caught_in_save = bool(state["leftovers"])
        if state["problems"]:
            failures.extend(f"trial {trial}: {p}" for p in state["problems"])
        if state["latest"] < previous_latest:
            failures.append(f"trial {trial}: latest checkpoint went back from {previous_latest} to {state['latest']}")
        if start >= every and not state["listed"]:
            failures.append(f"trial {trial}: no complete checkpoint after the kill")
        previous_latest = max(previous_latest, state["latest"])
        details.append({
            "trial": trial, "kind": kind, "start": start, "target": target, "delay_s": round(delay, 4),
            "logged_at_kill": logged, "latest_after": state["latest"], "listed": state["listed"], "loaded": state["loaded"],
            "leftovers": state["leftovers"], "caught_in_save": caught_in_save if kind == "mid_save" else None,
            "problems": state["problems"],
        })

    final_trains = previous_latest < steps
    final = launch(argv, workdir / "final.log")
    if final.wait(launch_timeout) != 0:
        final.kill()
        failures.append(f"the final resume failed (rc {final.returncode}); see {workdir / 'final.log'}")
    end_state = check_output(output_dir)
    failures.extend(f"after the final run: {p}" for p in end_state["problems"])
    if end_state["leftovers"] and final_trains:
        failures.append(f"after the final run: leftovers {end_state['leftovers']}")

    ref_curve = {r["step"]: r for r in read_step_log(workdir / "reference" / "ldm" / "train_log.jsonl")}
    curve = {r["step"]: r for r in read_step_log(log)} if log.is_file() else {}
    raw = raw_log_steps(log) if log.is_file() else []
    if raw != list(range(1, steps + 1)):
        failures.append(f"train_log.jsonl is not steps 1..{steps} once each ({len(raw)} lines, {len(set(raw))} distinct)")
    if sorted(ref_curve) != list(range(1, steps + 1)):
        failures.append("the reference log does not cover every step")
    common = sorted(set(ref_curve) & set(curve))
    loss_diff = max((abs(curve[s]["loss"] - ref_curve[s]["loss"]) for s in common), default=float("nan"))
    lr_diff = max((abs(curve[s]["lr"] - ref_curve[s]["lr"]) for s in common), default=float("nan"))
    if len(common) != steps or not loss_diff <= 1e-6:
        failures.append(f"loss curves differ: max |diff| {loss_diff} over {len(common)}/{steps} steps")
    weight_diff = _weight_diff(workdir / "reference" / "root" / f"unet_{family}", run_dir / "root" / f"unet_{family}")
    if not weight_diff <= 1e-6:
        failures.append(f"final models differ: max |diff| {weight_diff}")

    killed = [d for d in details if d.get("killed", True)]
    summary = {
        "stage": f"{STAGE_SCRIPT.relative_to(REPO)} --family {family}",
        "launcher": launcher,
        "steps": steps,
        "checkpointing_steps": every,
        "trials": len(killed),
        "kills_mid_save": sum(d["kind"] == "mid_save" for d in killed),
        "kills_mid_save_left_temp": sum(bool(d.get("caught_in_save")) for d in killed),
        "kills_elsewhere": sum(d["kind"] == "elsewhere" for d in killed),
        "loads_ok": sum(bool(d["listed"]) and not d["problems"] for d in killed),
        "kills_before_first_checkpoint": sum(not d["listed"] for d in killed),
        "corrupt": sum(bool(d["problems"]) for d in killed) + bool(end_state["problems"]),
        "max_loss_diff": loss_diff,
        "max_lr_diff": lr_diff,
        "max_final_weight_diff": weight_diff,
        "log_lines": len(raw),
        "reference_seconds": round(reference_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "failures": failures,
        "ok": not failures,
        "details": details,
    }
    return summary


def _weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    try:
        wa, wb = load_file(str(a / "diffusion_pytorch_model.safetensors")), load_file(str(b / "diffusion_pytorch_model.safetensors"))
    except Exception:  # noqa: BLE001 - a missing or unreadable model is a failure the caller reports
        return float("nan")
    if wa.keys() != wb.keys():
        return float("nan")
    return max(((wa[k].float() - wb[k].float()).abs().max().item() for k in wa), default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12, help="how many SIGKILLs (default 12)")
    parser.add_argument("--mid_save", type=int, default=None, help="how many of them aimed at a save (default: half)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 3*checkpointing_steps*(trials+1) + checkpointing_steps)")
    parser.add_argument("--checkpointing_steps", type=int, default=2)
    parser.add_argument("--family", default="xray", choices=("xray", "ct", "mri", "text"))
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points")
    parser.add_argument("--launcher", default="subprocess", choices=sorted(LAUNCHERS))
    parser.add_argument("--max_delay", type=float, default=0.3, help="seconds after the target step for the other kills")
    parser.add_argument("--save_delay", type=float, default=0.05, help="seconds into a save for the mid-save kills")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temp folder, deleted)")
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    args = parser.parse_args(argv)

    temp = None if args.workdir else tempfile.mkdtemp(prefix="kill-resume-")
    workdir = Path(args.workdir or temp)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_kill_resume(
            workdir, trials=args.trials, mid_save=args.mid_save, steps=args.steps, checkpointing_steps=args.checkpointing_steps,
            family=args.family, seed=args.seed, launcher=args.launcher, max_delay=args.max_delay, save_delay=args.save_delay,
        )
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
