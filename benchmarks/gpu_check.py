"""Base-config throughput on one GPU: text -> X-ray images/s and stage-2 training samples/s, with the card's name.

    bash benchmarks/gpu_check.sh                       # what to run on a machine with a GPU (calls this script)
    bash benchmarks/gpu_check.sh --dry-run             # CPU, tiny.yaml sizes: checks the code path, measures nothing

Images/s: a pipeline at ``training/configs/base.yaml`` sizes with random weights (built and saved once by
``memory.build_random_pipeline``, float16 on disk), loaded with ``targets=["xray"], conditions=["text"]`` (the
same modules a full load runs, less memory) in bfloat16 (base.yaml's ``mixed_precision``) and moved to the GPU;
one call = ``--batch`` prompts, ``--steps`` DDIM steps, guidance 2.0 (CFG: the UNet sees 2 x batch rows),
``output_type="np"`` (VAE decode and the copy to the host included). One warm-up call of 2 steps, then
``--repeats`` timed calls (``torch.cuda.synchronize`` around each); images/s = batch / median seconds per call.

Training samples/s: ``training/train_ldm.py --family xray`` at base.yaml sizes (one process, bf16 mixed
precision, ``train_batch_size`` from the config), its frozen tokenizer / prompt encoders / VAE taken from the same
random pipeline, on ``--phantoms`` phantom patients at the config's image size, run in this process through the
script's own ``main``. A timestamp is taken when each step calls the script's ``training_loss`` (after a
synchronize), so the time between two stamps is one whole step (loss, backward, clipping, optimizer, EMA, log);
the median over the steps after ``--warmup-steps`` gives samples/s = batch / step time. The final checkpoint and
validation after the last step are outside the stamps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from memory import build_random_pipeline, load_training_script

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Large right pleural effusion. Heart size is normal."
FROZEN = ("tokenizer", "prompt_encoders", "vae")  # what train_ldm --family xray reads from <output_root>


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny.yaml sizes, a few steps: checks the code path only")
    parser.add_argument("--config", default=None, help="training YAML (default: base.yaml; tiny.yaml with --dry-run)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per call (default 8; 2 with --dry-run)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps per call (default 50; 2 with --dry-run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 3; 1 with --dry-run)")
    parser.add_argument("--train-steps", type=int, default=None, help="train_ldm steps (default 30; 4 with --dry-run)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps left out of the median (default 5; 1 with --dry-run)")
    parser.add_argument("--phantoms", type=int, default=None, help="phantom patients for training (default 64; 24 with --dry-run)")
    parser.add_argument("--card", default=None, help="the card as nvidia-smi names it (gpu_check.sh passes it)")
    parser.add_argument("--workdir", default=None, help="keep the random pipeline and the run here (default: a temporary folder)")
    parser.add_argument("--out", default="runs/perf/gpu_check.json")
    args = parser.parse_args()
    defaults = {"config": ROOT / "training" / "configs" / ("tiny.yaml" if args.dry_run else "base.yaml"),
                "batch": 2 if args.dry_run else 8, "steps": 2 if args.dry_run else 50, "repeats": 1 if args.dry_run else 3,
                "train_steps": 4 if args.dry_run else 30, "warmup_steps": 1 if args.dry_run else 5,
                "phantoms": 24 if args.dry_run else 64}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, str(value) if name == "config" else value)
    if args.train_steps - args.warmup_steps < 2:
        parser.error(f"--train-steps must exceed --warmup-steps by at least 2; got {args.train_steps} and {args.warmup_steps}")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(args: argparse.Namespace, pipeline_dir: Path, device: torch.device, dtype: torch.dtype) -> dict:
    from medm2g_diffusers import MedM2GPipeline

    pipe = MedM2GPipeline.from_pretrained(pipeline_dir, dtype=dtype, targets=["xray"], conditions=["text"]).to(device)
    pipe.set_progress_bar_config(disable=True)

    def call(steps: int) -> None:
        pipe([PROMPT] * args.batch, targets=["xray"], num_inference_steps=steps, guidance_scale=2.0,
             generator=torch.Generator().manual_seed(0), output_type="np")

    call(2)  # warm-up: kernel selection, allocator
    seconds = []
    for _ in range(args.repeats):
        synchronize(device)
        started = time.perf_counter()
        call(args.steps)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    result = {"batch": args.batch, "steps": args.steps, "guidance_scale": 2.0, "dtype": str(dtype),
              "seconds_per_call": seconds, "images_per_second": args.batch / statistics.median(seconds)}
    if device.type == "cuda":
        result["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def training_samples_per_second(args: argparse.Namespace, pipeline_dir: Path, workdir: Path, device: torch.device) -> dict:
    from medm2g_diffusers.data.datasets import build_phantom_dataset, save_dataset
    from medm2g_diffusers.training_utils import load_config, stage_config

    config = load_config(args.config)
    root = workdir / "train_root"
    root.mkdir(parents=True, exist_ok=True)
    for component in FROZEN:
        if not (root / component).exists():
            (root / component).symlink_to((pipeline_dir / component).resolve(), target_is_directory=True)
    phantoms = workdir / "phantoms"
    if not phantoms.is_dir():
        save_dataset(build_phantom_dataset(args.phantoms, seed=0, size=config["data"]["size"]), str(phantoms))

    stage = load_training_script("train_ldm")
    stamps, original = [], stage.training_loss

    def timed_training_loss(*a, **k):
        synchronize(device)
        stamps.append(time.perf_counter())
        return original(*a, **k)

    stage.training_loss = timed_training_loss  # main() looks the function up at every step
    try:
        stage.main([
            "--config", args.config, "--family", "xray", "--dataset", str(phantoms), "--output_dir", str(root / "ldm"),
            "--max_train_steps", str(args.train_steps), "--set", f"output_root={root}",
            "--set", "ldm.num_validation_samples=1", "--set", "ldm.validation_inference_steps=2",
        ])
    finally:
        stage.training_loss = original
    steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup_steps:]
    batch = stage_config(config, "ldm")["train_batch_size"]
    result = {"train_batch_size": batch, "train_steps": args.train_steps, "timed_steps": len(steps),
              "mixed_precision": stage_config(config, "ldm").get("mixed_precision", "no"),
              "seconds_per_step": steps, "samples_per_second": batch / statistics.median(steps)}
    if device.type == "cuda":
        result["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    args = parse_args()
    from medm2g_diffusers.training_utils import atomic_save_pretrained, atomic_write_text

    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU: torch.cuda is not available; nothing measured (use --dry-run to check the code path on CPU)")
        return
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # train_ldm's Accelerator then stays on the CPU even beside a GPU
    with tempfile.TemporaryDirectory(prefix="medm2g-gpu-check-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        pipeline_dir = workdir / "pipeline"
        if not (pipeline_dir / "model_index.json").is_file():
            atomic_save_pretrained(build_random_pipeline(args.config, dtype=torch.float16), pipeline_dir, max_shard_size="1GB")
        dtype = torch.float32 if args.dry_run else torch.bfloat16
        inference = images_per_second(args, pipeline_dir, device, dtype)
        print(f"text -> xray: {inference['images_per_second']:.3f} images/s", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        training = training_samples_per_second(args, pipeline_dir, workdir, device)
        print(f"train_ldm xray: {training['samples_per_second']:.2f} samples/s", flush=True)
    summary = {
        "dry_run": args.dry_run,
        "card": args.card,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "python": sys.version.split()[0]},
        "config": args.config,
        "weights": "random; float16 on disk, loaded in " + str(dtype),
        "inference": inference,
        "training": training,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
