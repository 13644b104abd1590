"""Evaluation: metrics and diagnostics behind `medm2g evaluate` and the scripts in `scripts/`."""

from .benchmark import TASKS, BenchmarkConfig, run_benchmark, save_results
from .benchmark_tables import markdown_tables
from .finding_classifier import (
    FindingExamples,
    MedM2GFindingClassifier,
    classifier_metrics,
    default_finding_types,
    default_input_windows,
    finding_examples,
    finding_labels,
    label_sets,
)
from .finding_labeller import (
    FINDING_TYPES,
    FindingMention,
    find_mentions,
    finding_f1,
    finding_types,
    label_report,
    label_report_with_attributes,
)
from .image_metrics import (
    DISPLAY_NORMALISATION,
    MS_SSIM_BETAS_64,
    frechet_distance,
    frechet_inception_distance,
    inception_features,
    ms_ssim_betas,
    ms_ssim_diversity,
    psnr_ssim,
)
from .report_metrics import clean_report_r2gen, report_generation_metrics
from .train_finding_classifier import ClassifierAugmentation, train_finding_classifier

__all__ = [
    "TASKS",
    "BenchmarkConfig",
    "run_benchmark",
    "save_results",
    "markdown_tables",
    "ms_ssim_betas",
    "DISPLAY_NORMALISATION",
    "FINDING_TYPES",
    "MS_SSIM_BETAS_64",
    "ClassifierAugmentation",
    "FindingExamples",
    "FindingMention",
    "MedM2GFindingClassifier",
    "classifier_metrics",
    "clean_report_r2gen",
    "default_finding_types",
    "default_input_windows",
    "find_mentions",
    "finding_examples",
    "finding_f1",
    "finding_labels",
    "finding_types",
    "frechet_distance",
    "frechet_inception_distance",
    "inception_features",
    "label_report",
    "label_report_with_attributes",
    "label_sets",
    "ms_ssim_diversity",
    "psnr_ssim",
    "report_generation_metrics",
    "train_finding_classifier",
]
