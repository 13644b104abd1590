"""Pipelines: `MedM2GPipeline` (any-to-any generation), `MedM2GRegressionPipeline` (the image -> image regression
baseline) and their output."""

from .pipeline_medm2g import MedM2GPipeline
from .pipeline_output import MedM2GPipelineOutput
from .pipeline_regression import MedM2GRegressionPipeline

__all__ = ["MedM2GPipeline", "MedM2GPipelineOutput", "MedM2GRegressionPipeline"]
