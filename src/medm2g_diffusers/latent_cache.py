"""The frozen-encoder cache of a dataset split: latents and prompt-encoder tokens computed once before training.

Stage 3 (``training/train_multiflow.py``) and fine-tuning (``training/finetune_lora.py``) train only denoisers
(or adapters on them); the image VAE, the text VAE and the prompt encoders are frozen, so every row is encoded
once. Image latents keep the posterior's mean and std, so :func:`draw_latent` samples exactly what an uncached
step would encode. Missing modalities are zeros with ``present`` False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .modalities import to_model_range
from .single_flow import Condition

ENCODE_CHUNK = 128


@dataclass
class EncodedSplit:
    """Frozen-encoder outputs for every row of a split (missing modalities are zeros with ``present`` False).

    latent_mean, latent_std: key -> `(n, C, h, w)`, scaled by the VAE's factor; ``"text"`` -> `(n, D, 1, 1)`
    (std 0). tokens: key -> `(n, N, d)` prompt-encoder tokens; text_mask `(n, L)` masks the report tokens.
    """

    present: dict[str, torch.Tensor]
    latent_mean: dict[str, torch.Tensor]
    latent_std: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]
    text_mask: torch.Tensor

    @property
    def num_rows(self) -> int:
        return len(self.text_mask)


def _present(split, key: str) -> np.ndarray:
    return ~np.asarray(split.data.column(key).is_null().to_numpy(zero_copy_only=False))


@torch.no_grad()
def encode_split(split, components: dict[str, Any], keys: list[str], max_text_tokens: int, device) -> EncodedSplit:
    """Runs the VAE, text VAE and prompt encoders once over ``split`` (the training cache)."""
    vae, text_vae = components["vae"], components["text_vae"]
    prompt_encoders, tokenizer = components["prompt_encoders"], components["tokenizer"]
    n = split.num_rows
    present = {key: torch.from_numpy(_present(split, key)) for key in keys}
    present["text"] = torch.from_numpy(_present(split, "report"))
    mean, std, tokens = {}, {}, {}
    reports = [r or "" for r in split["report"]]
    numpy_split = split.with_format("numpy")
    text_tokens, text_masks, text_latents = [], [], []
    for start in range(0, n, ENCODE_CHUNK):
        rows = list(range(start, min(n, start + ENCODE_CHUNK)))
        batch = tokenizer([reports[r] for r in rows], padding="max_length", truncation=True, max_length=max_text_tokens, return_tensors="pt")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        text_tokens.append(prompt_encoders.encode("text", {"input_ids": ids, "attention_mask": mask}).tokens.cpu())
        text_masks.append(mask.cpu())
        vae_batch = tokenizer([reports[r] for r in rows], padding="longest", truncation=True,
                              max_length=text_vae.config.max_position_embeddings, return_tensors="pt")
        latent = text_vae.encode(vae_batch["input_ids"].to(device), vae_batch["attention_mask"].to(device)).latent
        text_latents.append((latent * text_vae.config.scaling_factor)[:, :, None, None].cpu())
    tokens["text"], text_mask = torch.cat(text_tokens), torch.cat(text_masks)
    mean["text"] = torch.cat(text_latents)
    std["text"] = torch.zeros_like(mean["text"])
    for key in keys:
        rows = np.flatnonzero(present[key].numpy())
        parts_mean, parts_std, parts_tokens = [], [], []
        for start in range(0, len(rows), ENCODE_CHUNK):
            chunk = rows[start : start + ENCODE_CHUNK].tolist()
            native = torch.from_numpy(np.asarray(numpy_split.select(chunk)[key], dtype=np.float32))
            images = to_model_range(native, key).unsqueeze(1).to(device)
            posterior = vae.encode(images).latent_dist
            parts_mean.append((posterior.mean * vae.config.scaling_factor).cpu())
            parts_std.append((posterior.std * vae.config.scaling_factor).cpu())
            parts_tokens.append(prompt_encoders.encode(key, images).tokens.cpu())
        if not len(rows):
            continue
        first_mean, first_tokens = parts_mean[0], parts_tokens[0]
        mean[key] = first_mean.new_zeros((n, *first_mean.shape[1:]))
        std[key] = torch.zeros_like(mean[key])
        tokens[key] = first_tokens.new_zeros((n, *first_tokens.shape[1:]))
        index = torch.from_numpy(rows)
        mean[key][index], std[key][index], tokens[key][index] = torch.cat(parts_mean), torch.cat(parts_std), torch.cat(parts_tokens)
    return EncodedSplit(present, mean, std, tokens, text_mask)



def all_present(data: EncodedSplit, keys: list[str]) -> torch.Tensor:
    present = torch.ones(data.num_rows, dtype=torch.bool)
    for key in keys:
        present &= data.present.get(key, torch.zeros(data.num_rows, dtype=torch.bool))
    return present



def draw_latent(data: EncodedSplit, key: str, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A sample of the VAE posterior (exactly what an uncached step would encode)."""
    mean, std = data.latent_mean[key][rows], data.latent_std[key][rows]
    return mean + std * torch.randn(mean.shape, generator=generator)


def null_condition(batch: int, dim: int) -> Condition:
    return Condition(torch.zeros(batch, 1, dim), torch.ones(batch, 1, dtype=torch.long))


def report_condition(data: EncodedSplit, rows: torch.Tensor, keep: torch.Tensor) -> Condition:
    """The report tokens, dropped to the null condition where ``keep`` is False (or the row has no report)."""
    keep = keep & data.present["text"][rows]
    return Condition(data.tokens["text"][rows], data.text_mask[rows]).drop(keep)


def composite_condition(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Condition:
    """Concatenates ``(tokens, mask)`` parts along the tokens; a row with nothing left gets the null condition
    (one zero token, unmasked), as in single-flow training."""
    tokens = torch.cat([t * m.unsqueeze(-1).to(t.dtype) for t, m in parts], dim=1)
    mask = torch.cat([m.long() for _, m in parts], dim=1)
    empty = mask.sum(1) == 0
    mask[empty, 0] = 1
    return Condition(tokens, mask)
