#!/usr/bin/env python
"""Stage 1 of MedM2G: align the prompt encoders of every modality family in one shared space.

Central alignment (the paper's scheme, default): text is the hub. The rounds in the config's ``alignment``
section run in order; by default

1. ``hub``: text-xray, text-ct and text-mri, all three InfoNCE terms in every step (one batch of patients
   is encoded once per modality and feeds every pair it has);
2. ``ct_mri``: ct-mri with the text and X-ray encoders frozen.

X-ray and MRI are never paired directly: xray<->mri retrieval works only through the hub. ``--pairwise``
replaces the rounds by one round over all six pairs among text, xray, ct, mri (the O(n^2) scheme the paper
argues against) with the same total step count.

Losses: symmetric InfoNCE with a learnable CLIP temperature for every pair of a round, plus the
visual-invariant (VI) loss: Barlow Twins (Zbontar et al., 2021; off-diagonal weight lambda = 5e-3) between
two augmented views of each trainable imaging family's images. ``--no-vi`` drops it (the ablation).

Every step's batch, MRI contrast and augmentations are pure functions of ``(seed, step)``
(``training_utils.StepBatchSampler`` / ``step_generator``), so ``--resume_from_checkpoint latest`` reproduces
the uninterrupted run's next loss.

Writes ``<output_root>/prompt_encoders`` (diffusers format), one model folder per finished round under
``<output_dir>/rounds/``, and the validation retrieval metrics of each round to
``<output_dir>/validation.json``. Run:

    accelerate launch training/train_alignment.py --config training/configs/tiny.yaml
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from medm2g_diffusers.data.datasets import load_medm2g_dataset
from medm2g_diffusers.evaluation.finding_labeller import label_report_with_attributes
from medm2g_diffusers.modalities import modalities_of_family, to_model_range
from medm2g_diffusers.models.prompt_encoders import MINILM_TEXT_KEYS, TEXT_FAMILY, MedM2GPromptEncoders, minilm_path
from medm2g_diffusers.tokenizer import train_report_tokenizer
from medm2g_diffusers.training_utils import (
    StepBatchSampler,
    atomic_save_pretrained,
    atomic_write_text,
    base_argument_parser,
    checkpoint_step,
    load_config,
    lr_lambda_for,
    resolve_checkpoint,
    round_at,
    save_checkpoint,
    stage_config,
    step_generator,
)

logger = logging.getLogger(__name__)

SECTION = "alignment"
# Families paired in --pairwise mode: every pair among them, six for text, xray, ct, mri.
PAIRWISE_FAMILIES = ("text", "xray", "ct", "mri")
# Which retrieval pairs validation reports; xray-mri is never trained directly in the central scheme.
RETRIEVAL_PAIRS = (("text", "xray"), ("text", "ct"), ("text", "mri"), ("xray", "ct"), ("xray", "mri"), ("ct", "mri"))
# Finding attributes that make two findings "the same" for agreement: laterality and lung lobe. Sizes and
# free-text details are ignored (a "small" and a "moderate" right effusion agree).
FINDING_IDENTITY_ATTRIBUTES = ("side", "lobe")
SALT_CONTRAST, SALT_AUGMENT = 1, 2


# ------------------------------------------------------------------------------------------------ args


def parse_args(argv: Sequence[str] | None = None):
    parser = base_argument_parser("MedM2G stage 1: central alignment of the prompt encoders (+ visual invariant).")
    parser.add_argument("--no-vi", dest="no_vi", action="store_true", help="ablation: drop the Barlow Twins visual-invariant loss")
    parser.add_argument("--pairwise", action="store_true", help="align all six pairs at once instead of text-as-hub rounds")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: <output_root>/tokenizer, else trained here)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ losses


def contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): row ``i`` of ``a`` and of ``b`` are the positive pair, every other row a negative.

    Args:
        a, b (`torch.Tensor` of shape `(batch, dim)`): L2-normalised embeddings of two modalities.
        logit_scale (`torch.Tensor`, scalar): inverse temperature (already exponentiated and clamped).
        targets (`torch.Tensor` of shape `(batch, batch)`, *optional*): a symmetric target distribution per
            row (rows sum to 1) instead of the identity, as :func:`soft_target_matrix` builds; cross-entropy
            against it in both directions.
    """
    logits = logit_scale * a @ b.t()
    if targets is None:
        labels = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have shape {tuple(logits.shape)}; got {tuple(targets.shape)}")
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t()))


def soft_target_matrix(keys: Sequence[Any], weight: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(1 - weight) * I + weight * G`` where row ``i`` of ``G`` spreads 1 evenly over the rows with ``keys[i]``.

    The label-aware targets of MedCLIP-style "semantic matching" (Wang et al., 2022): two patients whose
    reports say the same thing are not pushed apart as negatives. ``keys[i] is None`` (no report) gives the
    plain one-hot row. Rows of one key have one group size, so the matrix is symmetric.

    Args:
        keys: one hashable finding identity per batch row (``AlignmentData.soft_keys``).
        weight (`float`): in ``[0, 1]``; 0 is plain InfoNCE, 1 puts all mass on the group (self included).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"alignment.soft_targets must be in [0, 1]; got {weight}")
    n = len(keys)
    same = torch.tensor([[k is not None and k == other for other in keys] for k in keys], dtype=torch.float32).reshape(n, n)
    same.fill_diagonal_(1.0)
    group = same / same.sum(1, keepdim=True)
    return ((1.0 - weight) * torch.eye(n) + weight * group).to(device)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins (Zbontar et al., 2021): push the cross-correlation of two views' projections to identity.

    Each embedding dimension is standardised over the batch; ``C = z1n^T z2n / batch``;
    ``loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``.

    Args:
        z1, z2 (`torch.Tensor` of shape `(batch, dim)`): projector outputs of two views of the same images.
        lambd (`float`): weight of the off-diagonal (redundancy-reduction) terms; 5e-3 as in the paper.
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"z1 and z2 must have the same shape (batch >= 2, dim); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1 = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + eps)
    z2 = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + eps)
    c = z1.t() @ z2 / z1.shape[0]
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diagonal + lambd * off_diagonal


# ------------------------------------------------------------------------------------------- augmentation


def augment_images(images: torch.Tensor, generator: torch.Generator, config: dict[str, Any]) -> torch.Tensor:
    """One random view of each image, drawn from ``generator`` (CPU) so a step's views depend on (seed, step).

    Random resized crop with a small rotation (one affine grid per image, bilinear ``grid_sample``),
    brightness/contrast jitter and Gaussian noise, in the model range ``[-1, 1]``. There are deliberately
    **no flips**: a left-right flip turns a right effusion into a left one (laterality is part of the
    findings we align to the report), and up-down flips give anatomy no scanner produces.

    Args:
        images (`torch.Tensor` of shape `(batch, 1, height, width)`): in ``[-1, 1]``.
        config: ``crop_scale [min, max]`` (area fraction), ``crop_ratio [min, max]``, ``max_rotation_deg``,
            ``brightness``, ``contrast``, ``noise_std``.
    """
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    area = uniform(*config["crop_scale"])
    log_ratio = uniform(math.log(config["crop_ratio"][0]), math.log(config["crop_ratio"][1]))
    scale_x = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    scale_y = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    shift_x = uniform(-1.0, 1.0) * (1.0 - scale_x)
    shift_y = uniform(-1.0, 1.0) * (1.0 - scale_y)
    angle = uniform(-1.0, 1.0) * math.radians(config["max_rotation_deg"])
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([scale_x * cos, -scale_y * sin, shift_x], -1), torch.stack([scale_x * sin, scale_y * cos, shift_y], -1)], 1
    )
    gain = uniform(1.0 - config["contrast"], 1.0 + config["contrast"])
    offset = uniform(-config["brightness"], config["brightness"])
    noise_std = uniform(0.0, config["noise_std"])
    noise = torch.randn(images.shape, generator=generator)

    device, dtype = images.device, images.dtype
    grid = F.affine_grid(theta.to(device, dtype), list(images.shape), align_corners=False)
    # Border padding: a rotated crop repeats the edge (air/background) instead of inventing black corners.
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    views = views * gain.to(device, dtype)[:, None, None, None] + offset.to(device, dtype)[:, None, None, None]
    views = views + noise.to(device, dtype) * noise_std.to(device, dtype)[:, None, None, None]
    return views.clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------------- findings


def finding_signature(findings_json: str | None, anatomy: str | None = None) -> tuple | None:
    """The identity of a sample's findings for "finding agreement": its anatomy and the set of ``(type, side, lobe)``.

    ``findings_json`` is the dataset's ``findings`` column: a JSON list of dicts, each with a ``type`` and
    optional attributes. Only ``type`` and the identity attributes ``side`` and ``lobe`` count (missing ->
    ``None``); size, severity, midline-shift direction and phrasing do not. A normal study (empty list, or only
    ``{"type": "normal"}``) has an empty set. The anatomy is part of the signature so a normal chest never
    "agrees" with a normal head. Two samples agree when their signatures are equal; ``None`` (no ground
    truth) never agrees.
    """
    if findings_json is None:
        return None
    items = json.loads(findings_json)
    findings = frozenset(
        (item["type"], *(item.get(attr) for attr in FINDING_IDENTITY_ATTRIBUTES))
        for item in items
        if item.get("type") != "normal"
    )
    return anatomy, findings


# ------------------------------------------------------------------------------------------- data


class AlignmentData:
    """A split of the canonical dataset, served batch by batch in the model range.

    Images are read lazily per batch (numpy format, only the columns asked for) and mapped to ``[-1, 1]`` by
    the modality registry. Presence masks come from Arrow nulls once, so a batch never touches missing images.
    """

    def __init__(self, split, image_keys: Sequence[str]):
        self.split = split
        self.image_keys = list(image_keys)
        self.present = {
            key: ~np.asarray(split.data.column(key).is_null().to_numpy(zero_copy_only=False)) for key in self.image_keys
        }
        self.present["text"] = ~np.asarray(split.data.column("report").is_null().to_numpy(zero_copy_only=False))
        self.reports = list(split["report"])
        self.findings = list(split["findings"])
        self.anatomy = list(split["anatomy"])
        # What each row's report says, for the soft (label-aware) InfoNCE targets: read from the text by the
        # rule-based labeller, never from the phantoms' ground-truth findings, so real data gets them too.
        self.soft_keys = [
            None if report is None else (anatomy, label_report_with_attributes(report))
            for report, anatomy in zip(self.reports, self.anatomy)
        ]
        self._numpy_views = {key: split.with_format("numpy", columns=[key]) for key in self.image_keys}

    def __len__(self) -> int:
        return self.split.num_rows

    def images(self, key: str, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(present (len(indices),) bool, images (n_present, 1, H, W) in [-1, 1])`` for one modality."""
        indices = np.asarray(indices, dtype=np.int64)
        mask = self.present[key][indices]
        rows = indices[mask].tolist()
        if not rows:
            return torch.from_numpy(mask), torch.empty(0)
        arrays = self._numpy_views[key][rows][key]
        images = to_model_range(torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32)), key).unsqueeze(1)
        return torch.from_numpy(mask), images


def load_tokenizer(args, output_root: Path, output_dir: Path, cfg: dict, train_reports: list[str]) -> PreTrainedTokenizerBase:
    """MiniLM's own tokenizer for ``text_backbone: minilm``; otherwise the project's report tokenizer.

    The report tokenizer comes from ``--tokenizer``, else ``<output_root>/tokenizer`` (stage 0), else it is
    trained here on the training reports and saved in ``<output_dir>/tokenizer`` so this stage runs alone.
    """
    if cfg.get("text_backbone", "scratch") == "minilm":
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
        tokenizer.save_pretrained(str(output_dir / "tokenizer"))
        return tokenizer
    path = Path(args.tokenizer) if args.tokenizer else output_root / "tokenizer"
    if path.is_dir():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    if args.tokenizer:
        raise FileNotFoundError(f"--tokenizer {args.tokenizer!r} is not a tokenizer folder")
    logger.info("no tokenizer at %s: training one on %d training reports", path, len(train_reports))
    tokenizer = train_report_tokenizer(train_reports, vocab_size=cfg["tokenizer_vocab_size"])
    tokenizer.save_pretrained(str(output_dir / "tokenizer"))
    return tokenizer


def build_model(cfg: dict, tokenizer: PreTrainedTokenizerBase, sample_size: int) -> MedM2GPromptEncoders:
    model_kwargs = dict(cfg.get("model", {}))
    model_kwargs["sample_size"] = sample_size
    if cfg.get("text_backbone", "scratch") == "minilm":
        # The YAML's text_* keys shape a scratch encoder; MiniLM brings its own shape.
        dropped = {k: model_kwargs.pop(k) for k in MINILM_TEXT_KEYS if k in model_kwargs}
        if dropped:
            logger.info("text_backbone: minilm: ignoring the scratch text encoder's %s", sorted(dropped))
        return MedM2GPromptEncoders.from_minilm(**model_kwargs)
    return MedM2GPromptEncoders(
        text_vocab_size=len(tokenizer), text_pad_token_id=tokenizer.pad_token_id, text_backbone="scratch", **model_kwargs
    )


# ------------------------------------------------------------------------------------------- rounds


def build_rounds(cfg: dict, pairwise: bool, max_train_steps: int | None) -> list[dict]:
    """The schedule: a list of ``{name, pairs, trainable, steps, start}``.

    ``--pairwise`` gives one round over all six pairs with everything trainable and the central schedule's
    total step count (the same budget). ``max_train_steps`` rescales every round proportionally (each keeps
    at least one step), so a short run still visits every round.
    """
    rounds = [dict(r) for r in cfg["rounds"]]
    for r in rounds:
        for key in ("name", "pairs", "trainable", "steps"):
            if key not in r:
                raise ValueError(f"every entry of alignment.rounds needs {key!r}; got {r}")
        if any(len(p) != 2 for p in r["pairs"]):
            raise ValueError(f"alignment.rounds[{r['name']!r}].pairs must be pairs of families; got {r['pairs']}")
    total = sum(int(r["steps"]) for r in rounds)
    if pairwise:
        pairs = [[a, b] for i, a in enumerate(PAIRWISE_FAMILIES) for b in PAIRWISE_FAMILIES[i + 1 :]]
        rounds = [{"name": "pairwise", "pairs": pairs, "trainable": list(PAIRWISE_FAMILIES), "steps": total}]
    if max_train_steps is not None:
        if max_train_steps < len(rounds):
            raise ValueError(f"max_train_steps must be at least the number of rounds ({len(rounds)}); got {max_train_steps}")
        scaled = [max(1, int(round(r["steps"] * max_train_steps / total))) for r in rounds]
        scaled[-1] = max(1, max_train_steps - sum(scaled[:-1]))
        for r, steps in zip(rounds, scaled):
            r["steps"] = steps
    start = 0
    for r in rounds:
        r["start"] = start
        start += int(r["steps"])
    return rounds


def build_optimizer(cfg: dict, model: MedM2GPromptEncoders) -> torch.optim.AdamW:
    """AdamW with two parameter groups: the text encoder at ``text_learning_rate`` (a pretrained MiniLM wants a
    smaller one; ``None`` means ``learning_rate``) and every other parameter at ``learning_rate``."""
    text_params = list(model.text_encoder.parameters()) if model.text_encoder is not None else []
    text_ids = {id(p) for p in text_params}
    other_params = [p for p in model.parameters() if id(p) not in text_ids]
    return torch.optim.AdamW(
        [
            {"params": text_params, "lr": float(cfg.get("text_learning_rate") or cfg["learning_rate"])},
            {"params": other_params, "lr": float(cfg["learning_rate"])},
        ],
        weight_decay=float(cfg["adam_weight_decay"]),
    )


def set_trainable(model: MedM2GPromptEncoders, trainable: Sequence[str]) -> None:
    """Freezes every family not in ``trainable``; the temperature always trains (retrieval ranks ignore it)."""
    unknown = [f for f in trainable if f not in model.families]
    if unknown:
        raise ValueError(f"trainable families {unknown} are not in the model's families {model.families}")
    for family in model.families:
        for parameter in model.family_parameters(family):
            parameter.requires_grad_(family in trainable)
    model.logit_scale.requires_grad_(True)


# ------------------------------------------------------------------------------------------- one step


def modality_for(family: str, contrast_key: str) -> str:
    """The registry key a family is encoded as in this step (MRI: the step's drawn contrast)."""
    return contrast_key if family == "mri" else modalities_of_family(family)[0]


def alignment_step(
    model,
    data: AlignmentData,
    tokenizer: PreTrainedTokenizerBase,
    indices: Sequence[int],
    round_: dict,
    generator: torch.Generator,
    cfg: dict,
    use_vi: bool,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one step: InfoNCE over the round's pairs + ``vi_weight`` x Barlow Twins per trainable image family.

    Images enter InfoNCE as one augmented view; with VI, the first ``vi_batch_size`` rows of a family also get
    a second view, and Barlow Twins compares the two views' projections.

    Each family of the round is encoded once per step on the batch rows that have it; a pair uses the rows
    that have both. Frozen families are encoded without gradients. Returns ``(loss, parts)`` where ``parts``
    holds the float value of each term for logging.
    """
    unwrapped = model.module if hasattr(model, "module") else model
    mri_keys = unwrapped.modality_keys("mri") if "mri" in unwrapped.families else modalities_of_family("mri")
    contrast_key = mri_keys[int(torch.randint(len(mri_keys), (1,), generator=generator))]
    families = list(dict.fromkeys(f for pair in round_["pairs"] for f in pair))
    batch_size = len(indices)
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    vi_terms: list[torch.Tensor] = []
    parts: dict[str, float] = {}
    for family in families:
        key = modality_for(family, contrast_key)
        trainable = family in round_["trainable"]
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            if family == TEXT_FAMILY:
                mask = torch.from_numpy(data.present["text"][np.asarray(indices)])
                texts = [data.reports[i] for i, m in zip(indices, mask.tolist()) if m]
                inputs = tokenizer(texts, padding="longest", truncation=True, max_length=cfg["max_text_length"], return_tensors="pt")
                pooled = model(key, {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}).pooled
            else:
                mask, images = data.images(key, indices)
                if int(mask.sum()) < 2:
                    continue
                images = images.to(device)
                view = augment_images(images, generator, cfg["augment"])
                if use_vi and trainable:
                    # The first view feeds InfoNCE too; only the first vi_batch_size rows get a second view
                    # (the batch is already shuffled), which keeps VI's extra cost to a fraction of a step.
                    output, z1 = model(key, view, return_barlow_twins=True)
                    rows = min(int(cfg["vi_batch_size"]), images.shape[0])
                    _, z2 = model(key, augment_images(images[:rows], generator, cfg["augment"]), return_barlow_twins=True)
                    term = barlow_twins_loss(z1[:rows], z2, cfg["barlow_twins_lambda"])
                    vi_terms.append(term)
                    parts[f"vi_{family}"] = float(term.detach())
                else:
                    output = model(key, view)
                pooled = output.pooled
        full = pooled.new_zeros(batch_size, pooled.shape[-1])
        full[mask.to(device)] = pooled
        embeddings[family] = (mask.to(device), full)

    logit_scale = unwrapped.logit_scale_value()
    soft_weight = float(cfg.get("soft_targets", 0.0))
    pair_terms = []
    for a, b in round_["pairs"]:
        if a not in embeddings or b not in embeddings:
            continue
        both = embeddings[a][0] & embeddings[b][0]
        if int(both.sum()) < 2:
            continue
        targets = None
        if soft_weight > 0:
            rows = [i for i, keep in zip(indices, both.tolist()) if keep]
            targets = soft_target_matrix([data.soft_keys[i] for i in rows], soft_weight, device)
        term = contrastive_loss(embeddings[a][1][both], embeddings[b][1][both], logit_scale, targets)
        pair_terms.append(term)
        parts[f"nce_{a}_{b}"] = float(term.detach())
    if not pair_terms:
        raise ValueError(f"batch of step has no rows with both modalities of any pair in round {round_['name']!r}; raise train_batch_size")
    loss = torch.stack(pair_terms).mean()
    if vi_terms:
        loss = loss + cfg["vi_weight"] * torch.stack(vi_terms).mean()
    parts["loss"] = float(loss.detach())
    return loss, parts


# ------------------------------------------------------------------------------------------- retrieval


@torch.no_grad()
def compute_embeddings(
    model: MedM2GPromptEncoders,
    data: AlignmentData,
    tokenizer: PreTrainedTokenizerBase,
    families: Sequence[str],
    max_text_length: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> dict[str, list[tuple[np.ndarray, torch.Tensor]]]:
    """Pooled embeddings of every sample, per family: a list of ``(present mask, (n_present, d))``, one per
    modality of the family (MRI: one per contrast), on clean (un-augmented) inputs."""
    model.eval()
    out: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = {}
    n = len(data)
    for family in families:
        keys = ["text"] if family == TEXT_FAMILY else model.modality_keys(family)
        out[family] = []
        for key in keys:
            present = data.present[key]
            chunks = []
            for start in range(0, n, batch_size):
                indices = list(range(start, min(n, start + batch_size)))
                if key == "text":
                    texts = [data.reports[i] for i in indices if present[i]]
                    if not texts:
                        continue
                    inputs = tokenizer(texts, padding="longest", truncation=True, max_length=max_text_length, return_tensors="pt")
                    chunks.append(model.encode(key, {k: inputs[k].to(device) for k in ("input_ids", "attention_mask")}).pooled.cpu())
                else:
                    mask, images = data.images(key, indices)
                    if int(mask.sum()):
                        chunks.append(model.encode(key, images.to(device)).pooled.cpu())
            out[family].append((present, torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim)))
    return out


def retrieval_metrics(
    query: torch.Tensor, gallery: torch.Tensor, signatures: Sequence[tuple | None], ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Query ``i``'s positive is gallery row ``i``.

    Returns ``recall@k`` (positive among the top k by cosine), ``finding_agreement`` (the top-1 hit's
    :func:`finding_signature` equals the query's) and ``finding_agreement_chance`` (the agreement of a random
    pairing: for each query, the fraction of the gallery with the same signature, averaged).
    """
    similarity = query @ gallery.t()
    n = similarity.shape[0]
    ranking = similarity.argsort(dim=1, descending=True)
    target = torch.arange(n)[:, None]
    metrics = {f"recall@{k}": float((ranking[:, :k] == target).any(1).float().mean()) for k in ks}
    top1 = ranking[:, 0].tolist()
    agree = [signatures[i] is not None and signatures[i] == signatures[j] for i, j in enumerate(top1)]
    metrics["finding_agreement"] = float(np.mean(agree))
    groups: dict[tuple, int] = {}
    for s in signatures:
        if s is not None:
            groups[s] = groups.get(s, 0) + 1
    metrics["finding_agreement_chance"] = float(np.mean([groups.get(s, 0) / n if s is not None else 0.0 for s in signatures]))
    metrics["n"] = n
    return metrics


def evaluate_retrieval(
    model: MedM2GPromptEncoders,
    data: AlignmentData,
    tokenizer: PreTrainedTokenizerBase,
    max_text_length: int,
    pairs: Sequence[tuple[str, str]] = RETRIEVAL_PAIRS,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Recall@1/@5 and top-1 finding agreement for every pair, both directions, averaged in ``"mean"``.

    The gallery of a pair is the samples that have both modalities. MRI numbers average the four contrasts
    (each contrast is retrieved and scored on its own).
    """
    families = sorted({f for pair in pairs for f in pair if f in model.families})
    embeddings = compute_embeddings(model, data, tokenizer, families, max_text_length, device=device)
    signatures = [finding_signature(f, a) for f, a in zip(data.findings, data.anatomy)]
    results: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        if a not in embeddings or b not in embeddings:
            continue
        per_direction: dict[str, list[dict[str, float]]] = {f"{a}->{b}": [], f"{b}->{a}": []}
        for present_a, emb_a in embeddings[a]:
            for present_b, emb_b in embeddings[b]:
                both = present_a & present_b
                if both.sum() < 2:
                    continue
                # Row positions of the shared samples inside each modality's present-only embedding matrix.
                qa = emb_a[np.cumsum(present_a)[both] - 1]
                qb = emb_b[np.cumsum(present_b)[both] - 1]
                sig = [s for s, keep in zip(signatures, both) if keep]
                per_direction[f"{a}->{b}"].append(retrieval_metrics(qa, qb, sig))
                per_direction[f"{b}->{a}"].append(retrieval_metrics(qb, qa, sig))
        if not per_direction[f"{a}->{b}"]:
            continue
        entry: dict[str, Any] = {}
        for direction, runs in per_direction.items():
            entry[direction] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        entry["mean"] = {k: float(np.mean([entry[d][k] for d in per_direction])) for k in entry[f"{a}->{b}"]}
        results[f"{a}-{b}"] = entry
    return results


def format_retrieval(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| pair | R@1 | R@5 | top-1 finding agreement | chance | n |", "|---|---|---|---|---|---|"]
    for pair, entry in results.items():
        m = entry["mean"]
        lines.append(
            f"| {pair} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['finding_agreement']:.3f} | "
            f"{m['finding_agreement_chance']:.3f} | {int(m['n'])} |"
        )
    return "\n".join(lines)


def log_validation(model, data: AlignmentData, tokenizer, cfg: dict, accelerator: Accelerator, step: int, round_name: str) -> dict:
    """Retrieval on the validation split (main process), logged; main() also writes it to ``validation.json``."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    results = evaluate_retrieval(unwrapped, data, tokenizer, cfg["max_text_length"], device=accelerator.device)
    unwrapped.train(was_training)
    logger.info("validation after round %r (step %d):\n%s", round_name, step, format_retrieval(results))
    return results


# ------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs stage 1 and returns ``{"losses": {step: loss}, "validation": {round: metrics}, "train_wall_time_s": float}``."""
    args = parse_args(argv)
    config = load_config(args.config, args.set)
    cfg = stage_config(config, SECTION)
    data_cfg = config.get("data", {})
    seed = args.seed if args.seed is not None else int(cfg.get("seed", 0))
    output_root = Path(config.get("output_root", "runs/tiny"))
    output_dir = Path(args.output_dir) if args.output_dir else output_root / SECTION
    model_dir = output_root / "prompt_encoders"
    dataset_path = Path(args.dataset or data_cfg["dataset"])
    use_vi = not args.no_vi

    # Some parameters are unused in a step (a batch without chest rows has no X-ray; frozen families), so
    # DDP must look for unused parameters.
    accelerator = Accelerator(
        mixed_precision=cfg.get("mixed_precision", "no"),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        step_scheduler_with_optimizer=False,  # the round schedules count optimizer steps, not steps x processes
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(seed)  # model initialisation only; training randomness comes from step_generator
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    dataset = load_medm2g_dataset(dataset_path)
    image_keys = [k for f in ("xray", "ct", "mri") for k in modalities_of_family(f)]
    train_data = AlignmentData(dataset["train"], image_keys)
    validation_split = dataset["validation"]
    if cfg.get("validation_max_samples"):
        validation_split = validation_split.select(range(min(validation_split.num_rows, int(cfg["validation_max_samples"]))))
    validation_data = AlignmentData(validation_split, image_keys)

    tokenizer = load_tokenizer(args, output_root, output_dir, cfg, [r for r in train_data.reports if r])
    sample_size = int(data_cfg.get("size", 64))
    # channels_last roughly halves the time of these small-channel convolutions on CPU (and suits GPUs);
    # it changes the memory layout only, and save_pretrained/load_state keep working.
    model = build_model(cfg, tokenizer, sample_size).to(memory_format=torch.channels_last)

    rounds = build_rounds(cfg, args.pairwise, args.max_train_steps)
    total_steps = rounds[-1]["start"] + rounds[-1]["steps"]
    optimizer = build_optimizer(cfg, model)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(rounds, int(cfg["lr_warmup_steps"])))
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    global_step = 0
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        global_step = checkpoint_step(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, global_step)
    elif args.resume_from_checkpoint is not None:
        logger.info("no checkpoint in %s: starting a new run", output_dir)

    # The sampler already draws per (seed, step, process_index), so the loader is not passed through
    # accelerator.prepare (which would shard it a second time).
    sampler = StepBatchSampler(
        len(train_data), int(cfg["train_batch_size"]), seed, total_steps, global_step, accelerator.process_index
    )
    progress = tqdm(total=total_steps, initial=global_step, desc="alignment", disable=not accelerator.is_local_main_process)
    log_path = output_dir / "train_log.jsonl"
    losses: dict[int, float] = {}
    validation: dict[str, Any] = {}
    validation_path = output_dir / "validation.json"
    if validation_path.is_file():
        validation = json.loads(validation_path.read_text())
    train_time = 0.0
    current_round = None
    model.train()
    for step, indices in zip(range(global_step, total_steps), sampler):
        round_ = round_at(rounds, step)
        if current_round is not round_:
            set_trainable(accelerator.unwrap_model(model), round_["trainable"])
            current_round = round_
        started = time.perf_counter()
        generator = step_generator(seed, step, accelerator.process_index, SALT_AUGMENT)
        loss, parts = alignment_step(model, train_data, tokenizer, indices, round_, generator, cfg, use_vi, accelerator.device)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.get("max_grad_norm"):
            accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float(cfg["max_grad_norm"]))
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - started
        global_step = step + 1
        losses[step] = parts["loss"]
        progress.update(1)
        progress.set_postfix(loss=f"{parts['loss']:.4f}", round=round_["name"])
        if accelerator.is_main_process:
            with log_path.open("a") as handle:
                handle.write(json.dumps({"step": step, "round": round_["name"], **parts}) + "\n")

        if global_step % int(cfg["checkpointing_steps"]) == 0 and global_step < total_steps:
            save_checkpoint(accelerator, output_dir, global_step, keep=cfg.get("checkpoints_total_limit"))
        if global_step == round_["start"] + round_["steps"] and accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            atomic_save_pretrained(unwrapped, output_dir / "rounds" / round_["name"])
            validation[round_["name"]] = {
                "step": global_step,
                "metrics": log_validation(model, validation_data, tokenizer, cfg, accelerator, global_step, round_["name"]),
            }
            atomic_write_text(validation_path, json.dumps(validation, indent=2))
    progress.close()

    save_checkpoint(accelerator, output_dir, global_step, keep=cfg.get("checkpoints_total_limit"))
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_pretrained(unwrapped, model_dir)
        logger.info("saved the prompt encoders to %s", model_dir)
    accelerator.end_training()
    return {"losses": losses, "validation": validation, "train_wall_time_s": train_time, "model_dir": str(model_dir)}


if __name__ == "__main__":
    main()
