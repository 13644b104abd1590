"""The denoiser of the text flow: an MLP-ResNet over text latents with the `UNet2DConditionModel` contract.

A text latent is a vector, not an image, so a convolutional UNet has nothing to convolve. Like Versatile
Diffusion's flat text UNet (whose diffusers code is deprecated and not imported here), the latent travels as
``(batch, text_latent_dim, 1, 1)`` so the pipeline and the multi-flow container treat every flow alike.

Each residual block is conditioned three ways, as measured in ``shared/notes/text-path.md``:

* FiLM (scale and shift) from the sum of the timestep embedding and the pooled condition tokens;
* cross-attention from the latent (one query token) to the condition tokens through a diffusers
  :class:`~diffusers.models.attention_processor.Attention`, so attention processors (MedM2G's cross-guided
  processors) can be swapped with :meth:`set_attn_processor` exactly as on a `UNet2DConditionModel`;
* the residual path itself, so a block starts close to the identity.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn


class TextResnetBlock(nn.Module):
    r"""Pre-norm MLP residual block with FiLM from an embedding, then residual cross-attention to condition tokens.

    Args:
        hidden_dim (`int`): width of the block.
        embedding_dim (`int`): width of the timestep + condition embedding driving FiLM.
        cross_attention_dim (`int`): width of the condition tokens.
        attention_head_dim (`int`): width of one attention head; ``hidden_dim`` must be a multiple of it.
        dropout (`float`): dropout inside the MLP.
    """

    def __init__(self, hidden_dim: int, embedding_dim: int, cross_attention_dim: int, attention_head_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.film = nn.Linear(embedding_dim, 2 * hidden_dim)
        self.linear1 = nn.Linear(hidden_dim, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden_dim, hidden_dim)
        self.act = nn.SiLU()
        self.norm_attn = nn.LayerNorm(hidden_dim)
        self.attn = Attention(
            query_dim=hidden_dim,
            cross_attention_dim=cross_attention_dim,
            heads=hidden_dim // attention_head_dim,
            dim_head=attention_head_dim,
            out_bias=True,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, hidden_dim)`)
            embedding (`torch.Tensor` of shape `(batch, embedding_dim)`)
            encoder_hidden_states (`torch.Tensor` of shape `(batch, tokens, cross_attention_dim)`)
            encoder_attention_mask (`torch.Tensor` of shape `(batch, 1, tokens)`, *optional*): additive bias.

        Returns:
            `torch.Tensor` of shape `(batch, hidden_dim)`.
        """
        scale, shift = self.film(self.act(embedding)).chunk(2, dim=-1)
        h = self.norm1(hidden_states) * (1 + scale) + shift
        h = self.linear1(self.act(h))
        h = self.linear2(self.dropout(self.act(self.norm2(h))))
        hidden_states = hidden_states + h

        query = self.norm_attn(hidden_states).unsqueeze(1)  # the latent is one query token
        attended = self.attn(
            query,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **(cross_attention_kwargs or {}),
        )
        return hidden_states + attended.squeeze(1)


class MedM2GTextUNet(ModelMixin, AttentionMixin, ConfigMixin):
    r"""Flat conditional denoiser for text latents, a drop-in for `UNet2DConditionModel` in the text flow.

    Args:
        in_channels (`int`, defaults to 64): the text latent dimension ``D``; samples are `(batch, D, 1, 1)`.
        hidden_dim (`int`, defaults to 256): width of the residual blocks.
        num_blocks (`int`, defaults to 3): number of residual blocks (each has one `Attention`).
        cross_attention_dim (`int`, defaults to 256): width of the condition tokens.
        attention_head_dim (`int`, defaults to 64): width of one attention head.
        time_embedding_dim (`int`, *optional*): width of the timestep embedding; defaults to ``hidden_dim``.
        flip_sin_to_cos (`bool`, defaults to `True`), freq_shift (`int`, defaults to 0): sinusoidal timestep
            projection, as in `UNet2DConditionModel`.
        dropout (`float`, defaults to 0.0): dropout inside the residual MLPs.
        sample_size (`int`, defaults to 1): spatial size of a sample, always 1; present so code written for
            `UNet2DConditionModel` can read ``config.sample_size``.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 64,
        hidden_dim: int = 256,
        num_blocks: int = 3,
        cross_attention_dim: int = 256,
        attention_head_dim: int = 64,
        time_embedding_dim: int | None = None,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        dropout: float = 0.0,
        sample_size: int = 1,
    ):
        super().__init__()
        if hidden_dim % attention_head_dim != 0:
            raise ValueError(
                f"hidden_dim ({hidden_dim}) must be a multiple of attention_head_dim ({attention_head_dim})"
            )
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1; got {num_blocks}")
        if sample_size != 1:
            raise ValueError(f"sample_size must be 1 (text latents are (batch, D, 1, 1)); got {sample_size}")
        time_embedding_dim = time_embedding_dim or hidden_dim

        self.time_proj = Timesteps(hidden_dim, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(hidden_dim, time_embedding_dim)
        self.condition_embedding = nn.Linear(cross_attention_dim, time_embedding_dim)
        self.proj_in = nn.Linear(in_channels, hidden_dim)
        self.blocks = nn.ModuleList(
            [
                TextResnetBlock(hidden_dim, time_embedding_dim, cross_attention_dim, attention_head_dim, dropout)
                for _ in range(num_blocks)
            ]
        )
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.act = nn.SiLU()
        self.proj_out = nn.Linear(hidden_dim, in_channels)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple:
        r"""Predicts the noise (or x0 / v, as trained) of noisy text latents.

        Args:
            sample (`torch.Tensor` of shape `(batch, in_channels, 1, 1)`):
                Noisy (scaled) text latents.
            timestep (`torch.Tensor`, `float` or `int`):
                Diffusion timestep, a scalar or one per sample of shape `(batch,)`.
            encoder_hidden_states (`torch.Tensor` of shape `(batch, tokens, cross_attention_dim)`):
                Condition tokens (e.g. prompt-encoder or context-encoder tokens).
            encoder_attention_mask (`torch.Tensor` of shape `(batch, tokens)`, *optional*):
                1 keeps a condition token, 0 ignores it (in attention and in the pooled condition).
            cross_attention_kwargs (`dict`, *optional*):
                Passed to every attention processor, as in `UNet2DConditionModel`.
            return_dict (`bool`, defaults to `True`):
                Return a `UNet2DConditionOutput` rather than a tuple.

        Returns:
            [`UNet2DConditionOutput`] with ``sample`` of shape `(batch, in_channels, 1, 1)`, or the tuple ``(sample,)``.
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels or sample.shape[2:] != (1, 1):
            raise ValueError(
                f"sample must have shape (batch, {self.config.in_channels}, 1, 1); got {tuple(sample.shape)}"
            )
        if encoder_hidden_states is None or encoder_hidden_states.ndim != 3:
            raise ValueError(
                "encoder_hidden_states must be a tensor of shape (batch, tokens, "
                f"{self.config.cross_attention_dim}); got "
                f"{None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}"
            )
        batch = sample.shape[0]

        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(batch)
        # Timesteps returns float32; cast like UNet2DConditionModel so half-precision models work.
        embedding = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))

        if encoder_attention_mask is not None:
            keep = encoder_attention_mask.to(encoder_hidden_states.dtype).unsqueeze(-1)
            pooled = (encoder_hidden_states * keep).sum(1) / keep.sum(1).clamp(min=1.0)
            # Additive bias over keys, shaped (batch, 1, tokens) as UNet2DConditionModel prepares it.
            attention_bias = ((1 - keep.squeeze(-1)) * -10000.0).unsqueeze(1)
        else:
            pooled = encoder_hidden_states.mean(1)
            attention_bias = None
        embedding = embedding + self.condition_embedding(pooled)

        hidden_states = self.proj_in(sample.flatten(1))
        for block in self.blocks:
            hidden_states = block(hidden_states, embedding, encoder_hidden_states, attention_bias, cross_attention_kwargs)
        out = self.proj_out(self.act(self.norm_out(hidden_states))).view(batch, -1, 1, 1)

        if not return_dict:
            return (out,)
        return UNet2DConditionOutput(sample=out)
