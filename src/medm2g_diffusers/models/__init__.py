"""MedM2G models: every one a diffusers ``ModelMixin, ConfigMixin`` that saves as safetensors."""

from .prompt_encoders import MedM2GPromptEncoders, PromptEncoderOutput
from .text_unet import MedM2GTextUNet
from .text_vae import MedM2GTextVAE, TextVAEEncoderOutput, TextVAEOutput

__all__ = [
    "MedM2GPromptEncoders",
    "MedM2GTextUNet",
    "MedM2GTextVAE",
    "PromptEncoderOutput",
    "TextVAEEncoderOutput",
    "TextVAEOutput",
]
