"""Achieved FLOP/s of the xray UNet forward against this machine's measured fp32 matmul peak, same run.

    python benchmarks/unet_flops.py --threads 2 --repeats 7 --out runs/perf/unet_flops.json

FLOPs: one forward of the CFG batch the pipeline runs (batch 2, the xray UNet's 9 input channels at the
latent size, the prompt's tokens plus mask), counted with `torch.utils.flop_counter.FlopCounterMode` with
SDPA forced to the math backend so that attention is counted as its matmuls (the count is then used for
every variant: they all do the same arithmetic). Peak: the best of `--repeats` medians of a 1024x1024 @
1024x1024 fp32 matmul (2*1024^3 FLOPs) at the same thread count. Variants and the peak are timed
interleaved (round-robin over `--repeats` rounds, medians reported).

Variants: the default forward; channels_last (model and input); SDPA forced to its math backend; oneDNN
(`torch.backends.mkldnn`) disabled; channels_last with oneDNN disabled; `torch.compile` (inductor, default
mode, on a deep copy of the UNet; compiled before the rounds, the compile time reported; `--no-compile` skips
it, and a compile that fails is reported, not fatal); the default at 1 thread. Every variant's output is
compared with the default's (largest absolute difference), so a faster variant that computes something else
shows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.single_flow import Condition
from medm2g_diffusers.training_utils import atomic_write_text

PROMPT = "Large right pleural effusion. Heart size is normal."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medm2g-tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20, help="forwards per timing sample")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--out", default="runs/perf/unet_flops.json")
    return parser.parse_args()


def timed(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    pipe = MedM2GPipeline.from_pretrained(args.model)
    unet = pipe.multiflow.unets["xray"].eval()
    with torch.no_grad():
        cond = pipe.encode_prompt([PROMPT], 160)
        both = Condition.cat([cond.null(), cond])
    size = pipe.image_size // pipe.vae_scale_factor
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=torch.manual_seed(0))
    t = torch.tensor(500)

    def forward(x=sample):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=both.tokens, encoder_attention_mask=both.mask).sample

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        forward()
    flops = counter.get_total_flops()
    by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}

    a = torch.randn(1024, 1024, generator=torch.manual_seed(1))
    b = torch.randn(1024, 1024, generator=torch.manual_seed(2))
    matmul_flops = 2 * 1024**3

    sample_cl = sample.to(memory_format=torch.channels_last)
    n = args.threads

    # channels_last runs on its own copy of the UNet, so that no variant changes the model another one times.
    unet_cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)

    def forward_cl():
        with torch.no_grad():
            return unet_cl(sample_cl, t, encoder_hidden_states=both.tokens, encoder_attention_mask=both.mask).sample

    no_mkldnn = lambda: torch.backends.mkldnn.flags(enabled=False)
    variants = {
        f"default (contiguous, SDPA auto, {n} threads)": lambda: forward(),
        f"channels_last ({n} threads)": forward_cl,
        f"SDPA math backend ({n} threads)": lambda: _with(sdpa_kernel(SDPBackend.MATH), forward),
        f"mkldnn disabled ({n} threads)": lambda: _with(no_mkldnn(), forward),
        f"channels_last + mkldnn disabled ({n} threads)": lambda: _with(no_mkldnn(), forward_cl),
        "default, 1 thread": lambda: _with(threads(1), forward),
    }
    compile_info = None
    if not args.no_compile:
        compiled = torch.compile(copy.deepcopy(unet))

        def forward_compiled():
            with torch.no_grad():
                return compiled(sample, t, encoder_hidden_states=both.tokens, encoder_attention_mask=both.mask).sample

        started = time.perf_counter()
        try:
            forward_compiled()
            compile_info = {"ok": True, "compile_and_first_call_s": time.perf_counter() - started}
            variants[f"torch.compile, inductor ({n} threads)"] = forward_compiled
        except Exception as error:  # a missing compiler or an unsupported op: reported, the rest still runs
            compile_info = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:500]}"}
    with torch.no_grad():
        reference_out = forward()
        max_abs_diff = {name: float((fn() - reference_out).abs().max()) for name, fn in variants.items()}
    samples = {name: [] for name in variants}
    peak = {f"{n} threads": [], "1 thread": []}
    peak_fn = lambda: torch.mm(a, b)
    for _ in range(2):  # warm-up
        forward(); peak_fn()
    for _ in range(args.repeats):
        peak[f"{n} threads"].append(matmul_flops / timed(peak_fn, 5))
        with threads(1):
            peak["1 thread"].append(matmul_flops / timed(peak_fn, 3))
        for name, fn in variants.items():
            fn()
            samples[name].append(timed(fn, args.iters))
    peak_med = {k: statistics.median(v) for k, v in peak.items()}
    results = {}
    default_seconds = statistics.median(samples[f"default (contiguous, SDPA auto, {n} threads)"])
    for name, times in samples.items():
        seconds = statistics.median(times)
        reference = peak_med["1 thread"] if "1 thread" in name else peak_med[f"{n} threads"]
        results[name] = {
            "forward_ms_median": seconds * 1e3,
            "achieved_gflops": flops / seconds / 1e9,
            "peak_gflops_same_threads": reference / 1e9,
            "ratio_achieved_vs_peak": flops / seconds / reference,
            "speedup_vs_default": default_seconds / seconds,
            "max_abs_diff_vs_default": max_abs_diff[name],
            "forward_ms_all": [x * 1e3 for x in times],
        }
    summary = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "mkldnn_available": torch.backends.mkldnn.is_available()},
        "input": {"sample": list(sample.shape), "tokens": list(both.tokens.shape), "repeats": args.repeats, "iters": args.iters},
        "unet_forward_flops": flops,
        "flops_by_op": by_op,
        "peak_matmul_gflops_median": {k: v / 1e9 for k, v in peak_med.items()},
        "torch_compile": compile_info,
        "variants": results,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text + "\n")


def _with(ctx, fn):
    with ctx:
        return fn()


if __name__ == "__main__":
    main()
