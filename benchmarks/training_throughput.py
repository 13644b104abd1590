"""Stage-2 training throughput: `train_ldm.py` (latents cached / not cached) against a bare loop, side by side.

    OMP_NUM_THREADS=1 python benchmarks/training_throughput.py --threads 1 --rounds 12 --steps 4 --out runs/perf/training_throughput.json

Three variants of one optimizer step of the xray LDM at ``--config`` sizes (tiny.yaml: 64 px, the tiny UNet,
``ldm.train_batch_size``), each in its own thread of this one process, only one of them running at any time:

* ``train_ldm_cached``: ``training/train_ldm.py``'s own ``main()`` with ``cache_latents: true`` (its default);
* ``train_ldm_uncached``: the same with ``cache_latents: false``: the frozen VAE and text prompt encoder run on
  every step's batch (read from the dataset, as the script does);
* ``bare``: a plain loop over the same UNet (a copy of the cached run's UNet as ``build_unet`` made it, so same
  config and same init), same batch size, latents (posterior mean + std x one fixed draw) and condition tokens
  and mask already in memory (a few pre-built batches taken from the cached run's latent cache), and per step
  only noise, timesteps, ``add_noise``, the UNet forward, the MSE against the config's target (v-prediction in
  tiny.yaml), backward, ``AdamW.step`` (same lr and weight decay) and ``zero_grad(set_to_none=True)``. It omits
  everything else ``train_ldm.py`` does per step: accelerate (``accelerator.accumulate``/``backward``, its
  optimizer and scheduler wrappers), gradient clipping (``max_grad_norm``), the lr scheduler, the EMA update,
  classifier-free condition dropout, the per-step seeded generator and batch draw (``step_generator``,
  ``StepBatchSampler``), gathering the batch from the cache and drawing the latent from mean/std, ``loss.item()``,
  the JSONL step log and the tqdm bar.

``train_ldm.py`` runs unmodified: the script is imported once per variant as its own module and five of its
module globals are wrapped, to pause it and to read the clock, never to change what it computes:
``StepBatchSampler`` (a subclass that stamps the start of each step and, between segments, blocks the thread
until the variant's next turn), ``build_unet`` (forward pre/post hooks on the UNet; the cached variant's fresh
UNet is also copied for the bare loop), ``Accelerator`` (stamps after ``backward`` and ``clip_grad_norm_``),
``get_scheduler`` (optimizer step pre/post hooks) and ``EMAModel`` (stamps around ``step``); ``encode_all`` is
timed (the one-off cache build, reported separately). The bare loop stamps the same points, so the per-step
phases line up: ``data`` (step start -> UNet forward: batch, generator, noise, ``add_noise``: the data-loading
share), ``forward``, ``loss_backward``, ``clip``, ``optimizer``, ``sched_zero_grad`` (optimizer end -> EMA start),
``ema`` and ``rest`` (EMA end -> next step's start: ``loss.item()``, log, tqdm).

Method: setup (dataset, frozen parts, UNet, cache) runs once per variant, one variant at a time, and is not
timed except the cache build. Then ``--warmup`` untimed steps per variant, then ``--rounds`` rounds; in each round
every variant runs ``--steps`` consecutive optimizer steps (a segment) while the others wait, in an order
rotated every round (ABC, BCA, CAB, ...). A step's time is from its start to the next step's start, so it holds
everything the training loop does for that step; the time a thread spends paused between segments is not in
it. Per segment: samples/s = batch / mean step time; reported: the median over rounds, every segment, the
median step time, and the per-round ratios (segments adjacent in time). Validation and checkpointing are
pushed past the timed steps (``checkpointing_steps`` and ``validation_steps`` set beyond the run, cheap
validation settings); the one extra last step, which saves the final checkpoint and runs validation, is not timed.

The frozen tokenizer, prompt encoders and VAE come from ``--frozen-from`` (the bundled ``medm2g-tiny``),
copied into a per-variant output root, as ``benchmarks/ddp_check.py`` does.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FROZEN = ("tokenizer", "prompt_encoders", "vae")  # what train_ldm --family xray reads from <output_root>
VARIANTS = ("train_ldm_cached", "train_ldm_uncached", "bare")
PHASES = ("data", "forward", "loss_backward", "clip", "optimizer", "sched_zero_grad", "ema", "rest")
TARGET = 0.9
FAR = 10**9  # checkpointing / validation interval beyond any run here
BARE_BATCHES = 4  # pre-built batches the bare loop cycles through
BARE_OMITS = [
    "accelerate (accelerator.accumulate / backward, AcceleratedOptimizer, AcceleratedScheduler)",
    "gradient clipping (clip_grad_norm_ at max_grad_norm)",
    "lr scheduler step (cosine with warm-up)",
    "EMA update (diffusers EMAModel.step)",
    "classifier-free condition dropout (Condition.drop)",
    "per-step seeded generator (step_generator) and batch draw (StepBatchSampler)",
    "gathering the batch from the latent cache and drawing latent = mean + std * eps",
    "loss.item(), the per-step JSONL log (flushed) and the tqdm bar",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "training" / "configs" / "tiny.yaml"))
    parser.add_argument("--script", default=str(ROOT / "training" / "train_ldm.py"), help="the stage script to measure")
    parser.add_argument("--family", default="xray", choices=("xray", "ct", "mri"))
    parser.add_argument("--dataset", default=None, help="dataset directory (default: the config's data.dataset)")
    parser.add_argument("--phantoms", type=int, default=None, help="instead of --dataset: build an N-patient 64 px phantom set in the workdir")
    parser.add_argument("--frozen-from", default=str(ROOT / "checkpoints" / "medm2g-tiny"))
    parser.add_argument("--batch", type=int, default=None, help="ldm.train_batch_size (default: the config's)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every variant's thread")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant per round (one segment)")
    parser.add_argument("--quick", action="store_true", help="smoke setting: 2 rounds x 1 step, 1 warm-up step (no meaningful figures)")
    parser.add_argument("--workdir", default=None, help="keep the variants' output roots here (default: a temporary folder)")
    parser.add_argument("--out", default="runs/perf/training_throughput.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 1, 1
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1 and --warmup >= 0")
    return args


def load_script_as(path: Path, name: str) -> ModuleType:
    """Imports ``path`` as a fresh module ``name`` (one per variant, so each one's wrapped globals are its own)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules while the script executes
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------- turn taking


class Runner:
    """One variant in its own thread; runs ``budget`` steps per turn, then blocks until the next turn.

    The variant's code calls :meth:`begin_step` at the start of every step and :meth:`end` after its last one;
    :meth:`stamp` records a named time point into the current step.
    """

    def __init__(self, name: str, threads: int, target: Callable[["Runner"], Any]):
        self.name, self.threads, self.target = name, threads, target
        self.records: list[dict[str, float]] = []
        self.current: dict[str, float] | None = None
        self.info: dict[str, Any] = {}
        self.budget = 0
        self.error: BaseException | None = None
        self.result: Any = None
        self._resume, self._paused, self._done = threading.Event(), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # -- runner side
    def _main(self) -> None:
        try:
            torch.set_num_threads(self.threads)
            self.info["torch_threads_in_thread"] = torch.get_num_threads()
            self.result = self.target(self)
        except BaseException as error:  # reported by the scheduler
            self.error = error
        finally:
            self._done.set()
            self._paused.set()

    def stamp(self, key: str) -> None:
        if self.current is not None:
            self.current[key] = time.perf_counter()

    def _close_step(self) -> None:
        if self.current is not None:
            self.current["end"] = time.perf_counter()
            self.records.append(self.current)
            self.current = None
            self.budget -= 1

    def begin_step(self) -> None:
        self._close_step()
        if self.budget <= 0:
            self._paused.set()
            self._resume.wait()
            self._resume.clear()
        self.current = {"start": time.perf_counter()}

    def end(self) -> None:
        self._close_step()

    # -- scheduler side
    def _wait(self) -> None:
        self._paused.wait()
        if self.error is not None:
            raise RuntimeError(f"variant {self.name} failed") from self.error

    def start(self) -> float:
        """Starts the thread and waits until it is paused before its first step; returns the setup seconds."""
        started = time.perf_counter()
        self._paused.clear()
        self._thread.start()
        self._wait()
        if self._done.is_set():
            raise RuntimeError(f"variant {self.name} ended before its first step")
        return time.perf_counter() - started

    def run(self, steps: int) -> None:
        self.budget = steps
        self._paused.clear()
        self._resume.set()
        self._wait()

    def finish(self) -> None:
        """Lets the variant run to its end (its last step and what follows) and joins it."""
        self.budget = FAR
        self._paused.clear()
        self._resume.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"variant {self.name} failed") from self.error


def hook_unet(unet: torch.nn.Module, runner: Runner) -> None:
    def pre(_module, args, kwargs):
        runner.stamp("fwd_start")
        tokens = kwargs.get("encoder_hidden_states")
        if runner.current is not None and tokens is not None:
            runner.current["tokens"] = float(tokens.shape[1])

    unet.register_forward_pre_hook(pre, with_kwargs=True)
    unet.register_forward_hook(lambda *_: runner.stamp("fwd_end"))


def hook_optimizer(optimizer: torch.optim.Optimizer, runner: Runner) -> None:
    optimizer.register_step_pre_hook(lambda *_: runner.stamp("opt_start"))
    optimizer.register_step_post_hook(lambda *_: runner.stamp("opt_end"))


# ------------------------------------------------------------------------------------ the variants


def instrument(module: ModuleType, runner: Runner, keep_initial_unet: bool) -> None:
    """Wraps the globals of one imported copy of train_ldm.py (see the module docstring)."""
    base_sampler, base_build_unet, base_accelerator = module.StepBatchSampler, module.build_unet, module.Accelerator
    base_get_scheduler, base_ema, base_encode_all = module.get_scheduler, module.EMAModel, module.encode_all

    class GatedSampler(base_sampler):
        def __iter__(self):
            for batch in super().__iter__():
                runner.begin_step()
                yield batch
            runner.end()

    def build_unet(*args, **kwargs):
        unet = base_build_unet(*args, **kwargs)
        runner.info["unet_initial_state"] = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        if keep_initial_unet:
            runner.info["unet_copy"] = copy.deepcopy(unet)
        runner.info["unet_parameters"] = sum(p.numel() for p in unet.parameters())
        runner.info["unet_parameter_tensors"] = len(list(unet.parameters()))
        hook_unet(unet, runner)
        return unet

    class TimedAccelerator(base_accelerator):
        def backward(self, loss, **kwargs):
            super().backward(loss, **kwargs)
            runner.stamp("bwd_end")

        def clip_grad_norm_(self, *args, **kwargs):
            norm = super().clip_grad_norm_(*args, **kwargs)
            runner.stamp("clip_end")
            return norm

    def get_scheduler(name, optimizer, *args, **kwargs):
        hook_optimizer(optimizer, runner)
        return base_get_scheduler(name, optimizer, *args, **kwargs)

    class TimedEMA(base_ema):
        def step(self, *args, **kwargs):
            runner.stamp("ema_start")
            out = super().step(*args, **kwargs)
            runner.stamp("ema_end")
            return out

    def encode_all(encoder, items):
        started = time.perf_counter()
        cache = base_encode_all(encoder, items)
        runner.info["cache_build_seconds"] = time.perf_counter() - started
        runner.info["cache_items"] = len(items)
        runner.info["cache"] = cache
        return cache

    module.StepBatchSampler, module.build_unet, module.Accelerator = GatedSampler, build_unet, TimedAccelerator
    module.get_scheduler, module.EMAModel, module.encode_all = get_scheduler, TimedEMA, encode_all


def train_ldm_target(args, module: ModuleType, config: str, dataset: str, root: Path, total_steps: int, cache: bool):
    overrides = {
        "output_root": root, "ldm.cache_latents": cache, "ldm.validation_steps": FAR,
        "defaults.checkpointing_steps": FAR, "ldm.num_validation_samples": 1, "ldm.validation_inference_steps": 2,
    }
    if args.batch is not None:
        overrides["ldm.train_batch_size"] = args.batch
    argv = ["--config", config, "--family", args.family, "--dataset", dataset, "--output_dir", str(root / "ldm"),
            "--max_train_steps", str(total_steps)]
    argv += [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]

    def target(_runner: Runner):
        return module.main(argv)

    return target, argv


def bare_target(cached: Runner, cfg: dict[str, Any], batch_size: int, total_steps: int, seed: int):
    """The plain loop (see the module docstring); reads the cached variant's fresh UNet copy and latent cache."""
    from medm2g_diffusers.single_flow import make_noise_scheduler, training_target

    def target(runner: Runner):
        unet = cached.info["unet_copy"]
        runner.info["unet_initial_state"] = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        cache = cached.info["cache"]
        generator = torch.Generator().manual_seed(seed)
        n = cache.latent_mean.shape[0]
        batches = []
        for _ in range(BARE_BATCHES):
            idx = torch.randperm(n, generator=generator)[:batch_size] if n >= batch_size else torch.randint(0, n, (batch_size,), generator=generator)
            mean, std = cache.latent_mean[idx], cache.latent_std[idx]
            batches.append((mean + std * torch.randn(mean.shape, generator=generator), cache.condition.tokens[idx].contiguous(),
                            cache.condition.mask[idx].contiguous()))
        noise_scheduler = make_noise_scheduler(cfg.get("prediction_type", "epsilon"))
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg["learning_rate"], weight_decay=cfg.get("adam_weight_decay", 1e-2))
        hook_unet(unet, runner)
        hook_optimizer(optimizer, runner)
        unet.train()
        losses = []
        for step in range(total_steps):
            runner.begin_step()
            latents, tokens, mask = batches[step % BARE_BATCHES]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample
            loss = F.mse_loss(prediction.float(), training_target(noise_scheduler, latents, noise, timesteps).float())
            loss.backward()
            runner.stamp("bwd_end")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        runner.end()
        return {"history": [{"step": i + 1, "loss": float(v)} for i, v in enumerate(losses)]}

    return target


# ---------------------------------------------------------------------------------------- analysis


def phases_ms(record: dict[str, float]) -> dict[str, float]:
    """A step's phases in ms (a phase the variant does not have counts 0; see the module docstring)."""
    t = dict(record)
    t.setdefault("clip_end", t["bwd_end"])
    t.setdefault("ema_start", t["end"])  # the bare loop has no EMA: all after the optimizer is sched_zero_grad
    t.setdefault("ema_end", t["ema_start"])
    points = [("data", "start", "fwd_start"), ("forward", "fwd_start", "fwd_end"), ("loss_backward", "fwd_end", "bwd_end"),
              ("clip", "bwd_end", "clip_end"), ("optimizer", "opt_start", "opt_end"), ("sched_zero_grad", "opt_end", "ema_start"),
              ("ema", "ema_start", "ema_end"), ("rest", "ema_end", "end")]
    out = {name: (t[b] - t[a]) * 1e3 for name, a, b in points}
    out["clip"] += (t["opt_start"] - t["clip_end"]) * 1e3  # accumulate-context and wrapper time between clip and step
    out["step"] = (t["end"] - t["start"]) * 1e3
    return out


def lscpu_model() -> str | None:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), None)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    from medm2g_diffusers.training_utils import atomic_write_text, load_config, stage_config

    config = load_config(args.config)
    cfg = stage_config(config, "ldm")
    cfg.update(cfg.get("families", {}).get(args.family, {}))
    batch_size = args.batch if args.batch is not None else cfg["train_batch_size"]
    total_steps = args.warmup + args.rounds * args.steps + 1  # + the last step (final checkpoint, validation): not timed

    with tempfile.TemporaryDirectory(prefix="medm2g-throughput-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.phantoms is not None:
            from medm2g_diffusers.data.datasets import build_phantom_dataset, save_dataset

            dataset = workdir / f"phantoms-{args.phantoms}"
            if not dataset.is_dir():
                save_dataset(build_phantom_dataset(args.phantoms, seed=0, size=config["data"]["size"]), str(dataset))
        else:
            dataset = Path(args.dataset or config["data"]["dataset"])
        runners: dict[str, Runner] = {}
        argvs: dict[str, list[str]] = {}
        for name, cache in (("train_ldm_cached", True), ("train_ldm_uncached", False)):
            root = workdir / name
            if root.exists():
                shutil.rmtree(root)
            for component in FROZEN:
                shutil.copytree(Path(args.frozen_from) / component, root / component)
            module = load_script_as(Path(args.script), f"_throughput_{name}")
            runner = Runner(name, args.threads, lambda r: None)
            instrument(module, runner, keep_initial_unet=cache)
            runner.target, argvs[name] = train_ldm_target(args, module, args.config, str(dataset), root, total_steps, cache)
            runners[name] = runner
        runners["bare"] = Runner("bare", args.threads, bare_target(runners["train_ldm_cached"], cfg, batch_size, total_steps, cfg["seed"]))

        setup_seconds = {name: runners[name].start() for name in VARIANTS}  # one at a time; cached first (bare needs its cache)
        order = list(VARIANTS)
        for r in range(args.warmup):
            for name in order:
                runners[name].run(1)
        first_timed = {name: len(runners[name].records) for name in VARIANTS}
        orders = []
        for r in range(args.rounds):
            rotated = order[r % len(order):] + order[: r % len(order)]
            orders.append(rotated)
            for name in rotated:
                runners[name].run(args.steps)
        for name in VARIANTS:
            runners[name].finish()
        results = {name: runners[name].result for name in VARIANTS}

    steps: dict[str, list[dict[str, float]]] = {}
    for name in VARIANTS:
        records = runners[name].records
        timed = records[first_timed[name]: first_timed[name] + args.rounds * args.steps]
        if len(timed) != args.rounds * args.steps or len(records) != total_steps:
            raise RuntimeError(f"{name}: {len(records)} steps recorded, expected {total_steps}")
        steps[name] = [phases_ms(rec) for rec in timed]
    segments = {name: [steps[name][r * args.steps:(r + 1) * args.steps] for r in range(args.rounds)] for name in VARIANTS}
    segment_sps = {name: [batch_size / (statistics.fmean(s["step"] for s in seg) / 1e3) for seg in segs] for name, segs in segments.items()}
    med_sps = {name: statistics.median(v) for name, v in segment_sps.items()}
    per_round = {
        "cached_over_bare": [c / b for c, b in zip(segment_sps["train_ldm_cached"], segment_sps["bare"])],
        "cached_over_uncached": [c / u for c, u in zip(segment_sps["train_ldm_cached"], segment_sps["train_ldm_uncached"])],
    }
    phase_median = {name: {p: statistics.median(s[p] for s in rows) for p in (*PHASES, "step")} for name, rows in steps.items()}
    data_share = {name: statistics.median(s["data"] / s["step"] for s in rows) for name, rows in steps.items()}
    cached, uncached = runners["train_ldm_cached"], runners["train_ldm_uncached"]
    saved_ms = phase_median["train_ldm_uncached"]["step"] - phase_median["train_ldm_cached"]["step"]
    ratio = med_sps["train_ldm_cached"] / med_sps["bare"]
    gap_ms = phase_median["train_ldm_cached"]["step"] - phase_median["bare"]["step"]
    extras = {p: phase_median["train_ldm_cached"][p] - phase_median["bare"][p] for p in (*PHASES, "step")}
    # What train_ldm adds around the shared work (UNet forward, loss + backward, AdamW): its expected cost.
    extra_ms = sum(extras[p] for p in PHASES if p not in ("forward", "loss_backward", "optimizer"))
    losses = {name: [r["loss"] for r in results[name]["history"]] for name in VARIANTS}
    summary = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "lscpu_model_name": lscpu_model(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "torch_threads_in_variant_threads": {n: runners[n].info.get("torch_threads_in_thread") for n in VARIANTS},
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "loadavg_1_5_15_min_at_start_and_end": [load_before, os.getloadavg()]},
        "settings": {"script": args.script, "config": args.config, "family": args.family, "dataset": str(dataset) if args.phantoms is None else f"built: {args.phantoms} phantom patients",
                     "frozen_from": args.frozen_from, "batch_size": batch_size, "warmup_steps": args.warmup, "rounds": args.rounds,
                     "steps_per_segment": args.steps, "total_steps_per_variant": total_steps, "quick": args.quick,
                     "round_orders": orders, "train_ldm_argv": argvs, "argv": sys.argv if argv is None else argv,
                     "unet_parameters": cached.info.get("unet_parameters"), "unet_parameter_tensors": cached.info.get("unet_parameter_tensors"),
                     "train_items_cached": cached.info.get("cache_items"),
                     "condition_tokens_median": {n: statistics.median(r.get("tokens", 0.0) for r in runners[n].records) for n in VARIANTS}},
        "bare_loop_omits": BARE_OMITS,
        "same_unet_init": {"uncached_vs_cached": same_state(uncached.info["unet_initial_state"], cached.info["unet_initial_state"]),
                           "bare_vs_cached": same_state(runners["bare"].info["unet_initial_state"], cached.info["unet_initial_state"])},
        "setup_seconds": setup_seconds,
        "cache_build_seconds": cached.info.get("cache_build_seconds"),
        "samples_per_s_median": med_sps,
        "samples_per_s_segments": segment_sps,
        "step_ms_median": {name: phase_median[name]["step"] for name in VARIANTS},
        "step_ms_all": {name: [s["step"] for s in rows] for name, rows in steps.items()},
        "phase_ms_median": phase_median,
        "data_loading_share_median": data_share,
        "ratio_cached_over_bare": ratio,
        "ratio_cached_over_bare_per_round": per_round["cached_over_bare"],
        "ratio_cached_over_bare_per_round_median": statistics.median(per_round["cached_over_bare"]),
        "speedup_cached_over_uncached": med_sps["train_ldm_cached"] / med_sps["train_ldm_uncached"],
        "speedup_cached_over_uncached_per_round": per_round["cached_over_uncached"],
        "cache_break_even_steps": (cached.info.get("cache_build_seconds", 0.0) * 1e3 / saved_ms) if saved_ms > 0 else None,
        "gap_cached_minus_bare_ms_per_step": gap_ms,
        "gap_by_phase_ms_median": extras,
        "train_ldm_extras_ms_per_step": extra_ms,
        "ratio_expected_from_extras": phase_median["bare"]["step"] / (phase_median["bare"]["step"] + extra_ms),
        "target_ratio_cached_over_bare": TARGET,
        "met": {"cached_over_bare>=0.9": ratio >= TARGET},
        "losses_finite": {name: all(v == v and abs(v) != float("inf") for v in vals) for name, vals in losses.items()},
    }
    print(f"{'variant':<20} {'samples/s':>10} {'step ms':>9} {'data share':>10}   " + " ".join(f"{p:>9.9}" for p in PHASES))
    for name in VARIANTS:
        print(f"{name:<20} {med_sps[name]:>10.2f} {phase_median[name]['step']:>9.1f} {data_share[name]:>10.3f}   "
              + " ".join(f"{phase_median[name][p]:>9.1f}" for p in PHASES))
    print(f"cached / bare = {ratio:.3f} (target >= {TARGET}; per-round median {summary['ratio_cached_over_bare_per_round_median']:.3f}); "
          f"cached / uncached = {summary['speedup_cached_over_uncached']:.2f}x; cache build {summary['cache_build_seconds']:.1f} s; "
          f"train_ldm extras {extra_ms:.1f} ms/step (expected ratio {summary['ratio_expected_from_extras']:.3f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
