"""The context encoder V_m of MedM2G: what one flow shows the other flows of a joint denoising step.

In the multi-flow stage every denoiser attends, through its cross-guided attention processors (θ_c), to the
*guidance tokens* of the other modalities being generated with it. For a family m those tokens are

    V_m(z_t^m, t) = [ tokens of the noisy latent z_t^m at timestep t ; f_m ]   of shape (B, N + K, dim)

* the latent tokens read the current noisy latent, so what flow A generates can follow what flow B is
  generating at the same step. Image latents ``(B, C, H, W)`` go through a small convolutional stem and are
  pooled to a ``token_grid x token_grid`` grid of patches with learned row and column positions; text
  latents ``(B, D, 1, 1)`` are one vector, split by a linear layer into ``num_latent_tokens`` tokens. The
  timestep embedding (sinusoidal ``Timesteps`` + ``TimestepEmbedding``, as in the UNets) is added to every
  token, since how much a noisy latent can be trusted depends on its noise level.
* f_m are ``K`` learnable *adaptive tokens*, the same for every sample: a per-modality prior the other flows
  can always attend to. Like textual-inversion embeddings they start from real embeddings of the modality,
  rows sampled from the prompt encoder C_m's tokens (:meth:`ContextEncoder.initialize_adaptive_tokens`), so
  they begin in the shared space the UNets already read.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

LATENT_TYPES = ("image", "text")


class ContextEncoder(ModelMixin, ConfigMixin):
    r"""
    V_m: noisy latent + timestep + adaptive tokens -> guidance tokens for the other flows' θ_c.

    Args:
        in_channels (`int`, defaults to 4):
            Channels ``C`` of an image latent `(batch, C, H, W)`, or the dimension ``D`` of a text latent
            `(batch, D, 1, 1)`.
        latent_type (`str`, defaults to `"image"`):
            `"image"` (conv stem + patch grid) or `"text"` (linear split into tokens).
        token_grid (`int`, defaults to 4):
            Side of the patch grid of an image latent: ``N = token_grid**2`` latent tokens, whatever the
            latent's spatial size (adaptive average pooling).
        num_latent_tokens (`int`, defaults to 4):
            ``N`` for a text latent.
        hidden_dim (`int`, defaults to 128):
            Width of the stem and of the tokens before the output projection.
        cross_attention_dim (`int`, defaults to 128):
            Width of the guidance tokens and of the adaptive tokens; the width of the prompt encoders' shared
            space, so adaptive tokens can be initialised from C_m embeddings.
        num_adaptive_tokens (`int`, defaults to 4):
            ``K``, the number of adaptive tokens f_m.
        norm_num_groups (`int`, defaults to 32):
            GroupNorm groups of the image stem (capped at ``hidden_dim``).
        flip_sin_to_cos (`bool`, defaults to `True`), freq_shift (`int`, defaults to 0):
            Sinusoidal timestep projection, as in `UNet2DConditionModel`.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        latent_type: str = "image",
        token_grid: int = 4,
        num_latent_tokens: int = 4,
        hidden_dim: int = 128,
        cross_attention_dim: int = 128,
        num_adaptive_tokens: int = 4,
        norm_num_groups: int = 32,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
    ):
        super().__init__()
        if latent_type not in LATENT_TYPES:
            raise ValueError(f"latent_type must be one of {list(LATENT_TYPES)}; got {latent_type!r}")
        for name, value in [
            ("in_channels", in_channels),
            ("token_grid", token_grid),
            ("num_latent_tokens", num_latent_tokens),
            ("hidden_dim", hidden_dim),
            ("cross_attention_dim", cross_attention_dim),
            ("num_adaptive_tokens", num_adaptive_tokens),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value}")
        groups = min(norm_num_groups, hidden_dim)
        if hidden_dim % groups != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a multiple of norm_num_groups ({groups})")

        if latent_type == "image":
            self.conv_in = nn.Conv2d(in_channels, hidden_dim, 3, padding=1)
            self.norm_in = nn.GroupNorm(groups, hidden_dim)
            self.conv_mid = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1)
            self.token_pool = nn.AdaptiveAvgPool2d(token_grid)
            # Row and column embeddings, summed: a learned 2-D position for every patch of the grid.
            self.row_embedding = nn.Parameter(torch.randn(token_grid, hidden_dim) * 0.02)
            self.column_embedding = nn.Parameter(torch.randn(token_grid, hidden_dim) * 0.02)
        else:
            # Each token gets its own slice of the linear map, so no position embedding is needed.
            self.proj_in = nn.Linear(in_channels, num_latent_tokens * hidden_dim)

        self.time_proj = Timesteps(hidden_dim, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(hidden_dim, hidden_dim)
        # One residual MLP after the timestep is added, so tokens depend on latent and noise level jointly.
        self.norm_mlp = nn.LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, cross_attention_dim)
        # Placeholder values until initialize_adaptive_tokens copies C_m embeddings in.
        self.adaptive_tokens = nn.Parameter(torch.randn(num_adaptive_tokens, cross_attention_dim) * 0.02)

    @property
    def num_latent_tokens_out(self) -> int:
        """``N``, the number of latent tokens in the output (before the ``K`` adaptive tokens)."""
        if self.config.latent_type == "image":
            return self.config.token_grid**2
        return self.config.num_latent_tokens

    @property
    def num_tokens(self) -> int:
        """``N + K``, the number of guidance tokens per sample."""
        return self.num_latent_tokens_out + self.config.num_adaptive_tokens

    @torch.no_grad()
    def initialize_adaptive_tokens(self, embeddings: torch.Tensor, generator: torch.Generator | None = None) -> None:
        r"""
        Initialises the adaptive tokens f_m from sampled C_m embeddings (textual-inversion style).

        With at least ``K`` embeddings, ``K`` distinct rows drawn at random are copied; with fewer, every token
        is their mean plus Gaussian noise of 1 % of their standard deviation, so the tokens start apart.

        Args:
            embeddings (`torch.Tensor` of shape `(M, cross_attention_dim)`):
                Embeddings of modality m in the shared space, e.g. prompt-encoder tokens of a few training
                samples flattened over batch and tokens.
            generator (`torch.Generator`, *optional*):
                A CPU generator for the draw, for reproducible initialisation.
        """
        dim = self.config.cross_attention_dim
        if embeddings.ndim != 2 or embeddings.shape[1] != dim or embeddings.shape[0] < 1:
            raise ValueError(f"embeddings must have shape (M >= 1, {dim}); got {tuple(embeddings.shape)}")
        embeddings = embeddings.detach().to(device="cpu", dtype=torch.float32)
        count = self.config.num_adaptive_tokens
        if embeddings.shape[0] >= count:
            rows = torch.randperm(embeddings.shape[0], generator=generator)[:count]
            values = embeddings[rows]
        else:
            # One embedding has no spread of its own: fall back to a unit scale for the noise.
            spread = embeddings.std() if embeddings.numel() > 1 else torch.tensor(1.0)
            noise = torch.randn(count, dim, generator=generator) * 0.01 * spread
            values = embeddings.mean(0, keepdim=True) + noise
        self.adaptive_tokens.copy_(values.to(self.adaptive_tokens))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(batch, in_channels, height, width)` or `(batch, in_channels, 1, 1)`):
                The noisy latent z_t^m (an image latent, or a text latent for ``latent_type="text"``).
            timestep (`torch.Tensor`, `float` or `int`):
                Its diffusion timestep, a scalar or one per sample of shape `(batch,)`.

        Returns:
            `torch.Tensor` of shape `(batch, N + K, cross_attention_dim)`: the ``N`` latent tokens followed by
            the ``K`` adaptive tokens.
        """
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(
                f"sample must have shape (batch, {config.in_channels}, height, width); got {tuple(sample.shape)}"
            )
        batch = sample.shape[0]
        if config.latent_type == "image":
            hidden_states = nn.functional.silu(self.norm_in(self.conv_in(sample)))
            hidden_states = self.token_pool(self.conv_mid(hidden_states))  # (batch, hidden, grid, grid)
            tokens = hidden_states.flatten(2).transpose(1, 2)  # row-major patches: (batch, grid * grid, hidden)
            positions = (self.row_embedding[:, None, :] + self.column_embedding[None, :, :]).flatten(0, 1)
            tokens = tokens + positions
        else:
            if sample.shape[2:] != (1, 1):
                raise ValueError(
                    f"sample must have shape (batch, {config.in_channels}, 1, 1) for a text latent; got {tuple(sample.shape)}"
                )
            tokens = self.proj_in(sample.flatten(1)).view(batch, config.num_latent_tokens, config.hidden_dim)

        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        if timesteps.shape[0] not in (1, batch):
            raise ValueError(f"timestep must be a scalar or have shape ({batch},); got {tuple(timesteps.shape)}")
        # Timesteps returns float32; cast so half-precision encoders work, as UNet2DConditionModel does.
        time_embedding = self.time_embedding(self.time_proj(timesteps.expand(batch)).to(dtype=tokens.dtype))
        tokens = tokens + time_embedding[:, None, :]
        tokens = tokens + self.mlp(self.norm_mlp(tokens))
        tokens = self.proj_out(self.norm_out(tokens))

        adaptive = self.adaptive_tokens.to(tokens.dtype).expand(batch, -1, -1)
        return torch.cat([tokens, adaptive], dim=1)
