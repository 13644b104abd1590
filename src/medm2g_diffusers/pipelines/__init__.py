"""Pipelines: `MedM2GPipeline` (any-to-any generation) and its output."""

from .pipeline_medm2g import MedM2GPipeline
from .pipeline_output import MedM2GPipelineOutput

__all__ = ["MedM2GPipeline", "MedM2GPipelineOutput"]
