"""Per-step overhead of `MedM2GPipeline` against a plain diffusers-style loop over the same xray UNet.

    python benchmarks/sampling_overhead.py --threads 2 --steps 20 --repeats 7 --out runs/perf/sampling_overhead.json

Method: per-step wall time is measured inside the denoising loop only. For the pipeline, a
`callback_on_step_end` records `time.perf_counter()` after every step; per step = (t[last] - t[first]) /
(steps - 1), so prompt encoding, noise preparation, VAE decode and postprocessing are excluded. The plain
loop records the same timestamps at the end of each of its steps (after `scheduler.step`). A and B are run
alternately `--repeats` times and the medians are compared.

The plain loop (B): same prompt tokens (`pipe.encode_prompt`, computed once), the null condition of the
pipeline, the xray UNet of `pipe.multiflow`, a deepcopy of `pipe.scheduler`, CFG with cond+uncond in one
batch, and the UNet's empty source slot (its `ct` slot: zero latent + zero presence mask) concatenated to the
input every step, as diffusers' inpainting pipelines do with their extra channels. No θ_c / cross-guided path.

Also checked (counted, not timed): during an image->image call (ct -> xray) the prompt encoder and the image
encoder run once per call, and the UNet runs exactly once per step (cond+uncond in one batch).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.single_flow import Condition

PROMPT = "Large right pleural effusion. Heart size is normal."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medm2g-tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--out", default="runs/perf/sampling_overhead.json")
    return parser.parse_args()


def per_step(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def pipeline_step_time(pipe, steps, guidance, targets, seed=0) -> float:
    stamps = []

    def callback(_pipe, _i, _t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    pipe(PROMPT, targets=targets, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
         generator=torch.manual_seed(seed), callback_on_step_end=callback)
    return per_step(stamps)


def plain_loop_step_time(pipe, steps, guidance, seed=0) -> float:
    """A StableDiffusionPipeline-style loop over the xray UNet (no multiflow wrapper)."""
    unet, vae = pipe.multiflow.unets["xray"], pipe.vae
    with torch.no_grad():
        cond = pipe.encode_prompt([PROMPT], 160)
        both = Condition.cat([cond.null(), cond])
        tokens, mask = both.tokens, both.mask
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(steps)
        size = pipe.image_size // pipe.vae_scale_factor
        latents = torch.randn((1, vae.config.latent_channels, size, size), generator=torch.manual_seed(seed)) * scheduler.init_noise_sigma
        extra = unet.config.in_channels - latents.shape[1]
        empty_slots = torch.zeros(2, extra, size, size)  # the xray UNet's ct source slot, absent
        stamps = []
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            model_input = torch.cat([model_input, empty_slots], dim=1)
            noise = unet(model_input, t, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample
            uncond, text = noise.chunk(2)
            noise = uncond + guidance * (text - uncond)
            latents = scheduler.step(noise, t, latents, eta=0.0).prev_sample
            stamps.append(time.perf_counter())
    return per_step(stamps)


def count_calls(pipe, steps, guidance) -> dict:
    """Wraps the encoders and hooks the UNets during an image->image (ct -> xray) call with a prompt too."""
    counts = {"prompt_encoders.encode": [], "encode_image": 0, "encode_prompt": 0, "vae.encode": 0, "unet_forward": {}, "unet_batch": {},
              "context_encoders": {}}
    originals = {}

    def wrap(obj, name, record):
        original = getattr(obj, name)
        originals[(id(obj), name)] = (obj, name, original)

        def wrapper(*args, **kwargs):
            record(args)
            return original(*args, **kwargs)

        setattr(obj, name, wrapper)

    wrap(pipe.prompt_encoders, "encode", lambda a: counts["prompt_encoders.encode"].append(a[0]))
    wrap(pipe, "encode_image", lambda a: counts.__setitem__("encode_image", counts["encode_image"] + 1))
    wrap(pipe, "encode_prompt", lambda a: counts.__setitem__("encode_prompt", counts["encode_prompt"] + 1))
    wrap(pipe.vae, "encode", lambda a: counts.__setitem__("vae.encode", counts["vae.encode"] + 1))
    hooks = []
    for family, unet in pipe.multiflow.unets.items():
        def hook(_m, args, kwargs, family=family):
            counts["unet_forward"][family] = counts["unet_forward"].get(family, 0) + 1
            counts["unet_batch"].setdefault(family, set()).add(int(args[0].shape[0]))
        hooks.append(unet.register_forward_pre_hook(hook, with_kwargs=True))
    for family, encoder in pipe.multiflow.context_encoders.items():
        def chook(_m, _a, family=family):
            counts["context_encoders"][family] = counts["context_encoders"].get(family, 0) + 1
        hooks.append(encoder.register_forward_pre_hook(chook))
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1000, (pipe.image_size, pipe.image_size)).astype(np.float32)
    try:
        pipe(PROMPT, conditions={"ct": ct}, targets=["xray"], num_inference_steps=steps, guidance_scale=guidance,
             output_type="latent", generator=torch.manual_seed(0))
    finally:
        for obj, name, _ in originals.values():
            delattr(obj, name) if name in vars(obj) else None
        for h in hooks:
            h.remove()
    result = {
        "call": f"prompt + conditions={{'ct'}} -> ['xray'], {steps} steps, guidance {guidance}",
        "prompt_encoders.encode_calls": len(counts["prompt_encoders.encode"]),
        "prompt_encoders.encode_families": counts["prompt_encoders.encode"],
        "encode_prompt_calls": counts["encode_prompt"],
        "encode_image_calls": counts["encode_image"],
        "vae.encode_calls": counts["vae.encode"],
        "unet_forward_calls": counts["unet_forward"],
        "unet_forward_calls_per_step": {k: v / steps for k, v in counts["unet_forward"].items()},
        "unet_batch_sizes": {k: sorted(v) for k, v in counts["unet_batch"].items()},
        "context_encoder_calls": counts["context_encoders"],
    }
    result["conditions_encoded_once_per_call"] = (
        result["prompt_encoders.encode_calls"] == 2 and result["encode_image_calls"] == 1 and result["vae.encode_calls"] == 1
    )
    result["cfg_one_unet_batch_per_step"] = result["unet_forward_calls_per_step"] == {"xray": 1.0} and result["unet_batch_sizes"] == {"xray": [2]}
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    pipe = MedM2GPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    joint = ["xray", "ct", "mri_t1"]
    # warm-up
    for _ in range(2):
        pipeline_step_time(pipe, args.steps, args.guidance, ["xray"])
        plain_loop_step_time(pipe, args.steps, args.guidance)
        pipeline_step_time(pipe, args.steps, args.guidance, joint)
    runs = {
        "pipeline_xray": lambda: pipeline_step_time(pipe, args.steps, args.guidance, ["xray"]),
        "plain_loop_xray": lambda: plain_loop_step_time(pipe, args.steps, args.guidance),
        "pipeline_joint": lambda: pipeline_step_time(pipe, args.steps, args.guidance, joint),
    }
    names = list(runs)
    times = {k: [] for k in names}
    for r in range(args.repeats):  # interleaved, order rotated every repeat (ABC, BCA, CAB, ...)
        for name in names[r % 3:] + names[: r % 3]:
            times[name].append(runs[name]())
    med = {k: statistics.median(v) for k, v in times.items()}
    # Diagnostic split (separate rounds, hooks on the xray UNet): per step, time inside the UNet forward and the rest.
    inside = {"t": 0.0, "n": 0}
    pre = pipe.multiflow.unets["xray"].register_forward_pre_hook(lambda *a: inside.__setitem__("s", time.perf_counter()))
    post = pipe.multiflow.unets["xray"].register_forward_hook(
        lambda *a: inside.update(t=inside["t"] + time.perf_counter() - inside["s"], n=inside["n"] + 1))
    split = {"pipeline_xray": [], "plain_loop_xray": []}
    for r in range(args.repeats):
        for name in (["pipeline_xray", "plain_loop_xray"] if r % 2 == 0 else ["plain_loop_xray", "pipeline_xray"]):
            inside.update(t=0.0, n=0)
            step = runs[name]()
            unet_ms = inside["t"] / inside["n"] * 1e3
            split[name].append({"step_ms": step * 1e3, "unet_ms": unet_ms, "outside_unet_ms": step * 1e3 - unet_ms})
    pre.remove(); post.remove()
    split_med = {name: {k: statistics.median(row[k] for row in rows) for k in rows[0]} for name, rows in split.items()}
    summary = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "settings": {"model": args.model, "steps": args.steps, "repeats": args.repeats, "guidance_scale": args.guidance,
                     "method": "callback_on_step_end timestamps, (t_last - t_first) / (steps - 1); median over interleaved repeats"},
        "per_step_ms_median": {k: v * 1e3 for k, v in med.items()},
        "per_step_ms_all": {k: [x * 1e3 for x in v] for k, v in times.items()},
        "per_step_ms_min": {k: min(v) * 1e3 for k, v in times.items()},
        "ratio_pipeline_vs_plain_loop": med["pipeline_xray"] / med["plain_loop_xray"],
        "ratio_pipeline_vs_plain_loop_of_minima": min(times["pipeline_xray"]) / min(times["plain_loop_xray"]),
        "ratio_joint3_vs_one_target_of_minima": min(times["pipeline_joint"]) / min(times["pipeline_xray"]),
        "target_ratio_pipeline_vs_plain_loop": 1.05,
        "split_with_unet_hooks_ms_median": split_med,
        "ratio_pipeline_vs_plain_loop_in_split_rounds": split_med["pipeline_xray"]["step_ms"] / split_med["plain_loop_xray"]["step_ms"],
        "ratio_joint3_vs_one_target": med["pipeline_joint"] / med["pipeline_xray"],
        "target_ratio_joint3_vs_one_target": 3.15,
        "checks": count_calls(pipe, args.steps, args.guidance),
    }
    summary["met"] = {
        "pipeline_vs_plain_loop<=1.05": summary["ratio_pipeline_vs_plain_loop"] <= 1.05,
        "joint3_vs_one<=3.15": summary["ratio_joint3_vs_one_target"] <= 3.15,
        "conditions_encoded_once_per_call": summary["checks"]["conditions_encoded_once_per_call"],
        "cfg_one_unet_batch_per_step": summary["checks"]["cfg_one_unet_batch_per_step"],
    }
    text = json.dumps(summary, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
