"""Loaders: LoRA adapters for `MedM2GPipeline` (`MedM2GLoraLoaderMixin`)."""

from .lora import MedM2GLoraLoaderMixin, is_lora_folder, lora_target_modules, read_lora_metadata

__all__ = ["MedM2GLoraLoaderMixin", "is_lora_folder", "lora_target_modules", "read_lora_metadata"]
