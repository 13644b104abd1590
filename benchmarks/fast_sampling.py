"""Fewer steps at equal quality: DPM-Solver++ (ODE and SDE) and UniPC at 20 steps against DDIM at 50 (docs/performance.md §2).

Two measurements in one run:

1. **Quality.** The phantom benchmark (``medm2g evaluate``'s :func:`run_benchmark`, default tasks: X-ray ->
   report, text -> image, image -> image) once per sampler variant, on the same held-out rows, prompts and
   initial noise. DDIM at 50 steps is run at several sampling seeds: their spread is the noise a sampler
   change is judged against. A variant is *worse beyond noise* on a metric when it is worse than the DDIM
   mean by more than two prediction-interval standard deviations, ``2 * sd * sqrt(1 + 1/k)`` over the ``k``
   DDIM seeds (a new DDIM seed would land inside that band about 90% of the time at k=3: wide, because three
   seeds estimate the spread roughly; the table quotes every value so a reader can judge).
2. **Wall time.** Whole pipeline calls (prompt or condition encoding, the denoising loop and the VAE / text
   decode, ``output_type="np"``) of each variant, interleaved, the order rotated every repeat, medians. Timed
   calls: text -> X-ray and X-ray -> report, batch ``--timing-batch``, guidance 2.0. The ratio is DDIM-50 time
   over the variant's time (target >= 2.3). Each call is also timed with ``output_type="latent"`` (encoding and
   the denoising loop, no decode): the report's decode is autoregressive and does not depend on the sampler.

Per-variant benchmark JSON goes to ``OUT/<label>.json`` (an existing one is reused with ``--resume``, so a long
run can be continued), the comparison to ``OUT/fast_sampling.json`` and ``OUT/fast_sampling.md``.

Variants are ``LABEL=SCHEDULER:STEPS[:SPACING]`` (schedulers: :data:`medm2g_diffusers.schedulers.SCHEDULERS`,
spacing: ``leading``/``linspace``/``trailing``, default the checkpoint's), all sampled at ``--seed``; the
reference is DDIM at ``--reference-steps`` for ``--seed`` and each ``--noise-seeds``.

    .venv/bin/python benchmarks/fast_sampling.py --threads 1 --skip-timing --out runs/perf/fast_sampling   # quality
    .venv/bin/python benchmarks/fast_sampling.py --threads 1 --resume --out runs/perf/fast_sampling        # + timing
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from medm2g_diffusers.evaluation.benchmark import BenchmarkConfig, parse_translation, run_benchmark, save_results
from medm2g_diffusers.pipelines import MedM2GPipeline
from medm2g_diffusers.schedulers import SCHEDULERS, TIMESTEP_SPACINGS, scheduler_from_name
from medm2g_diffusers.training_utils import atomic_write_text

DEFAULT_VARIANTS = (
    "dpmsolver++20=dpmsolver++:20",
    "unipc20=unipc:20",
    "dpmsolver++20_trailing=dpmsolver++:20:trailing",
    "sde-dpmsolver++20=sde-dpmsolver++:20",
    "ddim20=ddim:20",
)
DEFAULT_TASKS = ("report_generation", "text_to_image", "image_to_image")
# A subset of the benchmark's targets and translations: one of each kind of image (X-ray, CT, MRI), so that the
# three DDIM reference seeds and four variants fit in about an hour on one core.
DEFAULT_TEXT_TO_IMAGE_TARGETS = ("xray", "ct")
DEFAULT_TRANSLATIONS = ("mri_t1->ct", "ct->xray", "mri_t1+mri_t2->mri_flair")
TIMING_PROMPT = "FINDINGS: The heart is enlarged. Small left pleural effusion. IMPRESSION: Cardiomegaly with a small effusion."


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    scheduler: str
    steps: int
    spacing: str | None = None
    seed: int = 0


def parse_variant(text: str) -> Variant:
    label, sep, spec = text.partition("=")
    parts = spec.split(":")
    if not sep or not label or len(parts) not in (2, 3) or parts[0] not in SCHEDULERS or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"expected LABEL=SCHEDULER:STEPS[:SPACING] with a scheduler of {sorted(SCHEDULERS)}; got {text!r}")
    spacing = parts[2] if len(parts) == 3 else None
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        raise argparse.ArgumentTypeError(f"spacing must be one of {list(TIMESTEP_SPACINGS)}; got {spacing!r}")
    return Variant(label, parts[0], int(parts[1]), spacing)


def use(pipe: MedM2GPipeline, variant: Variant, base_config) -> None:
    pipe.scheduler = scheduler_from_name(variant.scheduler, base_config, variant.spacing)


# ------------------------------------------------------------------------------------------------ metrics


def flat_metrics(results: dict, label: str) -> dict[str, tuple[float, bool]]:
    """``{metric: (value, higher_is_better)}`` of one pipeline in a benchmark JSON."""
    out: dict[str, tuple[float, bool]] = {}
    report = results.get("report_generation", {}).get(label)
    if report:
        for key in ("bleu_1", "bleu_4", "rouge_l"):
            out[f"report/{key}"] = (report[key], True)
        if "finding" in report:
            out["report/finding_micro_f1"] = (report["finding"]["micro_f1"], True)
    for target, entry in results.get("text_to_image", {}).items():
        scores = entry.get(label)
        if not scores:
            continue
        if "fid" in scores:
            out[f"text_to_image/{target}/fid"] = (scores["fid"]["fid"], False)
        out[f"text_to_image/{target}/ms_ssim_diversity"] = (scores["ms_ssim_diversity"]["ms_ssim"], False)
        if "finding" in scores:
            out[f"text_to_image/{target}/finding_macro_f1"] = (scores["finding"]["macro_f1"], True)
            out[f"text_to_image/{target}/finding_exact"] = (scores["finding"]["exact_set_accuracy"], True)
    for task, entry in results.get("image_to_image", {}).items():
        scores = entry.get(label)
        if scores:
            out[f"image_to_image/{task}/psnr"] = (scores["psnr_mean"], True)
            out[f"image_to_image/{task}/ssim"] = (scores["ssim_mean"], True)
    return out


def compare(reference: list[dict], variants: dict[str, dict]) -> dict:
    """Each variant's metrics against the DDIM seeds' mean and prediction band (see the module docstring)."""
    k = len(reference)
    rows = {}
    for metric, (_, higher) in reference[0].items():
        values = [r[metric][0] for r in reference if metric in r]
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        band = 2 * sd * math.sqrt(1 + 1 / len(values))
        row = {"higher_is_better": higher, "ddim_seeds": values, "ddim_mean": mean, "ddim_sd": sd, "band": band, "variants": {}}
        for label, metrics in variants.items():
            if metric not in metrics:
                continue
            value = metrics[metric][0]
            worse_by = (mean - value) if higher else (value - mean)
            verdict = "better" if worse_by < 0 else ("within noise" if worse_by <= band else "worse beyond noise")
            row["variants"][label] = {"value": value, "delta": value - mean, "verdict": verdict}
        rows[metric] = row
    summary = {label: {"worse_beyond_noise": [m for m, r in rows.items() if r["variants"].get(label, {}).get("verdict") == "worse beyond noise"],
                       "metrics": sum(label in r["variants"] for r in rows.values())}
               for label in variants}
    return {"k_reference_seeds": k, "metrics": rows, "summary": summary}


# ------------------------------------------------------------------------------------------------- timing


def time_calls(pipe: MedM2GPipeline, variants: list[Variant], base_config, batch: int, repeats: int) -> dict:
    """Median wall seconds of whole calls per variant and task, interleaved with the order rotated."""
    # An X-ray condition in native units ([0, 1]), made once: only its shape matters for the time.
    xray = pipe(prompt=[TIMING_PROMPT] * batch, targets=["xray"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np").images["xray"]
    xray = torch.from_numpy(np.ascontiguousarray(xray)).reshape(batch, 1, *xray.shape[-2:])
    tasks = {
        "text -> xray": dict(prompt=[TIMING_PROMPT] * batch, targets=["xray"]),
        "xray -> report": dict(conditions={"xray": xray}, targets=["text"]),
    }
    names = [f"{task} ({kind})" for task in tasks for kind in ("whole call", "no decode")]
    times: dict[str, dict[str, list[float]]] = {name: {v.label: [] for v in variants} for name in names}
    for repeat in range(repeats + 1):  # repeat 0 warms up and is dropped
        order = variants[repeat % len(variants):] + variants[:repeat % len(variants)]
        for variant in order:
            use(pipe, variant, base_config)
            for task, kwargs in tasks.items():
                for kind, output_type in (("whole call", "np"), ("no decode", "latent")):
                    started = time.perf_counter()
                    pipe(**kwargs, num_inference_steps=variant.steps, guidance_scale=2.0, generator=torch.Generator().manual_seed(repeat),
                         output_type=output_type)
                    if repeat:
                        times[f"{task} ({kind})"][variant.label].append(time.perf_counter() - started)
    return {task: {label: {"median_s": statistics.median(v), "min_s": min(v), "all_s": v} for label, v in per.items()}
            for task, per in times.items()}


# -------------------------------------------------------------------------------------------------- report


def markdown(comparison: dict, timing: dict, reference_label: str, fast: list[Variant], args: argparse.Namespace) -> str:
    labels = [v.label for v in fast]
    lines = [f"Reference: DDIM at {args.reference_steps} steps, seeds {[args.seed, *args.noise_seeds]}; variants at seed {args.seed}.", ""]
    lines += ["| metric | DDIM seeds | DDIM mean ± band | " + " | ".join(labels) + " |", "| --- | --- | --- |" + " --- |" * len(labels)]
    for metric, row in comparison["metrics"].items():
        arrow = "↑" if row["higher_is_better"] else "↓"
        cells = []
        for label in labels:
            entry = row["variants"].get(label)
            mark = {"better": "", "within noise": "", "worse beyond noise": " **(worse)**"}[entry["verdict"]] if entry else ""
            cells.append(f"{entry['value']:.3f}{mark}" if entry else "-")
        seeds = ", ".join(f"{v:.3f}" for v in row["ddim_seeds"])
        lines.append(f"| {metric} {arrow} | {seeds} | {row['ddim_mean']:.3f} ± {row['band']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | metrics | worse beyond noise |", "| --- | --- | --- |"]
    for label in labels:
        s = comparison["summary"][label]
        lines.append(f"| {label} | {s['metrics']} | {len(s['worse_beyond_noise'])}: {', '.join(s['worse_beyond_noise']) or '-'} |")
    if not timing:
        return "\n".join(lines) + "\n"
    lines += ["", f"Wall time of whole calls (batch {args.timing_batch}, medians of {args.timing_repeats} interleaved repeats):", "",
              "| task | " + " | ".join([reference_label, *labels]) + " |", "| --- |" + " --- |" * (len(labels) + 1)]
    for task, per in timing.items():
        ref = per[reference_label]["median_s"]
        cells = [f"{per[reference_label]['median_s']:.2f} s"] + [f"{per[l]['median_s']:.2f} s ({ref / per[l]['median_s']:.2f}x)" for l in labels]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/medm2g-tiny")
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=[parse_variant(v) for v in DEFAULT_VARIANTS])
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of every variant and of the first DDIM run")
    parser.add_argument("--noise-seeds", type=int, nargs="+", default=[1, 2], help="further DDIM seeds: the noise band")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--text-to-image-targets", nargs="+", default=list(DEFAULT_TEXT_TO_IMAGE_TARGETS))
    parser.add_argument("--translations", nargs="+", default=list(DEFAULT_TRANSLATIONS), metavar="SOURCES->TARGET")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-batch", type=int, default=8)
    parser.add_argument("--timing-repeats", type=int, default=7)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--resume", action="store_true", help="reuse OUT/<label>.json of variants already scored")
    parser.add_argument("--quick", action="store_true", help="BenchmarkConfig.quick() sizes: checks the machinery, not the samplers")
    parser.add_argument("--out", default="runs/perf/fast_sampling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe = MedM2GPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    reference = [Variant(f"ddim{args.reference_steps}_seed{s}", "ddim", args.reference_steps, None, s) for s in [args.seed, *args.noise_seeds]]
    fast = [dataclasses.replace(v, seed=args.seed) for v in args.variants]
    base_cfg = dataclasses.replace(BenchmarkConfig.quick() if args.quick else BenchmarkConfig(),
                                   text_to_image_targets=tuple(args.text_to_image_targets))
    translations = [parse_translation(t) for t in args.translations]

    scored: dict[str, dict] = {}
    for variant in reference + fast:
        path = out / f"{variant.label}.json"
        if args.resume and path.exists():
            scored[variant.label] = json.loads(path.read_text())
            continue
        use(pipe, variant, base_config)
        cfg = dataclasses.replace(base_cfg, num_inference_steps=variant.steps, seed=variant.seed)
        started = time.perf_counter()
        results = run_benchmark(pipe, variant.label, cfg, classifier_cache=out / "finding_classifiers", tasks=args.tasks,
                                translations=translations, log=lambda m, v=variant: print(f"[{v.label}] {m}", flush=True))
        results["sampler"] = {**dataclasses.asdict(variant), "scheduler_config": dict(pipe.scheduler.config)}
        save_results(results, path)
        scored[variant.label] = json.loads(path.read_text())
        print(f"[{variant.label}] scored in {time.perf_counter() - started:.0f} s", flush=True)

    comparison = compare([flat_metrics(scored[v.label], v.label) for v in reference],
                         {v.label: flat_metrics(scored[v.label], v.label) for v in fast})
    timing = {} if args.skip_timing else time_calls(pipe, [reference[0], *fast], base_config, args.timing_batch, args.timing_repeats)
    payload = {
        "arguments": {k: (v if not isinstance(v, list) or not v or not isinstance(v[0], Variant) else [dataclasses.asdict(x) for x in v])
                      for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "reference": [dataclasses.asdict(v) for v in reference],
        "variants": [dataclasses.asdict(v) for v in fast],
        "comparison": comparison,
        "timing": timing,
        "speedup": {task: {v.label: per[reference[0].label]["median_s"] / per[v.label]["median_s"] for v in fast}
                    for task, per in timing.items()},
    }
    atomic_write_text(out / "fast_sampling.json", json.dumps(payload, indent=2, default=float) + "\n")
    table = markdown(comparison, timing, reference[0].label, fast, args)
    atomic_write_text(out / "fast_sampling.md", table)
    print(table)
    print(f"wrote {out / 'fast_sampling.json'} and {out / 'fast_sampling.md'}")


if __name__ == "__main__":
    main()
