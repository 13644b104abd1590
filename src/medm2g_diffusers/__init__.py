"""medm2g-diffusers: MedM2G (CVPR 2024) on Hugging Face diffusers.

One diffusion framework that aligns, extracts and generates medical modalities (radiology reports,
chest X-ray, CT, MRI T1/T2/PD/FLAIR) in any direction.

The model classes are importable from the package root because diffusers' pipeline loader finds a
component's class as ``getattr(import_module(<library>), <class name>)``.
"""

__version__ = "0.1.0.dev0"

from .models import (  # noqa: E402
    ContextEncoder,
    MedM2GMultiFlowModel,
    MedM2GPromptEncoders,
    MedM2GTextUNet,
    MedM2GTextVAE,
)
from .pipelines import MedM2GPipeline, MedM2GPipelineOutput, MedM2GRegressionPipeline  # noqa: E402

__all__ = [
    "ContextEncoder",
    "MedM2GMultiFlowModel",
    "MedM2GPipeline",
    "MedM2GPipelineOutput",
    "MedM2GPromptEncoders",
    "MedM2GRegressionPipeline",
    "MedM2GTextUNet",
    "MedM2GTextVAE",
]
