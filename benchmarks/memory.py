"""Peak memory (RSS) of a text -> X-ray call, with the whole pipeline loaded and with only what the call needs.

    python benchmarks/memory.py --threads 1 --out runs/perf/memory.json

Cases, each run in a fresh Python subprocess (same interpreter, same imports, same thread count):

* ``tiny_full`` / ``tiny_lazy``: the bundled ``medm2g-tiny`` (fp16 on disk, loaded as fp32, as users load it),
  ``MedM2GPipeline.from_pretrained("medm2g-tiny")`` vs ``from_pretrained(..., targets=["xray"],
  conditions=["text"])``;
* ``base_full`` / ``base_lazy``: the same two loads of a pipeline at ``training/configs/base.yaml`` sizes with
  random weights (see :func:`build_random_pipeline`), stored in float16 like the bundled checkpoint and loaded
  with ``dtype=torch.bfloat16`` (the base config's precision; every loaded tensor is cast, so it is copied into
  the process's own memory, as the default fp16 -> fp32 load of ``medm2g-tiny`` does);
* ``base_fp16_full`` / ``base_fp16_lazy``: the same, loaded with ``dtype=torch.float16``, the stored dtype. With no
  cast, safetensors hands out tensors backed by the mapped file, so only the pages a call touches become resident.

In each: import torch and the package, load, run ``pipe(prompt, targets=["xray"])`` (``--steps`` DDIM steps,
guidance ``--guidance``, batch 1, ``output_type="np"``). Reported: the kernel's peak resident set ``VmHWM`` from
``/proc/self/status`` at the end (anonymous memory plus the pages of mapped files such as safetensors being
read), ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` as a cross-check, ``VmRSS`` after the imports and after
loading, and the parameters the pipeline holds. The ratio lazy / full is given for the peak and for the peak
above the post-import baseline (the interpreter, torch and the package, the same in every case), and for the
bytes of parameters held (what ``pipe.to("cuda")`` would allocate on a GPU).

Base weights: every component is built with the training scripts' own code from the YAML sizes (tokenizer trained
on phantom reports with the config's vocabulary size; `train_alignment.build_model`; the `AutoencoderKL` and
`MedM2GTextVAE` of `train_autoencoders`; `train_ldm.build_unet` per family; `train_multiflow.build_model`, built
with empty weights for its config, then instantiated with random values), built in float16 (the dtype each case
loads in is its own) and saved once with ``save_pretrained(max_shard_size="1GB")`` into ``--base-dir`` (reused
when it holds a finished save) or a temporary folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Large right pleural effusion. Heart size is normal."
LAZY = {"targets": ["xray"], "conditions": ["text"]}
# case -> (model, dtype to load in or None for the default, lazy)
CASES = {
    "tiny_full": ("medm2g-tiny", None, False),
    "tiny_lazy": ("medm2g-tiny", None, True),
    "base_full": ("base", "bfloat16", False),
    "base_lazy": ("base", "bfloat16", True),
    "base_fp16_full": ("base", "float16", False),
    "base_fp16_lazy": ("base", "float16", True),
}
RESULT_MARKER = "MEMORY_RESULT "


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps of the call (memory does not grow with them)")
    parser.add_argument("--guidance", type=float, default=2.0, help="2.0: the CFG batch of 2 a default call runs")
    parser.add_argument("--config", default=str(ROOT / "training" / "configs" / "base.yaml"))
    parser.add_argument("--base-dir", default=None, help="where the random base pipeline is saved (reused if complete)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="runs/perf/memory.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one case, as JSON
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: build the base pipeline here
    return parser.parse_args()


# ------------------------------------------------------------------------------------- base pipeline


def load_training_script(name: str) -> ModuleType:
    """``training/<name>.py`` as a module (the stage scripts are plain scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules while the script executes
    spec.loader.exec_module(module)
    return module


def build_random_pipeline(config_path: str | os.PathLike, dtype=None, reports: int = 400):
    r"""
    A `MedM2GPipeline` with every component at the sizes of a training config, random weights.

    Each component is built as its training stage builds it (the docstring above lists the functions). The
    multi-flow model is first built with empty (meta) weights by ``train_multiflow.build_model`` from empty
    single-flow denoisers, which gives its exact config (source slots, context encoders) without holding the
    denoisers twice, and is then instantiated from that config with random values (θ_c included, not zeros).

    Args:
        config_path (`str` or `os.PathLike`): a training YAML, e.g. ``training/configs/base.yaml``.
        dtype (`torch.dtype`, *optional*): the dtype every module is built in (default: float32).
        reports (`int`, defaults to 400): phantom reports the tokenizer is trained on.

    Returns:
        `MedM2GPipeline` on the CPU, in eval mode.
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from medm2g_diffusers import MedM2GPipeline
    from medm2g_diffusers.data.phantoms import PhantomGenerator
    from medm2g_diffusers.models import MedM2GMultiFlowModel, MedM2GTextVAE
    from medm2g_diffusers.single_flow import make_sampling_scheduler
    from medm2g_diffusers.tokenizer import train_report_tokenizer
    from medm2g_diffusers.training_utils import load_config, stage_config

    config = load_config(config_path)
    size = config["data"]["size"]
    tokenizer_cfg = config["tokenizer"]
    tokenizer = train_report_tokenizer(
        [PhantomGenerator(seed=0, size=64).patient(i).report for i in range(reports)],
        vocab_size=tokenizer_cfg["vocab_size"], min_frequency=tokenizer_cfg["min_frequency"],
        model_max_length=tokenizer_cfg["model_max_length"],
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        torch.manual_seed(0)
        prompt_encoders = load_training_script("train_alignment").build_model(stage_config(config, "alignment"), tokenizer, size)
        vae_model = stage_config(config, "image_vae")["model"]
        blocks = len(vae_model["block_out_channels"])
        vae = AutoencoderKL(  # as train_autoencoders.train_image_vae builds it
            in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=size, **vae_model,
        )
        text_vae = MedM2GTextVAE(  # as train_autoencoders.train_text_vae builds it
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, max_position_embeddings=tokenizer.model_max_length,
            **stage_config(config, "text_vae")["model"],
        )
        components = {"prompt_encoders": prompt_encoders, "vae": vae, "text_vae": text_vae}
        ldm, multiflow_cfg = stage_config(config, "ldm"), stage_config(config, "multiflow")
        build_unet = load_training_script("train_ldm").build_unet
        with init_empty_weights():
            unets = {}
            for family in multiflow_cfg["families"]:
                family_cfg = {**ldm, **ldm.get("families", {}).get(family, {})}
                unets[family] = build_unet(family, family_cfg, components, size)
            empty = load_training_script("train_multiflow").build_model(multiflow_cfg, unets, multiflow_cfg["image_conditioning"])
        multiflow = MedM2GMultiFlowModel.from_config(empty.config)
    finally:
        torch.set_default_dtype(default_dtype)
    scheduler = make_sampling_scheduler(ldm.get("prediction_type", "epsilon"))
    pipe = MedM2GPipeline(multiflow=multiflow.eval(), vae=vae.eval(), text_vae=text_vae.eval(),
                          prompt_encoders=prompt_encoders.eval(), tokenizer=tokenizer, scheduler=scheduler)
    return pipe


def build(out_dir: str) -> None:
    """Child: builds the random base pipeline in float16 and saves it atomically (a finished save has model_index.json)."""
    import torch

    from medm2g_diffusers.training_utils import atomic_save_pretrained

    args = parse_args()
    pipe = build_random_pipeline(args.config, dtype=torch.float16)
    # 1 GB shards: safetensors copies a shard into one buffer while writing it, so this bounds the extra memory.
    atomic_save_pretrained(pipe, out_dir, max_shard_size="1GB")


# --------------------------------------------------------------------------------------------- cases


def memory_status() -> dict[str, float]:
    """VmHWM (peak resident set), VmRSS, RssAnon and RssFile of this process, in MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return values


def run_case(case: dict) -> dict:
    """Child: one load and one text -> X-ray call; memory at each stage."""
    import numpy as np
    import torch

    from medm2g_diffusers import MedM2GPipeline

    torch.set_num_threads(case["threads"])
    stages = {"after_import": memory_status()}
    kwargs = dict(LAZY) if case["lazy"] else {}
    if case["dtype"] is not None:
        kwargs["dtype"] = getattr(torch, case["dtype"])
    started = time.perf_counter()
    pipe = MedM2GPipeline.from_pretrained(case["model"], **kwargs)
    load_seconds = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)
    stages["after_load"] = memory_status()
    modules = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    held = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    held_bytes = sum(p.numel() * p.element_size() for module in modules.values() for p in module.parameters())
    image = pipe(PROMPT, targets=["xray"], num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                 generator=torch.manual_seed(0), output_type="np").images["xray"]
    stages["after_call"] = memory_status()
    return {
        "case": case,
        "peak_rss_mib": stages["after_call"]["VmHWM"],
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # kB on Linux
        "peak_above_import_mib": stages["after_call"]["VmHWM"] - stages["after_import"]["VmRSS"],
        "stages_mib": stages,
        "parameters": held,
        "denoiser_parameters": {family: sum(p.numel() for p in unet.parameters()) for family, unet in pipe.multiflow.unets.items()},
        "parameters_total": sum(held.values()),
        "parameter_mib": held_bytes / 2**20,
        "weights_dtype": str(next(iter(modules["multiflow"].parameters())).dtype),
        "loaded": {"denoisers": list(pipe.multiflow.unets), "context_encoders": list(pipe.multiflow.context_encoders),
                   "prompt_encoders": pipe.prompt_encoders.families, "text_vae": pipe.text_vae is not None},
        "image_shape": list(image.shape), "image_finite": bool(np.isfinite(image).all()),
        "load_seconds": load_seconds,  # context only: the machine is shared, this is not a speed figure
    }


def spawn(argv: list[str]) -> dict | None:
    """Runs this script in a fresh interpreter; the child's last ``MEMORY_RESULT`` line, parsed (None for a build)."""
    completed = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    return json.loads(lines[-1][len(RESULT_MARKER):]) if lines else None


def main() -> None:
    args = parse_args()
    if args.build is not None:
        build(args.build)
        return
    if args.child is not None:
        print(RESULT_MARKER + json.dumps(run_case(json.loads(args.child))), flush=True)
        return
    results, base_seconds = {}, None
    with tempfile.TemporaryDirectory(prefix="medm2g-base-random-") as tmp:
        base_dir = Path(args.base_dir) if args.base_dir else Path(tmp) / "pipeline"
        if any(case.startswith("base") for case in args.cases) and not (base_dir / "model_index.json").is_file():
            started = time.perf_counter()
            spawn(["--build", str(base_dir), "--config", args.config])
            base_seconds = time.perf_counter() - started
        for name in args.cases:
            model, dtype, lazy = CASES[name]
            case = {"name": name, "model": str(base_dir) if model == "base" else model, "dtype": dtype, "lazy": lazy,
                    "threads": args.threads, "steps": args.steps, "guidance": args.guidance}
            results[name] = spawn(["--child", json.dumps(case)])
            print(f"{name}: peak {results[name]['peak_rss_mib']:.0f} MiB, {results[name]['parameters_total']:,} parameters", flush=True)
    ratios = {}
    for pair in ("tiny", "base", "base_fp16"):
        full, lazy = results.get(f"{pair}_full"), results.get(f"{pair}_lazy")
        if full and lazy:
            ratios[pair] = {
                "peak_lazy_over_full": lazy["peak_rss_mib"] / full["peak_rss_mib"],
                "peak_above_import_lazy_over_full": lazy["peak_above_import_mib"] / full["peak_above_import_mib"],
                "parameters_lazy_over_full": lazy["parameters_total"] / full["parameters_total"],
                "parameter_bytes_lazy_over_full": lazy["parameter_mib"] / full["parameter_mib"],
            }
    summary = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "memory_total_mib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "threads": args.threads},
        "settings": {"prompt": PROMPT, "lazy_kwargs": LAZY, "steps": args.steps, "guidance_scale": args.guidance,
                     "config": args.config, "base_weights": "random, float16, saved with max_shard_size=1GB",
                     "base_build_seconds": base_seconds},
        "results": results,
        "ratios": ratios,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from medm2g_diffusers.training_utils import atomic_write_text

    atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
