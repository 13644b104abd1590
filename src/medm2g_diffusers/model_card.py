"""The Hub model card of a MedM2G checkpoint, filled from ``medm2g evaluate``'s JSON by code, never by hand.

    python scripts/write_model_card.py --results docs/results/benchmark.json --out model_cards/medm2g-tiny.md
"""

from __future__ import annotations

from typing import Any

from .evaluation.benchmark_tables import markdown_tables

MODEL_CARD_TEMPLATE = """---
{metadata}
---

# {name}

A tiny **MedM2G** (Zhan et al., CVPR 2024) checkpoint for `medm2g-diffusers`:
one diffusion framework that generates radiology reports, chest X-rays, CT and brain MRI (T1, T2, PD, FLAIR)
from one another, at 64 x 64 pixels. It was trained on a 2-core CPU from nothing but the package's virtual
patients (and real report text for the tokenizer), to prove the machinery and to let anyone run every
direction offline in seconds. It is a demonstration and a starting point for fine-tuning, not a medical model.

> **Not for clinical use.** Every image and report it produces is synthetic. Do not use its outputs for
> diagnosis, treatment, triage or as evidence of any patient's condition.

## How to use

```python
import torch
from medm2g_diffusers import MedM2GPipeline

pipe = MedM2GPipeline.from_pretrained("{name}")  # bundled with the repository; loads offline
out = pipe("Large right pleural effusion. The heart is enlarged.", targets=["xray", "ct"], generator=torch.manual_seed(0))
report = pipe(conditions={{"xray": out.images["xray"][0]}}, targets=["text"]).text[0]
```

or `medm2g generate --prompt "..." --targets xray ct`.

## Intended use

- Learning and testing MedM2G's any-to-any generation: text -> image (one or several modalities jointly),
  image -> report, MRI -> CT, CT -> X-ray and MRI contrast synthesis.
- A base for fine-tuning on a user's own paired data: LoRA adapters, a full fine-tune or the same denoisers from scratch (`training/finetune_lora.py`, `docs/results/real-data.md`).
- Benchmarks and software tests that need a real, small, deterministic generator.

Out of scope: any clinical or diagnostic use; generating images to pass off as real patient data; training
data for clinical models without independent validation.

## Training data

{training_data}

## Training procedure

{training_procedure}

## Evaluation

Every number below comes from one command, `medm2g evaluate`, on held-out phantom patients (its JSON is the
source of this card; protocols are stated under each table).

{tables}

## Limitations and risks

- **Phantoms are not patients.** The model has only seen simplified virtual anatomy at 64 px; it knows
  nothing of real pathology, scanners or demographics, and its images are far from diagnostic quality.
- **Fabricated medical images.** The MedM2G paper warns that realistic generated medical images can be
  misused as fabricated evidence. Our answer is provenance: every PNG carries `medm2g:*` text chunks
  (`synthetic`, the model, the task, the seed), every DICOM is a Secondary Capture with
  `DERIVED\\SECONDARY`, a "SYNTHETIC" series description and a private provenance tag, every NIfTI a
  provenance extension, and report files written by `medm2g generate` start with "SYNTHETIC REPORT" (in
  Python, `output.provenance` travels with every result). Metadata can be stripped; do not
  treat its absence as proof that an image is real.
- **Reports** come from a small text VAE: fluent phantom-style sentences that often miss findings (see the
  report table). Never read them as a description of an input image without checking it.
- Scores on the phantom benchmark do not transfer to real data; fine-tune and evaluate on your own
  held-out data (`medm2g evaluate --data DIR`).

## Citation

```bibtex
@inproceedings{{zhan2024medm2g,
  title     = {{MedM2G: Unifying Medical Multi-Modal Generation via Cross-Guided Diffusion with Visual Invariant}},
  author    = {{Zhan, Chenlu and others}},
  booktitle = {{CVPR}},
  year      = {{2024}}
}}
```
"""


def _yaml_metadata(name: str, results: dict[str, Any]) -> str:
    lines = [
        "license: apache-2.0",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags:",
        *[f"  - {tag}" for tag in ("medical-imaging", "medm2g", "diffusion", "multimodal", "synthetic-data",
                                   "not-for-clinical-use", "radiology-report-generation")],
        "model-index:",
        f"  - name: {name}",
        "    results:",
    ]
    report = results["report_generation"].get(results["model"])
    if report:
        lines += ["      - task: {type: image-to-text, name: X-ray -> report}",
                  "        dataset: {type: medm2g-phantoms, name: virtual patients (held-out test split)}",
                  "        metrics:",
                  *[f"          - {{type: bleu, name: BLEU-{n}, value: {report[f'bleu_{n}']:.4f}}}" for n in (1, 4)],
                  f"          - {{type: rouge, name: ROUGE-L, value: {report['rouge_l']:.4f}}}",
                  f"          - {{type: f1, name: finding F1 (micro), value: {report['finding']['micro_f1']:.4f}}}"]
    for task, entry in results["image_to_image"].items():
        scores = entry.get(results["model"])
        if scores:
            lines += [f"      - task: {{type: image-to-image, name: {task}}}",
                      "        dataset: {type: medm2g-phantoms, name: virtual patients (held-out test split)}",
                      "        metrics:",
                      f"          - {{type: psnr, name: PSNR (dB), value: {scores['psnr_mean']:.3f}}}",
                      f"          - {{type: ssim, name: SSIM, value: {scores['ssim_mean']:.4f}}}"]
    return "\n".join(lines)


def model_card_markdown(name: str, results: dict[str, Any], training_record: dict[str, Any] | None = None) -> str:
    """The model card (YAML metadata + Markdown) of checkpoint ``name`` from a ``medm2g evaluate`` results dict.

    Args:
        name: the checkpoint's name (``medm2g-tiny``).
        results: what :func:`~medm2g_diffusers.evaluation.benchmark.run_benchmark` returned (or its JSON).
        training_record: the checkpoint's ``training_record.json`` (source folder, stored dtype, ``recipe``: stage ->
            wall seconds, ``notes``: how the stages were run when not by one run of the recipe).
    """
    for key in ("model", "report_generation", "text_to_image", "image_to_image", "joint", "augmentation"):  # every task
        if key not in results:
            raise ValueError(f"results must be a `medm2g evaluate` results dict; it has no {key!r}")
    record = training_record or {}
    training_data = (
        "- **Images and reports**: 4,000 virtual patients from `medm2g phantoms --n 4000 --seed 0 --size 64` "
        "(chest and head; co-registered X-ray, CT, MRI T1/T2/PD/FLAIR; structured findings and reports), split "
        "by patient 80/10/10. No real patient image was used.\n"
        "- **Tokenizer**: the phantom reports plus the public Indiana University chest X-ray report text "
        "(`../shared/data/iu-xray-reports`, de-identified, used only to train the tokenizer's vocabulary)."
    )
    recipe = record.get("recipe")
    procedure = [
        "The recipe is `training/recipes/tiny.sh` with `training/configs/tiny.yaml`, every stage in order on a 2-core CPU:",
        "stage 0 (tokenizer, image AutoencoderKL, Optimus-style text VAE), stage 1 (prompt encoders, central "
        "alignment with text as the hub + visual invariant), stage 2 (single-flow LDMs, v-prediction), stage 3 "
        "(cross-guided multi-flow rounds text-xray, text-ct, ct-mri and the image -> image source slots).",
        f"Weights are stored as {record.get('stored_dtype', 'float16')} safetensors and load as float32.",
    ]
    if recipe:
        bad = {k: v for k, v in recipe.items() if not isinstance(v, (int, float))}
        if bad:
            raise ValueError(f"training_record['recipe'] maps each stage to its wall time in seconds; got {bad}")
        procedure.append("Wall time per stage: " + ", ".join(f"{k} {v / 60:.0f} min" for k, v in recipe.items()) + ".")
    if record.get("notes"):
        procedure += ["", "How this checkpoint was trained:", "", *(f"- {note}" for note in record["notes"])]
    if not recipe:
        procedure.append("The stages were run one by one; their wall times are in `docs/results/stages.md` and "
                         "`docs/results/multiflow.md` (together well over 90 minutes on this machine).")
    return MODEL_CARD_TEMPLATE.format(
        metadata=_yaml_metadata(name, results), name=name, training_data=training_data,
        training_procedure="\n".join(procedure), tables=markdown_tables(results),
    )
