"""Stage 1 cost: central (text-as-hub) vs pairwise alignment of the four prompt encoders, side by side.

    OMP_NUM_THREADS=1 python benchmarks/alignment_cost.py --threads 1 --repeats 7 --steps-per-block 4 --e2e-steps 40 --out runs/perf/alignment_cost.json

What is timed is what ``training/train_alignment.py`` runs: the script is imported as a module and its own
``build_model`` / ``build_rounds`` / ``set_trainable`` / ``AlignmentData`` / ``alignment_step`` build and run the
steps, with the optimizer, LR scheduler and ``Accelerator`` set up as its ``main()`` sets them up
(channels_last model, AdamW with a text and an image parameter group, gradient clipping). One timed step is
the body of ``main()``'s training loop between its two ``time.perf_counter()`` calls: the step's generator,
``alignment_step`` (reading the batch's images, tokenising the reports, augmenting, every encoder forward,
InfoNCE + Barlow Twins), ``accelerator.backward``, ``clip_grad_norm_``, ``optimizer.step``,
``lr_scheduler.step`` and ``zero_grad``; the split into those three phases is recorded too.

Variants (``--vi both``: each with and without the visual-invariant loss, i.e. ``--no-vi``): every round of the
config's central schedule (``alignment.rounds``: tiny.yaml has ``hub`` = text-xray, text-ct, text-mri with all
four encoders trainable, then ``ct_mri`` with only ct and mri trainable) and the ``--pairwise`` round (all six
pairs of text, xray, ct, mri, everything trainable), as ``build_rounds`` defines them. Every variant runs on
ONE model and optimizer (``set_trainable`` switches the round's trainable families, as the script does at a
round change) and on the SAME batches: block ``r`` of every variant uses steps ``r*B .. r*B+B-1`` of the
run's ``StepBatchSampler`` and ``step_generator`` (same patients, same MRI contrast, same augmentations).
Blocks are interleaved, the variants' order rotated every repeat; the first ``--warmup-steps`` steps of every
block (just after the switch) are not counted. Per variant: the median over all counted steps, every step,
and the per-block medians.

Equal budget, as ``build_rounds`` defines it: the same total number of optimizer steps (tiny.yaml: 1,000) with
the same ``train_batch_size`` (64 patients) and the same encoders; central splits it into its rounds (800 hub +
200 ct_mri), pairwise spends all of it on its one round. The whole-run time implied for that budget is
``sum over rounds of steps x median step time``; the ratio pairwise / central is reported with and without VI,
also per repeat (from the block medians of the same repeat, a paired estimate).

Counted (one untimed pass over the first blocks' batches): encoder forwards per step (by family, with or
without grad, rows encoded), InfoNCE and Barlow Twins terms per step, and trainable parameters. The growth with
the number of modalities ``n`` is an ANALYTIC extrapolation (labelled so in the JSON): central needs ``n - 1``
InfoNCE pairs, pairwise ``n(n-1)/2``; with ``train_alignment``'s one-encode-per-family step both encode every
family once per step, and a per-pair-encoding implementation would run ``2(n-1)`` vs ``n(n-1)`` encoder
forwards. The per-step times for ``n != 4`` come from a cost model (see ``cost_model``): each encoded family
costs the mean per-family share of the measured ``hub`` step, each InfoNCE term its separately timed cost
(fwd + bwd); the model's prediction of the measured pairwise step is reported as its check.

End to end (``--e2e-steps N`` > 0): ``train_alignment.main()`` (in a fresh subprocess per run, exactly the
script with ``--max_train_steps N`` and, for the other scheme, ``--pairwise``), central and pairwise in ABBA
order (``--e2e-repeats`` runs of each), each with its own output root in ``--workdir`` and the same tokenizer.
Reported: the script's own ``train_wall_time_s`` (its training loop only), the subprocess's wall time (start-up,
data, validation and saving included), the prediction of the per-step medians for the same schedule, and the
validation retrieval the script logs (after N steps: not a quality comparison).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_alignment.py"
# Runs train_alignment.main() in a fresh process and writes what it returns (the script itself prints nothing
# of its timing); argv: script path, result path, then the script's own arguments.
CHILD = """import importlib.util, json, sys, time
import torch
spec = importlib.util.spec_from_file_location("train_alignment", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules["train_alignment"] = module
spec.loader.exec_module(module)
started = time.perf_counter()
result = module.main(sys.argv[3:])
with open(sys.argv[2], "w") as handle:
    json.dump({"train_wall_time_s": result["train_wall_time_s"], "main_wall_time_s": time.perf_counter() - started,
               "steps": len(result["losses"]), "final_loss": result["losses"][max(result["losses"])],
               "torch_threads": torch.get_num_threads(), "validation": result["validation"]}, handle)
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "training" / "configs" / "tiny.yaml"))
    parser.add_argument("--dataset", default=None, help="default: the config's data.dataset")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override (every variant)")
    parser.add_argument("--tokenizer", default=None,
                        help="report tokenizer folder (default: <output_root>/tokenizer if it exists, else trained once into --workdir)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (run with OMP_NUM_THREADS to match)")
    parser.add_argument("--vi", choices=("both", "on", "off"), default="both", help="variants with the VI loss, without (--no-vi), or both")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved blocks per variant")
    parser.add_argument("--steps-per-block", type=int, default=4, help="counted steps per block")
    parser.add_argument("--warmup-steps", type=int, default=1, help="uncounted steps at the start of every block")
    parser.add_argument("--nce-repeats", type=int, default=200, help="timed InfoNCE fwd+bwd calls (for the n-modality model)")
    parser.add_argument("--e2e-steps", type=int, default=0, help="steps of each end-to-end train_alignment run (0: skip)")
    parser.add_argument("--e2e-repeats", type=int, default=1, help="end-to-end runs per scheme (order ABBA...)")
    parser.add_argument("--workdir", default=None, help="end-to-end runs and a trained tokenizer go here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="smoke setting: 2 repeats of 1 step, 1 warm-up, 5 InfoNCE calls")
    parser.add_argument("--out", default="runs/perf/alignment_cost.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps_per_block, args.warmup_steps, args.nce_repeats = 2, 1, 1, 5
    for name in ("repeats", "steps_per_block", "nce_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup_steps < 0 or args.e2e_steps < 0 or args.e2e_repeats < 1:
        parser.error("--warmup-steps and --e2e-steps must be >= 0, --e2e-repeats >= 1")
    return args


def load_training_script(path: Path = SCRIPT) -> ModuleType:
    """``training/train_alignment.py`` as a module (the stage scripts are plain files, not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def machine() -> dict:
    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "cpu_model": model_name, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_at_start": load, "cuda": torch.cuda.is_available()}


# ------------------------------------------------------------------------------------------- set-up


def set_up(args: argparse.Namespace, ta: ModuleType, workdir: Path) -> SimpleNamespace:
    """Config, data, tokenizer, model, optimizer, scheduler and accelerator exactly as ``ta.main()`` builds them."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    config = ta.load_config(args.config, args.set)
    cfg = ta.stage_config(config, ta.SECTION)
    data_cfg = config.get("data", {})
    seed = int(cfg.get("seed", 0))
    output_root = Path(config.get("output_root", "runs/tiny"))
    dataset_path = Path(args.dataset or data_cfg["dataset"])
    accelerator = Accelerator(
        mixed_precision=cfg.get("mixed_precision", "no"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        step_scheduler_with_optimizer=False,
    )
    set_seed(seed)
    dataset = ta.load_medm2g_dataset(dataset_path)
    image_keys = [k for f in ("xray", "ct", "mri") for k in ta.modalities_of_family(f)]
    train_data = ta.AlignmentData(dataset["train"], image_keys)

    if cfg.get("text_backbone", "scratch") == "minilm":
        tokenizer_dir = workdir / "tokenizer"
        tokenizer = ta.load_tokenizer(SimpleNamespace(tokenizer=None), output_root, workdir, cfg, [])
        tokenizer_source = "minilm"
    else:
        tokenizer_dir = Path(args.tokenizer) if args.tokenizer else output_root / "tokenizer"
        tokenizer_source = str(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            if args.tokenizer:
                raise FileNotFoundError(f"--tokenizer {args.tokenizer!r} is not a tokenizer folder")
            tokenizer_dir = workdir / "tokenizer"
            tokenizer_source = f"trained here on the training reports (vocab {cfg['tokenizer_vocab_size']}), as train_alignment does without one"
            if not tokenizer_dir.is_dir():
                reports = [r for r in train_data.reports if r]
                ta.train_report_tokenizer(reports, vocab_size=cfg["tokenizer_vocab_size"]).save_pretrained(str(tokenizer_dir))
        tokenizer = ta.PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))

    sample_size = int(data_cfg.get("size", 64))
    model = ta.build_model(cfg, tokenizer, sample_size).to(memory_format=torch.channels_last)
    central = ta.build_rounds(cfg, False, None)
    pairwise = ta.build_rounds(cfg, True, None)
    optimizer = ta.build_optimizer(cfg, model)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ta.lr_lambda_for(central, int(cfg["lr_warmup_steps"])))
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    model.train()
    return SimpleNamespace(config=config, cfg=cfg, seed=seed, dataset_path=dataset_path, train_data=train_data,
                           tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, tokenizer_source=tokenizer_source,
                           model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, accelerator=accelerator,
                           central=central, pairwise=pairwise, sample_size=sample_size)


def variants_of(env: SimpleNamespace, vi: str) -> dict[str, dict]:
    """``{name: {"round": round dict, "use_vi": bool, "scheme": "central"|"pairwise"}}``."""
    flags = {"both": (True, False), "on": (True,), "off": (False,)}[vi]
    out = {}
    for use_vi in flags:
        for scheme, rounds in (("central", env.central), ("pairwise", env.pairwise)):
            for round_ in rounds:
                out[round_["name"] + ("" if use_vi else "_no_vi")] = {"round": round_, "use_vi": use_vi, "scheme": scheme}
    return out


# ------------------------------------------------------------------------------------------- one step


def timed_step(ta: ModuleType, env: SimpleNamespace, round_: dict, use_vi: bool, step: int, indices: list[int]) -> dict:
    """The body of ``ta.main()``'s loop (between its perf_counter calls), with two extra time stamps."""
    model, optimizer, accelerator, cfg = env.model, env.optimizer, env.accelerator, env.cfg
    started = time.perf_counter()
    generator = ta.step_generator(env.seed, step, accelerator.process_index, ta.SALT_AUGMENT)
    loss, parts = ta.alignment_step(model, env.train_data, env.tokenizer, indices, round_, generator, cfg, use_vi, accelerator.device)
    forward_done = time.perf_counter()
    accelerator.backward(loss)
    backward_done = time.perf_counter()
    if accelerator.sync_gradients and cfg.get("max_grad_norm"):
        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float(cfg["max_grad_norm"]))
    optimizer.step()
    env.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    done = time.perf_counter()
    if not math.isfinite(parts["loss"]):
        raise RuntimeError(f"non-finite loss in round {round_['name']!r} at step {step}: {parts}")
    return {"step_ms": (done - started) * 1e3, "forward_ms": (forward_done - started) * 1e3,
            "backward_ms": (backward_done - forward_done) * 1e3, "optimizer_ms": (done - backward_done) * 1e3}


def count_step(ta: ModuleType, env: SimpleNamespace, round_: dict, use_vi: bool, step: int, indices: list[int]) -> dict:
    """Encoder forwards (by family, grad or not, rows), InfoNCE and Barlow Twins terms of one (untimed) step."""
    unwrapped = env.accelerator.unwrap_model(env.model)
    counts = {"encoder_forwards": {}, "encoder_rows": {}, "encoder_forwards_with_grad": 0, "encoder_forwards_no_grad": 0,
              "infonce_terms": 0, "barlow_twins_terms": 0}
    original_encode, original_nce, original_bt = unwrapped.encode, ta.contrastive_loss, ta.barlow_twins_loss

    def encode(modality_key, inputs):
        family = unwrapped.family_of(modality_key)
        counts["encoder_forwards"][family] = counts["encoder_forwards"].get(family, 0) + 1
        rows = int(inputs["input_ids"].shape[0]) if isinstance(inputs, dict) else int(inputs.shape[0])
        counts["encoder_rows"][family] = counts["encoder_rows"].get(family, 0) + rows
        counts["encoder_forwards_with_grad" if torch.is_grad_enabled() else "encoder_forwards_no_grad"] += 1
        return original_encode(modality_key, inputs)

    def nce(*a, **k):
        counts["infonce_terms"] += 1
        return original_nce(*a, **k)

    def bt(*a, **k):
        counts["barlow_twins_terms"] += 1
        return original_bt(*a, **k)

    unwrapped.encode, ta.contrastive_loss, ta.barlow_twins_loss = encode, nce, bt
    try:
        generator = ta.step_generator(env.seed, step, env.accelerator.process_index, ta.SALT_AUGMENT)
        loss, _ = ta.alignment_step(env.model, env.train_data, env.tokenizer, indices, round_, generator, env.cfg, use_vi,
                                    env.accelerator.device)
        del loss
    finally:
        del unwrapped.encode
        ta.contrastive_loss, ta.barlow_twins_loss = original_nce, original_bt
    counts["encoder_forwards_total"] = sum(counts["encoder_forwards"].values())
    return counts


def time_infonce(ta: ModuleType, batch: int, dim: int, repeats: int) -> float:
    """Median ms of one InfoNCE term, forward + backward, on (batch, dim) embeddings that need grad."""
    generator = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_(True)
    b = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_(True)
    scale = torch.tensor(14.3, requires_grad=True)
    times = []
    for _ in range(repeats + 5):
        started = time.perf_counter()
        ta.contrastive_loss(a, b, scale).backward()
        times.append((time.perf_counter() - started) * 1e3)
        a.grad = b.grad = scale.grad = None
    return statistics.median(times[5:])


# ------------------------------------------------------------------------------------------- analysis


def median(values):
    return statistics.median(values) if values else None


def whole_run(rounds: list[dict], per_step_ms: dict[str, float], suffix: str) -> dict:
    parts = {r["name"]: {"steps": int(r["steps"]), "ms_per_step": per_step_ms[r["name"] + suffix],
                         "seconds": int(r["steps"]) * per_step_ms[r["name"] + suffix] / 1e3} for r in rounds}
    return {"rounds": parts, "steps": sum(p["steps"] for p in parts.values()), "seconds": sum(p["seconds"] for p in parts.values())}


def cost_model(central: list[dict], per_step_ms: dict[str, float], suffix: str, nce_ms: float) -> dict:
    """ANALYTIC extrapolation to n modalities (text + n-1 others) from the measured 4-modality steps.

    Assumption: every family encoded in a step costs the mean per-family share of the measured hub step,
    ``per_family = (hub - hub_terms * nce) / hub_families``, and each InfoNCE term costs ``nce`` (timed alone,
    fwd + bwd); the last central round (ct_mri: two families, one term) keeps its measured time whatever n is.
    The steps are split as the config splits them (tiny.yaml: 80% hub, 20% ct_mri). As implemented in
    train_alignment (each family encoded once per step and shared by all its pairs), the hub step is
    ``n * per_family + (n-1) * nce`` and the pairwise step ``n * per_family + n(n-1)/2 * nce``. The hypothetical
    "per-pair encoding" rows (each pair encodes its own two inputs, the O(n^2) cost the paper argues against)
    use ``2(n-1)`` and ``n(n-1)`` encoder passes instead. The measured pairwise step is predicted as a check.
    """
    if len(central) < 2:
        return {"note": "needs a central schedule of at least two rounds"}
    hub, last = central[0], central[-1]
    fam_h, terms_h = len({f for p in hub["pairs"] for f in p}), len(hub["pairs"])
    t_h, t_l = per_step_ms[hub["name"] + suffix], per_step_ms[last["name"] + suffix]
    per_family = (t_h - terms_h * nce_ms) / fam_h
    total = sum(int(r["steps"]) for r in central)
    hub_share = sum(int(r["steps"]) for r in central[:-1]) / total
    rows = []
    for n in range(2, 9):
        p = n * (n - 1) // 2
        central_ms = hub_share * (n * per_family + (n - 1) * nce_ms) + (1 - hub_share) * t_l
        pairwise_ms = n * per_family + p * nce_ms
        central_pp = hub_share * (2 * (n - 1) * per_family + (n - 1) * nce_ms) + (1 - hub_share) * t_l
        pairwise_pp = 2 * p * per_family + p * nce_ms
        rows.append({
            "n_modalities": n, "infonce_pairs": {"central_hub": n - 1, "pairwise": p},
            "encoder_passes_per_step_as_implemented": {"central_hub": n, "pairwise": n},
            "encoder_passes_per_step_per_pair_encoding": {"central_hub": 2 * (n - 1), "pairwise": 2 * p},
            "mean_ms_per_step_as_implemented": {"central": central_ms, "pairwise": pairwise_ms},
            "ratio_pairwise_over_central_as_implemented": pairwise_ms / central_ms,
            "mean_ms_per_step_per_pair_encoding": {"central": central_pp, "pairwise": pairwise_pp},
            "ratio_pairwise_over_central_per_pair_encoding": pairwise_pp / central_pp,
        })
    pairwise_families = 4
    return {
        "label": "ANALYTIC extrapolation: only n = 4 is measured",
        "assumptions": " ".join(cost_model.__doc__.split("\n\n")[1].split()),
        "per_family_ms": per_family, "infonce_term_ms": nce_ms, "last_round_ms": t_l, "hub_share_of_steps": hub_share,
        "check": {"predicted_pairwise_ms": pairwise_families * per_family + 6 * nce_ms,
                  "measured_pairwise_ms": per_step_ms.get("pairwise" + suffix)},
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------- end to end


def end_to_end(args: argparse.Namespace, env: SimpleNamespace, workdir: Path, per_step_ms: dict[str, float], ta: ModuleType) -> dict:
    use_vi = args.vi != "off"
    suffix = "" if use_vi else "_no_vi"
    schemes = {"central": [] if use_vi else ["--no-vi"], "pairwise": ["--pairwise"] + ([] if use_vi else ["--no-vi"])}
    order = []
    for r in range(args.e2e_repeats):
        order += ["central", "pairwise"] if r % 2 == 0 else ["pairwise", "central"]
    runs = {name: [] for name in schemes}
    planned = {s: sum(int(r["steps"]) for r in ta.build_rounds(env.cfg, s == "pairwise", args.e2e_steps)) for s in schemes}
    if len(set(planned.values())) != 1:
        # build_rounds keeps every round >= 1 step after rounding, so a short --max_train_steps can give central more.
        raise ValueError(f"--e2e-steps {args.e2e_steps} gives unequal schedules {planned} (build_rounds' rounding); pick another")
    env_vars = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(args.threads))}
    for i, scheme in enumerate(order):
        root = workdir / f"e2e-{i}-{scheme}"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        argv = ["--config", args.config, "--dataset", str(env.dataset_path), "--output_dir", str(root / "alignment"),
                "--max_train_steps", str(args.e2e_steps), "--set", f"output_root={root}", *schemes[scheme]]
        if env.tokenizer_source != "minilm":
            argv += ["--tokenizer", str(env.tokenizer_dir)]
        for item in args.set:
            argv += ["--set", item]
        result_path = root / "result.json"
        started = time.perf_counter()
        completed = subprocess.run([sys.executable, "-c", CHILD, str(SCRIPT), str(result_path), *argv], env=env_vars,
                                   capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            raise RuntimeError(f"end-to-end {scheme} run failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
        result = json.loads(result_path.read_text())
        log = [json.loads(line) for line in (root / "alignment" / "train_log.jsonl").read_text().splitlines()]
        steps_by_round = {}
        for entry in log:
            steps_by_round[entry["round"]] = steps_by_round.get(entry["round"], 0) + 1
        rounds = ta.build_rounds(env.cfg, scheme == "pairwise", args.e2e_steps)
        predicted = sum(int(r["steps"]) * per_step_ms[r["name"] + suffix] for r in rounds) / 1e3
        validation = {name: {pair: entry["mean"] for pair, entry in v["metrics"].items()} for name, v in result["validation"].items()}
        runs[scheme].append({
            "order_index": i, "command": "train_alignment.main(" + " ".join(argv) + ")",
            "train_wall_time_s": result["train_wall_time_s"], "main_wall_time_s": result["main_wall_time_s"],
            "process_wall_time_s": wall, "steps": result["steps"], "steps_by_round": steps_by_round,
            "final_loss": result["final_loss"], "child_torch_threads": result["torch_threads"],
            "predicted_from_per_step_medians_s": predicted, "validation_retrieval_mean": validation,
        })
        print(f"e2e {scheme}: train loop {result['train_wall_time_s']:.1f} s (predicted {predicted:.1f} s), process {wall:.1f} s", flush=True)
    if not args.workdir:
        for i, scheme in enumerate(order):
            shutil.rmtree(workdir / f"e2e-{i}-{scheme}", ignore_errors=True)
    med = {s: median([r["train_wall_time_s"] for r in v]) for s, v in runs.items()}
    pred = {s: median([r["predicted_from_per_step_medians_s"] for r in v]) for s, v in runs.items()}
    return {
        "steps_per_run": args.e2e_steps, "order": order, "runs": runs,
        "steps_per_scheme": {s: sorted({r["steps"] for r in v}) for s, v in runs.items()},
        "equal_steps": len({r["steps"] for v in runs.values() for r in v}) == 1,
        "train_wall_time_s_median": med,
        "ratio_pairwise_over_central_train_loop": med["pairwise"] / med["central"],
        "ratio_pairwise_over_central_process": median([r["process_wall_time_s"] for r in runs["pairwise"]])
        / median([r["process_wall_time_s"] for r in runs["central"]]),
        "predicted_ratio_from_per_step_medians": pred["pairwise"] / pred["central"],
        "measured_over_predicted_train_loop": {s: med[s] / pred[s] for s in runs},
        "vi": use_vi,
        "note": "train_wall_time_s is train_alignment's own sum over its loop (the timed "
                "steps above); process wall time adds start-up, data loading, per-round validation and saving. The "
                "retrieval is train_alignment's validation after only these few steps: near chance, not a quality result.",
    }


# ------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ta = load_training_script()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="alignment-cost-"))
    workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    run_started = time.perf_counter()
    env = set_up(args, ta, workdir)
    variants = variants_of(env, args.vi)
    names = list(variants)
    block = args.warmup_steps + args.steps_per_block
    total_steps = args.repeats * block
    sampler = ta.StepBatchSampler(len(env.train_data), int(env.cfg["train_batch_size"]), env.seed, total_steps, 0,
                                  env.accelerator.process_index)
    batches = list(sampler)
    unwrapped = env.accelerator.unwrap_model(env.model)

    # Warm-up: one step of every variant (allocates the optimizer state, first-call overheads), not counted.
    for name in names:
        ta.set_trainable(unwrapped, variants[name]["round"]["trainable"])
        timed_step(ta, env, variants[name]["round"], variants[name]["use_vi"], 0, batches[0])

    # Counts (untimed): over the first block's batches, so every variant counts the same batches.
    counts = {}
    for name in names:
        v = variants[name]
        ta.set_trainable(unwrapped, v["round"]["trainable"])
        per = [count_step(ta, env, v["round"], v["use_vi"], s, batches[s]) for s in range(min(block, len(batches)))]
        env.optimizer.zero_grad(set_to_none=True)
        families = sorted({f for c in per for f in c["encoder_forwards"]})
        counts[name] = {
            "steps_counted": len(per),
            "encoder_forwards_per_step": {f: statistics.mean(c["encoder_forwards"].get(f, 0) for c in per) for f in families},
            "encoder_forwards_total_per_step": statistics.mean(c["encoder_forwards_total"] for c in per),
            "encoder_forwards_with_grad_per_step": statistics.mean(c["encoder_forwards_with_grad"] for c in per),
            "encoder_forwards_no_grad_per_step": statistics.mean(c["encoder_forwards_no_grad"] for c in per),
            "encoder_rows_per_step": {f: statistics.mean(c["encoder_rows"].get(f, 0) for c in per) for f in families},
            "infonce_terms_per_step": statistics.mean(c["infonce_terms"] for c in per),
            "barlow_twins_terms_per_step": statistics.mean(c["barlow_twins_terms"] for c in per),
            "trainable_parameters": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
        }

    # Timed: interleaved blocks, order rotated every repeat, same batches for every variant.
    steps: dict[str, list[dict]] = {name: [] for name in names}
    block_medians: dict[str, list[float]] = {name: [] for name in names}
    orders = []
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        orders.append(order)
        for name in order:
            v = variants[name]
            ta.set_trainable(unwrapped, v["round"]["trainable"])
            mine = []
            for j in range(block):
                step = r * block + j
                t = timed_step(ta, env, v["round"], v["use_vi"], step, batches[step])
                if j >= args.warmup_steps:
                    mine.append(t)
            steps[name].extend(mine)
            block_medians[name].append(statistics.median(t["step_ms"] for t in mine))
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {block_medians[n][-1]:.0f} ms" for n in names), flush=True)
    timed_s = time.perf_counter() - run_started

    per_step_ms = {name: statistics.median(t["step_ms"] for t in steps[name]) for name in names}
    results = {}
    for name in names:
        v = variants[name]
        results[name] = {
            "scheme": v["scheme"], "round": v["round"]["name"], "vi": v["use_vi"], "pairs": v["round"]["pairs"],
            "trainable": v["round"]["trainable"], "config_steps": int(v["round"]["steps"]),
            "ms_per_step_median": per_step_ms[name],
            "ms_per_step_min": min(t["step_ms"] for t in steps[name]),
            "ms_per_step_block_medians": block_medians[name],
            "ms_per_step_all": [t["step_ms"] for t in steps[name]],
            "phases_ms_median": {k: statistics.median(t[k] for t in steps[name]) for k in ("forward_ms", "backward_ms", "optimizer_ms")},
            "counts": counts[name],
        }

    nce_ms = time_infonce(ta, int(env.cfg["train_batch_size"]), int(env.cfg["model"]["embed_dim"]), args.nce_repeats)
    budget = {}
    for use_vi, suffix in ((True, ""), (False, "_no_vi")):
        if not all(r["name"] + suffix in per_step_ms for r in env.central + env.pairwise):
            continue
        central = whole_run(env.central, per_step_ms, suffix)
        pairwise = whole_run(env.pairwise, per_step_ms, suffix)
        per_repeat = []
        for r in range(args.repeats):
            c = sum(int(x["steps"]) * block_medians[x["name"] + suffix][r] for x in env.central)
            p = sum(int(x["steps"]) * block_medians[x["name"] + suffix][r] for x in env.pairwise)
            per_repeat.append(p / c)
        budget["vi" if use_vi else "no_vi"] = {
            "central": central, "pairwise": pairwise,
            "ratio_pairwise_over_central": pairwise["seconds"] / central["seconds"],
            "ratio_per_repeat": per_repeat,
            "ratio_per_repeat_median": statistics.median(per_repeat),
            "ratio_per_repeat_range": [min(per_repeat), max(per_repeat)],
            "per_step_ratio_pairwise_over_hub": per_step_ms["pairwise" + suffix] / per_step_ms[env.central[0]["name"] + suffix],
            "cost_model_n_modalities": cost_model(env.central, per_step_ms, suffix, nce_ms),
        }

    summary = {
        "machine": info,
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "command": "python benchmarks/alignment_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "config": args.config, "overrides": args.set, "dataset": str(env.dataset_path),
            "train_patients": len(env.train_data), "train_batch_size": int(env.cfg["train_batch_size"]),
            "vi_batch_size": int(env.cfg["vi_batch_size"]), "image_size": env.sample_size, "tokenizer": env.tokenizer_source,
            "tokenizer_size": len(env.tokenizer), "repeats": args.repeats, "steps_per_block": args.steps_per_block,
            "warmup_steps_per_block": args.warmup_steps, "variant_order_per_repeat": orders,
            "model_parameters": sum(p.numel() for p in unwrapped.parameters()),
            "method": "one model/optimizer, set_trainable per block; the same StepBatchSampler batches and step_generator "
                      "draws for every variant; timed = train_alignment.main()'s loop body; medians over counted steps",
            "equal_budget": "same total optimizer steps as build_rounds gives --pairwise (the central schedule's sum), "
                            "same train_batch_size and encoders; whole run = sum over rounds of steps x median ms/step",
        },
        "central_rounds": [{k: r[k] for k in ("name", "pairs", "trainable", "steps")} for r in env.central],
        "pairwise_rounds": [{k: r[k] for k in ("name", "pairs", "trainable", "steps")} for r in env.pairwise],
        "variants": results,
        "infonce_term_fwd_bwd_ms": nce_ms,
        "whole_run_for_config_budget": budget,
        "end_to_end": "pending" if args.e2e_steps else None,
        "timed_part_wall_s": timed_s,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")  # the per-step part survives a failed end-to-end run
    if args.e2e_steps:
        summary["end_to_end"] = end_to_end(args, env, workdir, per_step_ms, ta)
        summary["loadavg_at_end"] = os.getloadavg()
        out.write_text(json.dumps(summary, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    for name in names:
        print(f"{name:>16}: {per_step_ms[name]:8.1f} ms/step (median of {len(steps[name])})")
    for key, b in budget.items():
        print(f"config budget, {key}: central {b['central']['seconds']:.0f} s, pairwise {b['pairwise']['seconds']:.0f} s, "
              f"ratio {b['ratio_pairwise_over_central']:.3f} (per repeat {b['ratio_per_repeat_range'][0]:.3f}-{b['ratio_per_repeat_range'][1]:.3f})")
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
