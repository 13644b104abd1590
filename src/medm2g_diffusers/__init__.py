"""medm2g-diffusers: MedM2G (CVPR 2024) on Hugging Face diffusers.

One diffusion framework that aligns, extracts and generates medical modalities (radiology reports,
chest X-ray, CT, MRI T1/T2/PD/FLAIR) in any direction.
"""

__version__ = "0.1.0.dev0"
