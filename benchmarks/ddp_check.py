"""Does `accelerate launch` with 2 CPU processes (DDP, gloo) reproduce single-process training? Stage 2, tiny sizes.

    python benchmarks/ddp_check.py --steps 40 --out runs/perf/ddp_check.json

Three runs of ``training/train_ldm.py --family xray`` (tiny.yaml, 64 px phantoms made here with
``build_phantom_dataset``, the frozen tokenizer / prompt encoders / VAE of the bundled ``medm2g-tiny``):

* ``single``: one process (plain ``python``), seed ``--seed``, ``ldm.train_batch_size = --batch``;
* ``ddp``: ``accelerate launch --config_file training/configs/accelerate/cpu_ddp_gloo.yaml --num_processes 2``
  (``ACCELERATE_USE_CPU=true``, see that file), same seed, ``train_batch_size = --batch / 2``;
* ``single_noise``: as ``single`` with seed ``--noise-seed``: the run-to-run noise of the recipe (its
  initialisation, batches, timesteps and noise all differ; ``ddp`` shares ``single``'s initialisation, so this
  noise is, if anything, an over-estimate of what ``ddp`` may differ by).

Same global batch: ``train_batch_size`` is per process and every process draws its own rows and noise from
``(seed, step, process_index)``; DDP averages the two processes' gradients, and each loss is a mean over an equal
number of rows, so 2 x B/2 rows per step is the same update as B rows in one process (other rows, same law).

Compared: the learning rate of every step (``train_log.jsonl``; deterministic, must match), the training loss
in windows of ``--window`` steps (rank 0 logs the loss of its own B/2 rows only), also as a z-score against the
windows' standard errors (std of the steps' losses in the window / sqrt(window), a data-only noise that the
trend within a window inflates, so it is conservative), and a held-out loss: the raw
(non-EMA) weights of the checkpoint every ``--eval-every`` steps, on the xray items of the validation and test
splits, with ``--eval-draws`` fixed draws of timesteps and noise (the same for every run; no condition dropout),
so that it measures the weights, not the draw. DDP "reproduces" the curve when the learning rates match and its
held-out distance to ``single`` is within the distance between ``single`` and ``single_noise``. A probe run
through the same launcher first checks that it really starts 2 gloo processes that see each other. A DDP run
that fails is reported (its error's last lines) and the script exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
FROZEN = ("tokenizer", "prompt_encoders", "vae")  # what train_ldm --family xray reads from <output_root>
# One file per process: the processes share stdout, and their lines can interleave.
PROBE = """import json, sys
from pathlib import Path
from accelerate import Accelerator
accelerator = Accelerator()
seen = {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type), "backend": accelerator.state.backend}
Path(sys.argv[1], f"probe-{accelerator.process_index}.json").write_text(json.dumps(seen))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32, help="global batch (even): one process takes it all, DDP half each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-seed", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5, help="ldm.lr_warmup_steps, so the cosine schedule runs within --steps")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-draws", type=int, default=8)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--phantoms", type=int, default=600, help="patients of the 64 px phantom set made for the runs")
    parser.add_argument("--config", default=str(ROOT / "training" / "configs" / "tiny.yaml"))
    parser.add_argument("--script", default=str(ROOT / "training" / "train_ldm.py"), help="the stage script to run")
    parser.add_argument("--accelerate-config", default=str(ROOT / "training" / "configs" / "accelerate" / "cpu_ddp_gloo.yaml"))
    parser.add_argument("--frozen-from", default=str(ROOT / "checkpoints" / "medm2g-tiny"))
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--out", default="runs/perf/ddp_check.json")
    args = parser.parse_args()
    if args.batch % 2 or args.batch < 2:
        parser.error(f"--batch must be even and >= 2 (DDP takes half per process); got {args.batch}")
    if args.steps % args.eval_every:
        parser.error(f"--steps must be a multiple of --eval-every; got {args.steps} and {args.eval_every}")
    return args


def load_training_script(path: Path) -> ModuleType:
    """A stage script as a module (the scripts are plain files under ``training/``, not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up in sys.modules while the script executes
    spec.loader.exec_module(module)
    return module


def child_env(distributed: bool) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if distributed:
        env["ACCELERATE_USE_CPU"] = "true"  # see cpu_ddp_gloo.yaml: the launcher does not pass use_cpu on
    return env


def launcher(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config, "--num_processes", "2"]


def probe(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Starts the probe through the DDP launcher; refuses to go on unless 2 gloo processes joined one group."""
    folder = workdir / "probe"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE)
    completed = subprocess.run([*launcher(args), str(folder / "probe.py"), str(folder)], env=child_env(True),
                               capture_output=True, text=True, check=False)
    seen = [json.loads(path.read_text()) for path in sorted(folder.glob("probe-*.json"))]
    if completed.returncode != 0 or sorted(s["process_index"] for s in seen) != [0, 1] or any(
        s["num_processes"] != 2 or s["backend"] != "gloo" for s in seen
    ):
        raise RuntimeError(f"the DDP launcher did not start 2 gloo processes: {seen}\n{completed.stderr[-3000:]}")
    return seen


def train(args: argparse.Namespace, workdir: Path, name: str, seed: int, distributed: bool) -> Path:
    """One train_ldm run in its own output root (the frozen components copied in); returns its output_dir."""
    root = workdir / name
    if root.exists():
        shutil.rmtree(root)
    for component in FROZEN:
        shutil.copytree(Path(args.frozen_from) / component, root / component)
    per_process = args.batch // 2 if distributed else args.batch
    overrides = {
        "output_root": root, "ldm.train_batch_size": per_process, "ldm.lr_warmup_steps": args.warmup,
        "defaults.checkpointing_steps": args.eval_every, "defaults.checkpoints_total_limit": args.steps // args.eval_every + 1,
        # The end-of-run validation samples are not compared; keep them cheap.
        "ldm.num_validation_samples": 1, "ldm.validation_inference_steps": 2,
    }
    command = [args.script, "--config", args.config, "--family", "xray", "--dataset", str(workdir / "phantoms"),
               "--output_dir", str(root / "ldm"), "--max_train_steps", str(args.steps), "--seed", str(seed)]
    command += [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    command = [*launcher(args), *command] if distributed else [sys.executable, *command]
    completed = subprocess.run(command, env=child_env(distributed), capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        # torchrun ends stderr with its own summary: the processes' exceptions are the lines that name an error.
        errors = [line for line in completed.stderr.splitlines() if "Error" in line][-6:]
        raise RuntimeError(f"run {name} failed ({completed.returncode}): {' '.join(command)}\n" + "\n".join(errors)
                           + f"\n{completed.stderr[-2000:]}")
    return root / "ldm"


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]


class HeldOut:
    """The held-out loss of a checkpoint's raw weights: xray items of the validation and test splits, fixed draws."""

    def __init__(self, args: argparse.Namespace, workdir: Path, frozen_root: Path):
        from medm2g_diffusers.data.datasets import load_medm2g_dataset
        from medm2g_diffusers.single_flow import Condition, make_noise_scheduler
        from medm2g_diffusers.training_utils import load_config, stage_config

        self.stage = load_training_script(Path(args.script))
        self.cfg = stage_config(load_config(args.config), "ldm")
        self.components = self.stage.load_components(frozen_root, "xray", torch.device("cpu"))
        dataset = load_medm2g_dataset(str(workdir / "phantoms"))
        parts = []
        for split in ("validation", "test"):
            items = self.stage.enumerate_items(dataset[split], "xray", allow_empty=True)
            if len(items):
                encoder = self.stage.FamilyEncoder("xray", dataset[split], self.components, self.cfg["max_text_tokens"], torch.device("cpu"))
                parts.append(self.stage.encode_all(encoder, items))
        if not parts:
            raise ValueError("the phantom set has no held-out xray items: raise --phantoms")
        self.encoded = self.stage.Encoded(
            torch.cat([p.latent_mean for p in parts]), torch.cat([p.latent_std for p in parts]),
            Condition.cat([p.condition for p in parts]), torch.cat([p.class_labels for p in parts]),
        )
        self.noise_scheduler = make_noise_scheduler(self.cfg.get("prediction_type", "epsilon"))
        self.draws = args.eval_draws

    @torch.no_grad()
    def __call__(self, unet) -> float:
        unet.eval()
        losses = [
            self.stage.training_loss(unet, self.encoded, self.noise_scheduler, {"condition_dropout": 0.0},
                                     torch.Generator().manual_seed(10_000 + draw), torch.device("cpu")).item()
            for draw in range(self.draws)
        ]
        return statistics.fmean(losses)


def held_out_curve(evaluate: HeldOut, output_dir: Path, steps: list[int]) -> list[float]:
    """Held-out loss of ``checkpoint-<step>`` (accelerate's ``model.safetensors``: the raw weights) for each step."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    config = UNet2DConditionModel.load_config(str(output_dir.parent / "unet_xray"))
    curve = []
    for step in steps:
        unet = UNet2DConditionModel.from_config(config)
        unet.load_state_dict(load_file(str(output_dir / f"checkpoint-{step}" / "model.safetensors")), strict=True)
        curve.append(evaluate(unet))
    return curve


def windows(values: list[float], size: int) -> list[float]:
    return [statistics.fmean(values[start:start + size]) for start in range(0, len(values), size)]


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    return statistics.fmean(abs(x - y) for x, y in zip(a, b, strict=True))


def window_z(a: list[float], b: list[float], size: int) -> list[float]:
    """Per window, (mean a - mean b) / sqrt(se_a^2 + se_b^2), se = the steps' standard deviation / sqrt(size)."""
    scores = []
    for start in range(0, len(a), size):
        x, y = a[start:start + size], b[start:start + size]
        se2 = (statistics.variance(x) + statistics.variance(y)) / len(x)
        scores.append((statistics.fmean(x) - statistics.fmean(y)) / se2**0.5)
    return scores


def main() -> None:
    args = parse_args()
    from medm2g_diffusers.data.datasets import build_phantom_dataset, save_dataset
    from medm2g_diffusers.training_utils import atomic_write_text

    with tempfile.TemporaryDirectory(prefix="medm2g-ddp-check-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if not (workdir / "phantoms").is_dir():
            save_dataset(build_phantom_dataset(args.phantoms, seed=0, size=64), str(workdir / "phantoms"))
        processes = probe(args, workdir)
        print(f"probe: {processes}", flush=True)
        runs = {"single": (args.seed, False), "ddp": (args.seed, True), "single_noise": (args.noise_seed, False)}
        output_dirs = {}
        for name, (seed, distributed) in runs.items():
            try:
                output_dirs[name] = train(args, workdir, name, seed, distributed)
            except RuntimeError as error:
                if not distributed:
                    raise
                failure = {"settings": {"script": args.script, "launcher": " ".join(launcher(args)[1:]), "probe": processes},
                           "ddp_failed": True, "error": str(error)}
                print(str(error), file=sys.stderr)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(args.out, json.dumps(failure, indent=2) + "\n")
                sys.exit(1)
            print(f"{name}: done", flush=True)
        logs = {name: read_log(path) for name, path in output_dirs.items()}
        for name, log in logs.items():
            if [r["step"] for r in log] != list(range(1, args.steps + 1)):
                raise RuntimeError(f"run {name} logged steps {[r['step'] for r in log][:5]}...; expected 1..{args.steps}")
        eval_steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
        evaluate = HeldOut(args, workdir, workdir / "single")
        held_out = {name: held_out_curve(evaluate, path, eval_steps) for name, path in output_dirs.items()}

    loss = {name: [r["loss"] for r in log] for name, log in logs.items()}
    lr = {name: [r["lr"] for r in log] for name, log in logs.items()}
    windowed = {name: windows(values, args.window) for name, values in loss.items()}
    lr_diff = [abs(a - b) for a, b in zip(lr["ddp"], lr["single"], strict=True)]
    differing = [step for step, diff in enumerate(lr_diff, start=1) if diff > 1e-12 * max(lr["single"])]
    comparison = {
        "lr_max_abs_diff_ddp_vs_single": max(lr_diff),
        "lr_steps_that_differ": differing,
        "train_loss_window_mean_abs_diff": {"ddp_vs_single": mean_abs_diff(windowed["ddp"], windowed["single"]),
                                            "noise_vs_single": mean_abs_diff(windowed["single_noise"], windowed["single"])},
        "train_loss_window_z": {"ddp_vs_single": window_z(loss["ddp"], loss["single"], args.window),
                                "noise_vs_single": window_z(loss["single_noise"], loss["single"], args.window)},
        "held_out_mean_abs_diff": {"ddp_vs_single": mean_abs_diff(held_out["ddp"], held_out["single"]),
                                   "noise_vs_single": mean_abs_diff(held_out["single_noise"], held_out["single"])},
        "held_out_final_abs_diff": {"ddp_vs_single": abs(held_out["ddp"][-1] - held_out["single"][-1]),
                                    "noise_vs_single": abs(held_out["single_noise"][-1] - held_out["single"][-1])},
    }
    for key in ("train_loss_window_mean_abs_diff", "held_out_mean_abs_diff", "held_out_final_abs_diff"):
        pair = comparison[key]
        pair["ratio_ddp_over_noise"] = pair["ddp_vs_single"] / pair["noise_vs_single"]
    comparison["reproduces_within_noise"] = (
        not differing and comparison["held_out_mean_abs_diff"]["ratio_ddp_over_noise"] <= 1.0
    )
    summary = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__},
        "settings": {"script": args.script, "config": args.config, "steps": args.steps, "global_batch": args.batch,
                     "per_process_batch": {"single": args.batch, "ddp": args.batch // 2}, "seeds": {"single": args.seed,
                     "ddp": args.seed, "single_noise": args.noise_seed}, "lr_warmup_steps": args.warmup,
                     "eval_steps": eval_steps, "eval_draws": args.eval_draws, "window": args.window,
                     "phantoms": args.phantoms, "held_out_items": int(evaluate.encoded.latent_mean.shape[0]),
                     "launcher": " ".join(launcher(args)[1:]), "probe": processes},
        "lr": lr,
        "train_loss": loss,
        "train_loss_windows": windowed,
        "held_out_loss": held_out,
        "comparison": comparison,
    }
    print(f"{'step':>5} {'lr single':>10} {'lr ddp':>10} | {'held-out single':>15} {'ddp':>8} {'noise run':>9}")
    for index, step in enumerate(eval_steps):
        print(f"{step:>5} {lr['single'][step - 1]:>10.2e} {lr['ddp'][step - 1]:>10.2e} | "
              f"{held_out['single'][index]:>15.4f} {held_out['ddp'][index]:>8.4f} {held_out['single_noise'][index]:>9.4f}")
    text = json.dumps(summary, indent=2)
    print(json.dumps(comparison, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
