"""The ``medm2g`` command line: ``medm2g generate``, ``evaluate``, ``phantoms``, ``prepare``, ``verify`` and ``demo``.

Each sub-command is a thin shell over a library function, so everything here is also reachable from
Python. Errors that are the user's (bad arguments, unreadable files) print one line and exit with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .checkpoints import DEFAULT_CHECKPOINT
from .schedulers import SCHEDULERS, TIMESTEP_SPACINGS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def _window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU, got {text!r}") from None
    return low, high


def _translation(text: str) -> tuple[str, list[str], str]:
    from .evaluation.benchmark import parse_translation

    try:
        return parse_translation(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"expected three non-negative numbers TRAIN,VAL,TEST summing to 1, got {text!r}")
    return values


PREPARE_EXAMPLES = r"""examples (scripts/real_data/prepare_all.sh, on ../shared/data; each writes prepare_info.json beside the dataset):
  # Harvard CT-MRI: CT/ and MRI/ pair by file name, patient = series; series 2 is FLAIR, not T2: left out
  medm2g prepare --images harvard-ct-mri --modality-map MRI=mri_t2 --patient-regex '^(\d+)\d{3}$' \
      --exclude-patients 2 --validation-patients 16 --test-patients 32 --split-fractions 1,0,0 --size 64 --out OUT
  # BraTS / TCGA subjects: every 2nd axial slice that is >= 10 % brain in all contrasts; one subject validates
  medm2g prepare --images brain-mri-multicontrast --layout subjects --nifti-slices 0:155:2 --min-foreground 0.1 \
      --validation-patients TCGA-DU-7294 --split-fractions 1,0,0 --size 64 --out OUT
  # COVID chest X-rays with their case notes cleaned of boilerplate; CT rows dropped; hash split by patient
  medm2g prepare --images covid-chestxray --reports covid-chestxray/metadata.csv \
      --csv-columns report=clinical_notes,patient_id=patientid --modalities xray --clean-notes --size 64 --out OUT
  # SynthRAD CT: captions from file names (scripts/real_data/synthrad_captions.py); 8-bit fits [-1000, 2000] HU
  medm2g prepare --images synthrad-ct-slices --reports captions.csv --png-ct-window=-1000,2000 \
      --validation-patients 1BB007 1PA009 --test-patients 1BB002 1PA030 --split-fractions 1,0,0 --size 64 --out OUT
"""

REVISION_HELP = "the commit hash to load a Hub repository --model at (required for Hub models, refused for local ones)"
FORMAT_SUFFIX = {"png": ".png", "dicom": ".dcm", "nifti": ".nii.gz"}


def load_condition(key: str, path: str, size: int, png_ct_window: tuple[float, float]) -> np.ndarray:
    """A condition file in the registry's native units at the model's size (resizing is reported, not silent)."""
    from .data.datasets import native_units, to_square
    from .data.io import read_image
    from .modalities import get_modality

    get_modality(key, "--condition modality")
    image = read_image(path)
    array = native_units(image, key, png_ct_window)
    if array.shape != (size, size):
        print(f"medm2g generate: resizing {key} {path} from {array.shape[0]}x{array.shape[1]} to {size}x{size} (padded to square)")
        array = to_square(array, size)
    return array


HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def local_pipeline_class(folder: str | Path) -> str | None:
    """The ``_class_name`` of a local pipeline folder's ``model_index.json`` (None without one)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{index} is not a JSON object: {error}") from None

SCHEDULER_NAMES = sorted(SCHEDULERS)


def set_scheduler(pipe, name: str | None, timestep_spacing: str | None) -> None:
    """Swaps a diffusion pipeline's sampler for ``--scheduler``/``--timestep-spacing`` (``None``: keep its own)."""
    from .schedulers import scheduler_from_name

    if getattr(pipe, "scheduler", None) is None or (name is None and timestep_spacing is None):
        return
    pipe.scheduler = scheduler_from_name(name or "ddim", pipe.scheduler.config, timestep_spacing)


def load_pipeline(model: str, revision: str | None = None):
    """The pipeline a command's --model (or --baseline) names: a bundled checkpoint's name, a local folder, or a
    Hub repository pinned to a commit (``revision``), so what a run loads cannot change under it.

    A local folder whose ``model_index.json`` names ``MedM2GRegressionPipeline`` (``training/train_regression_baseline.py``)
    loads as that class; a LoRA adapter folder (``training/finetune_lora.py``) loads onto the base model its
    ``medm2g_lora.json`` names; every other one as a `MedM2GPipeline`. All refuse pickle weights."""
    from .checkpoints import BUNDLED_CHECKPOINTS, resolve_checkpoint
    from .loaders import is_lora_folder, read_lora_metadata
    from .pipelines import MedM2GPipeline, MedM2GRegressionPipeline

    if model in BUNDLED_CHECKPOINTS or Path(model).is_dir():
        if revision is not None:
            raise ValueError(f"--revision applies to Hub repositories only; {model!r} is local")
        folder = resolve_checkpoint(model)  # a clear error when the bundled folder is missing
        if is_lora_folder(folder):
            base = read_lora_metadata(folder).get("base_model")
            if not base or Path(base).resolve() == Path(folder).resolve() or is_lora_folder(resolve_checkpoint(base)):
                raise ValueError(f"the LoRA adapter {model!r} names no usable base model ({base!r}) in its medm2g_lora.json")
            pipe = load_pipeline(base)
            pipe.load_lora_weights(folder)
            return pipe
        if local_pipeline_class(folder) == MedM2GRegressionPipeline.__name__:
            return MedM2GRegressionPipeline.from_pretrained(folder)
        return MedM2GPipeline.from_pretrained(model)
    if HUB_REPO_ID.fullmatch(model):
        if revision is None or not COMMIT_HASH.fullmatch(revision):
            raise ValueError(
                f"{model!r} is not a local folder, so it names a Hub repository: --revision must be the "
                f"40-character commit hash to load it at (a branch or tag can move to other weights); got {revision!r}"
            )
        return MedM2GPipeline.from_pretrained(model, revision=revision)
    raise FileNotFoundError(
        f"--model must be a bundled checkpoint {sorted(BUNDLED_CHECKPOINTS)}, a folder written by "
        f"training/train_multiflow.py or a Hub repository id with --revision; got {model!r}"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from .data.io import write_dicom, write_nifti, write_png
    from .training_utils import atomic_write_text

    pipe = load_pipeline(args.model, args.revision)
    set_scheduler(pipe, args.scheduler, args.timestep_spacing)
    conditions = {
        key: load_condition(key, path, pipe.image_size, args.png_ct_window) for key, path in (args.condition or [])
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = pipe(
        prompt=args.prompt,
        conditions=conditions or None,
        targets=args.targets,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
        ct_in_hu=True,
        report_candidates=args.report_candidates,
    )
    seconds = time.perf_counter() - started
    written = []
    for target, images in result.images.items():
        provenance = {**result.provenance[target], "seed": args.seed}
        for i, image in enumerate(images):
            path = out / f"{target}_{i}{FORMAT_SUFFIX[args.format]}"
            if args.format == "png":
                display = (image + 1000.0) / 2000.0 if target == "ct" else image
                write_png(path, np.clip(display, 0.0, 1.0), provenance=provenance)
            elif args.format == "dicom":
                write_dicom(path, image, modality=target, provenance=provenance)
            else:
                write_nifti(path, image, provenance=provenance)
            written.append(path)
    for i, report in enumerate(result.text or []):
        path = out / f"report_{i}.txt"
        provenance = {**result.provenance["text"], "seed": args.seed}
        atomic_write_text(path.with_suffix(".json"), json.dumps({"report": report, "provenance": {"synthetic": True, **provenance}}, indent=2))
        atomic_write_text(path, f"SYNTHETIC REPORT generated by {provenance['model']} - not for clinical use.\n\n{report}\n")
        written.append(path)
        print(report)
    for path in written:
        print(f"wrote {path}")
    print(f"generated {', '.join(args.targets)} in {seconds:.1f} s ({args.steps} steps)")
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    from .data.datasets import build_phantom_dataset, save_dataset, summarize
    from .data.io import write_png
    from .data.preview import montage

    dataset = build_phantom_dataset(args.n, seed=args.seed, size=args.size)
    save_dataset(dataset, args.out)
    test = dataset["test"] if dataset["test"].num_rows else dataset["train"]
    # Python format keeps a missing modality as None (numpy format would turn it into an all-NaN array).
    rows = list(test.select(range(min(args.preview_rows, test.num_rows))))
    labels = [f"{row['patient_id'][-6:]} {row['anatomy']}" for row in rows]
    image = montage(rows, tile=96, labels=labels)
    preview = Path(args.out) / "preview.png"
    write_png(
        preview,
        np.asarray(image, dtype=np.float32) / 255.0,
        provenance={"model": "medm2g phantom generator", "seed": str(args.seed), "size": str(args.size)},
    )
    print(json.dumps(summarize(dataset), indent=2))
    print(f"wrote {args.n} virtual patients to {args.out} and a preview montage to {preview}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.datasets import PREPARE_INFO, CsvColumns, prepare_dataset, save_dataset, summarize

    dataset, info = prepare_dataset(
        args.images,
        args.reports,
        size=args.size,
        seed=args.seed,
        modality_map=dict(args.modality_map or []),
        csv_columns=CsvColumns.parse(args.csv_columns),
        patient_regex=args.patient_regex,
        png_ct_window=args.png_ct_window,
        fractions=args.split_fractions,
        layout=args.layout,
        nifti_slices=args.nifti_slices,
        min_foreground=args.min_foreground,
        modalities=args.modalities,
        clean_notes=args.clean_notes,
        validation_patients=args.validation_patients,
        test_patients=args.test_patients,
        exclude_patients=args.exclude_patients,
        return_info=True,
    )
    arguments = {key: value for key, value in vars(args).items() if key not in ("func", "remark")}
    info = {"medm2g_version": __version__, "command": "medm2g prepare", "arguments": arguments,
            "remarks": args.remark or [], **info}
    save_dataset(dataset, args.out, info=info)
    print(json.dumps(summarize(dataset), indent=2))
    print(f"wrote the dataset to {args.out}, with {PREPARE_INFO}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from .evaluation.benchmark import BenchmarkConfig

    cfg = BenchmarkConfig.quick() if args.quick else BenchmarkConfig()
    overrides = {"num_inference_steps": args.steps, "seed": args.seed, "fid": False if args.no_fid else None,
                 "report_candidates": args.report_candidates,
                 "text_to_image_targets": tuple(args.text_to_image_targets) if args.text_to_image_targets else None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    # --threads holds for this command only: run in-process (tests, notebooks), it must not leave torch there.
    callers_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_evaluate(args, cfg)
    finally:
        torch.set_num_threads(callers_threads)


def _run_evaluate(args: argparse.Namespace, cfg) -> int:
    """`medm2g evaluate` once the config and threads are set: load, benchmark, write JSON and Markdown."""
    from .evaluation.benchmark import run_benchmark, save_results
    from .evaluation.benchmark_tables import markdown_tables
    from .training_utils import atomic_write_text

    pipe = load_pipeline(args.model, args.revision)
    pipe.set_progress_bar_config(disable=True)
    baselines = {}
    for name, folder in args.baseline or []:
        baselines[name] = load_pipeline(folder)
        baselines[name].set_progress_bar_config(disable=True)
    # One sampler for every diffusion pipeline compared (a regression baseline has none).
    for candidate in (pipe, *baselines.values()):
        set_scheduler(candidate, args.scheduler, args.timestep_spacing)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_benchmark(pipe, args.name or Path(args.model).name, cfg, data=args.data, baselines=baselines,
                            classifier_cache=args.classifiers or out / "finding_classifiers", tasks=args.tasks,
                            split=args.split, translations=args.translations)
    results["arguments"] = {k: v for k, v in vars(args).items() if k != "func"}
    save_results(results, out / "benchmark.json")
    tables = markdown_tables(results)
    atomic_write_text(out / "benchmark.md", tables)
    print(tables)
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Starts the Gradio demo in the repository's ``space/app.py`` (the Space's own entry point)."""
    import importlib.util

    from .checkpoints import REPOSITORY_ROOT

    app_file = REPOSITORY_ROOT / "space" / "app.py"
    if not app_file.is_file():
        raise FileNotFoundError(f"the demo is {app_file}, which is missing: install from a clone of the repository (pip install -e '.[demo]')")
    if importlib.util.find_spec("gradio") is None:
        raise FileNotFoundError("the demo needs Gradio: pip install -e '.[demo]' (or EXTRAS=demo bash scripts/setup_env.sh)")
    spec = importlib.util.spec_from_file_location("medm2g_space_app", app_file)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    argv = ["--model", args.model]
    if args.revision:
        argv += ["--revision", args.revision]
    if args.server_name:
        argv += ["--server-name", args.server_name]
    if args.server_port:
        argv += ["--server-port", str(args.server_port)]
    return app.main(argv)


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every file carries MedM2G provenance, 1 when one does not (2: a file cannot be read).
    ``--strict``: a file whose pixels changed after it was written also exits 1."""
    from .data.io import pixels_unchanged, read_provenance

    results = []
    for path in args.files:
        record = read_provenance(path)
        ours = bool(record) and record.get("synthetic") is True
        results.append({"file": path, "synthetic": ours, "model": (record or {}).get("model") if ours else None,
                        "generator": (record or {}).get("generator") if ours else None,
                        "pixels_unchanged": pixels_unchanged(path) if ours else None,
                        "provenance": record if ours else None})
    pixel_words = {True: "pixels unchanged since generation", False: "PIXELS CHANGED after generation",
                   None: "pixels not checkable (no digest recorded)"}
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        for row in results:
            if row["synthetic"]:
                made_by = f"model {row['model']}" if row["model"] else "model unknown (only the standard marks survive)"
                print(f"{row['file']}: SYNTHETIC, MedM2G provenance: {made_by}, {row['generator'] or 'generator unknown'}; "
                      f"{pixel_words[row['pixels_unchanged']]}")
            else:
                print(f"{row['file']}: no MedM2G provenance")
    passed = all(row["synthetic"] and not (args.strict and row["pixels_unchanged"] is False) for row in results)
    return 0 if passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medm2g", description="MedM2G medical any-to-any generation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="any-to-any generation: report and/or images -> images and/or a report")
    p.add_argument("--prompt", default=None, help="report text to generate from")
    p.add_argument(
        "--condition", type=_key_value, action="append", metavar="MODALITY=FILE",
        help="a condition image (DICOM, NIfTI or PNG), e.g. mri_t2=t2.nii.gz (repeatable: multi-source)",
    )
    p.add_argument("--targets", nargs="+", required=True, help="modalities to generate: text xray ct mri_t1 mri_t2 mri_pd mri_flair")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    p.add_argument("--format", choices=sorted(FORMAT_SUFFIX), default="png", help="image file format (default png)")
    p.add_argument("--steps", type=_positive_int, default=50, help="inference steps (default 50)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampler (default: the checkpoint's own, DDIM); dpmsolver++ or unipc at 20 steps are within noise of DDIM at 50 on 17 of 18 benchmark metrics (docs/performance.md)")
    p.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None, help="the sampler's timestep spacing (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale for every target (default: 2.0 for images, 3.0 for a report)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--num-images", type=_positive_int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--report-candidates", type=_positive_int, default=None,
                   help="reports sampled per report, of which the consensus one is written (default: 16 when a report is "
                        "the only target, else 1; docs/results/report-candidates.md)")
    p.add_argument("--model", default=DEFAULT_CHECKPOINT, help="a bundled checkpoint name or a pipeline folder (default: %(default)s, bundled)")
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--png-ct-window", type=_window, default=(-1000.0, 1000.0), help="HU window an 8-bit CT PNG condition stands for")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="the benchmark: report, text -> image, image -> image, joint, augmentation tables")
    p.add_argument("--model", default=DEFAULT_CHECKPOINT, help="a bundled checkpoint name or a pipeline folder (default: %(default)s)")
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--name", default=None, help="the model's name in the tables (default: the folder's or checkpoint's name)")
    p.add_argument("--baseline", type=_key_value, action="append", metavar="NAME=DIR",
                   help="another pipeline scored on every task it supports, e.g. single_flow=runs/tiny/pipeline_single_flow or "
                        "regression=runs/real/harvard_mri_to_ct/regression (repeatable)")
    p.add_argument("--data", default=None, help="a dataset folder (default: rebuild the held-out split of the 4,000 seed-0 phantoms)")
    p.add_argument("--out", default="outputs/evaluate", help="where benchmark.json, benchmark.md and the classifiers go")
    p.add_argument("--classifiers", default=None, help="finding-classifier folder to reuse (default: OUT/finding_classifiers)")
    p.add_argument("--quick", action="store_true", help="a tiny run (a few samples, 3 steps, no FID): checks the machinery, not the model")
    p.add_argument("--steps", type=_positive_int, default=None, help="inference steps (default 50; --quick: 3)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                   help="sampler (default: the checkpoint's own, DDIM); dpmsolver++ or unipc at 20 steps are within noise of DDIM at 50 on 17 of 18 benchmark metrics (docs/performance.md)")
    p.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None, help="the sampler's timestep spacing (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    p.add_argument("--no-fid", action="store_true", help="skip FID (it loads an 87 MB Inception network)")
    p.add_argument("--report-candidates", type=_positive_int, default=None,
                   help="reports sampled per X-ray, of which the consensus one is scored (default: the pipeline's, 16)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                   help="a subset of: report_generation text_to_image image_to_image joint augmentation (default: all)")
    p.add_argument("--text-to-image-targets", nargs="+", default=None, metavar="KEY", help="default: xray ct mri_t1 mri_t2")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="the held-out split of --data (or of the phantoms) to score (default: test)")
    p.add_argument("--translations", type=_translation, action="append", metavar="SOURCES->TARGET",
                   help="an image -> image task, e.g. mri_t1+mri_t2->mri_flair (repeatable; default: the phantom "
                        "benchmark's, or with --data the ones its columns allow: see evaluation.benchmark.default_translations)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("phantoms", help="write a synthetic dataset of virtual patients (HF save_to_disk) and a preview")
    p.add_argument("--n", type=_positive_int, default=200, help="number of patients (default 200)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed: patient i depends only on (seed, i)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels, 32-512, multiple of 8 (default 64)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--preview-rows", type=_positive_int, default=6, help="patients shown in preview.png")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("prepare", help="turn a folder of DICOM/NIfTI/PNG files (+ reports CSV) into a dataset",
                       epilog=PREPARE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (modality sub-folders when no CSV is given)")
    p.add_argument("--reports", default=None, help="CSV with columns file, modality, report, patient_id (, anatomy)")
    p.add_argument("--csv-columns", default=None, help="rename CSV columns, e.g. report=clinical_notes,patient_id=patientid")
    p.add_argument("--layout", choices=["modality-folders", "subjects"], default="modality-folders",
                   help="without --reports: modality-folders (CT/, T2/ ... pair by file name; default) or subjects "
                        "(one folder per patient, each file's stem names its modality: t1n.nii.gz, fla.nii.gz ...)")
    p.add_argument(
        "--modality-map", type=_key_value, action="append", metavar="NAME=KEY",
        help="map a folder/CSV/file-stem modality name to a registry key, e.g. MRI=mri_t2 (repeatable)",
    )
    p.add_argument("--modalities", nargs="+", default=None, metavar="KEY",
                   help="keep only these registry keys (e.g. xray); a sample left without an image is dropped")
    p.add_argument("--patient-regex", default=None, help="regex with one group giving the patient id from a file stem")
    p.add_argument("--nifti-slices", default="middle", metavar="middle|all|START:STOP[:STEP]",
                   help="slices across the last stored voxel axis of each NIfTI volume that become samples, paired by "
                        "index across a sample's volumes; no reorientation (default: middle, one per volume)")
    p.add_argument("--min-foreground", type=float, default=0.0, metavar="FRACTION",
                   help="with multi-slice --nifti-slices, keep a slice only if this fraction of its pixels is above the "
                        "volume's background in every volume of the sample (default 0: keep all)")
    p.add_argument("--clean-notes", action="store_true",
                   help="remove case numbers, figure references, URLs/DOIs, courtesy lines and dates from reports "
                        "(datasets.clean_clinical_note)")
    p.add_argument("--png-ct-window", type=_window, default=(-1000.0, 1000.0),
                   help="HU window an 8-bit CT PNG stands for: v means LOW + v/255*(HIGH-LOW) HU (default -1000,1000)")
    p.add_argument("--size", type=int, default=256, help="side of the square images written (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-wise split")
    p.add_argument("--split-fractions", type=_fractions, default=(0.8, 0.1, 0.1), metavar="TRAIN,VAL,TEST",
                   help="shares of the patients per split; named patients count towards theirs (default 0.8,0.1,0.1)")
    p.add_argument("--validation-patients", nargs="+", default=[], metavar="ID", help="patients put in validation by name")
    p.add_argument("--test-patients", nargs="+", default=[], metavar="ID", help="patients put in test by name")
    p.add_argument("--exclude-patients", nargs="+", default=[], metavar="ID", help="patients left out of the dataset")
    p.add_argument("--remark", action="append", default=None, metavar="TEXT",
                   help="a sentence recorded in prepare_info.json, e.g. where captions come from (repeatable)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("verify", help="does a PNG/DICOM/NIfTI carry MedM2G provenance, and from which model? (exit 0 yes, 1 no)")
    p.add_argument("files", nargs="+", metavar="FILE", help="images to check")
    p.add_argument("--json", action="store_true", help="print the full provenance records as JSON")
    p.add_argument("--strict", action="store_true", help="also exit 1 when a file's pixels changed after it was written")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="the Gradio demo in the browser, offline (needs the demo extra)")
    p.add_argument("--model", default=os.environ.get("MEDM2G_MODEL", DEFAULT_CHECKPOINT),
                   help="a bundled checkpoint name or a pipeline folder (default: $MEDM2G_MODEL or %(default)s)")
    p.add_argument("--server-name", default=None, help="host to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)")
    p.add_argument("--revision", default=os.environ.get("MEDM2G_MODEL_REVISION"),
                   help=REVISION_HELP + " (default: $MEDM2G_MODEL_REVISION)")
    p.add_argument("--server-port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data.io import MedicalImageError

    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, MedicalImageError) as error:
        print(f"medm2g {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
