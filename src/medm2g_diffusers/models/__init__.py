"""MedM2G models: every one a diffusers ``ModelMixin, ConfigMixin`` that saves as safetensors."""

from .attention_processor import CrossGuidedAttnProcessor2_0, GuidanceAwareAttnProcessor2_0
from .context_encoder import ContextEncoder
from .multiflow import MedM2GMultiFlowModel
from .prompt_encoders import MedM2GPromptEncoders, PromptEncoderOutput
from .text_unet import MedM2GTextUNet
from .text_vae import MedM2GTextVAE, TextVAEEncoderOutput, TextVAEOutput

__all__ = [
    "ContextEncoder",
    "CrossGuidedAttnProcessor2_0",
    "GuidanceAwareAttnProcessor2_0",
    "MedM2GMultiFlowModel",
    "MedM2GPromptEncoders",
    "MedM2GTextUNet",
    "MedM2GTextVAE",
    "PromptEncoderOutput",
    "TextVAEEncoderOutput",
    "TextVAEOutput",
]
