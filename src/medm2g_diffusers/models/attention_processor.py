"""Cross-guided attention processors: the trainable sublayer θ_c of MedM2G's multi-flow stage.

A denoiser of family A reads the other flows of a joint step through *guidance tokens*, the output of the
other families' context encoders V_B (see :mod:`.context_encoder`). They enter every chosen attention layer
the way IP-Adapter's image tokens do: the layer's own query attends, in a second scaled-dot-product
attention, to keys and values projected from the guidance tokens by the processor's own ``to_k_guide`` /
``to_v_guide`` layers, and that result is added, times a scale, to the usual attention over
``encoder_hidden_states`` before the output projection. The UNet's own weights are untouched, so stage 3
can train θ_c (and V) with the stage-2 denoisers frozen.

The guidance arrives through ``cross_attention_kwargs``, which diffusers hands to *every* attention layer:

* ``guidance_hidden_states`` (`torch.Tensor` of shape `(batch, num_guidance_tokens, guidance_dim)`);
* ``guidance_scale`` (`float`, optional): overrides the processor's ``scale`` for this call;
* ``guidance_attention_mask`` (`torch.Tensor` of shape `(batch, num_guidance_tokens)`, optional): 1 attends
  to a token, 0 ignores it.

``Attention.forward`` drops, with a warning, every kwarg that its processor's ``__call__`` does not name, so
both processors here name all three explicitly (no ``**kwargs``): the layers that carry θ_c use
:class:`CrossGuidedAttnProcessor2_0`, the others :class:`GuidanceAwareAttnProcessor2_0`, which accepts
and ignores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

# The additive bias for a masked guidance token, the value UNet2DConditionModel uses for its encoder mask.
MASKED_BIAS = -10000.0


def _check_guidance(
    guidance_hidden_states: torch.Tensor,
    guidance_attention_mask: torch.Tensor | None,
    batch_size: int,
    guidance_dim: int,
) -> None:
    if guidance_hidden_states.ndim != 3 or guidance_hidden_states.shape[0] != batch_size:
        raise ValueError(
            f"guidance_hidden_states must have shape (batch={batch_size}, num_guidance_tokens, {guidance_dim}); "
            f"got {tuple(guidance_hidden_states.shape)}"
        )
    if guidance_hidden_states.shape[-1] != guidance_dim:
        raise ValueError(
            f"guidance_hidden_states must have {guidance_dim} features (the processor's guidance_dim); "
            f"got {guidance_hidden_states.shape[-1]}"
        )
    if guidance_attention_mask is not None and guidance_attention_mask.shape != guidance_hidden_states.shape[:2]:
        raise ValueError(
            "guidance_attention_mask must have shape (batch, num_guidance_tokens) = "
            f"{tuple(guidance_hidden_states.shape[:2])}; got {tuple(guidance_attention_mask.shape)}"
        )


class GuidanceAwareAttnProcessor2_0(AttnProcessor2_0):
    r"""
    diffusers' `AttnProcessor2_0` for layers without θ_c that must still receive the guidance kwargs.

    It names ``guidance_hidden_states``, ``guidance_scale`` and ``guidance_attention_mask`` in its signature so
    `Attention.forward` passes them without the "are not expected ... and will be ignored" warning, and then
    ignores them: the output is exactly that of `AttnProcessor2_0`.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        guidance_hidden_states: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class CrossGuidedAttnProcessor2_0(nn.Module):
    r"""
    Scaled-dot-product attention plus a second attention over guidance tokens (θ_c), IP-Adapter style.

    ``out = to_out(SDPA(q, k, v) + scale * SDPA(q, to_k_guide(g), to_v_guide(g)))`` where ``q, k, v`` are the
    layer's usual projections and ``g`` the guidance tokens. Without guidance tokens (or with a scale of 0)
    the output is bit for bit that of diffusers' `AttnProcessor2_0`.

    ``to_v_guide`` is zero-initialised, so a freshly installed processor adds exactly zero and the multi-flow
    model starts as the single-flow model it was built from; ``to_k_guide`` keeps a random (or, through
    :meth:`MedM2GMultiFlowModel.from_single_flow`, the layer's ``to_k``) initialisation so the attention
    pattern is not degenerate once the values start to move.

    Args:
        key_dim (`int`):
            Width of the layer's keys, ``attn.to_k.out_features`` (heads x head dimension).
        value_dim (`int`):
            Width of the layer's values, ``attn.to_v.out_features``.
        guidance_dim (`int`):
            Width of the guidance tokens (the context encoders' ``cross_attention_dim``).
        scale (`float`, defaults to 1.0):
            Weight of the guidance attention when a call does not pass ``guidance_scale``.
    """

    def __init__(self, key_dim: int, value_dim: int, guidance_dim: int, scale: float = 1.0):
        super().__init__()
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError(f"{self.__class__.__name__} requires PyTorch 2.0 or later")
        self.guidance_dim = guidance_dim
        self.scale = scale
        self.to_k_guide = nn.Linear(guidance_dim, key_dim, bias=False)
        self.to_v_guide = nn.Linear(guidance_dim, value_dim, bias=False)
        # Zero values: the guidance branch contributes exactly 0 until training moves them (start = single flow).
        nn.init.zeros_(self.to_v_guide.weight)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        guidance_hidden_states: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Args:
            attn (`Attention`): the layer this processor serves.
            hidden_states (`torch.Tensor` of shape `(batch, tokens, query_dim)` or `(batch, channels, height, width)`):
                The queries' input.
            encoder_hidden_states (`torch.Tensor` of shape `(batch, cond_tokens, cross_attention_dim)`, *optional*):
                Condition tokens; `None` makes the usual branch self-attention.
            attention_mask (`torch.Tensor`, *optional*): additive mask of the usual branch, as in `AttnProcessor2_0`.
            temb (`torch.Tensor`, *optional*): for layers with a spatial norm.
            guidance_hidden_states (`torch.Tensor` of shape `(batch, num_guidance_tokens, guidance_dim)`, *optional*):
                Guidance tokens; `None` skips the guidance branch.
            guidance_scale (`float`, *optional*): weight of the guidance branch; defaults to ``self.scale``.
            guidance_attention_mask (`torch.Tensor` of shape `(batch, num_guidance_tokens)`, *optional*):
                1 attends to a guidance token, 0 ignores it.

        Returns:
            `torch.Tensor` of the shape of ``hidden_states``.
        """
        scale = self.scale if guidance_scale is None else guidance_scale
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # SDPA wants the mask as (batch, heads, query_tokens, key_tokens).
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if guidance_hidden_states is not None and scale != 0:
            hidden_states = hidden_states + scale * self._guidance_attention(
                attn, query, guidance_hidden_states, guidance_attention_mask
            )

        hidden_states = attn.to_out[0](hidden_states)  # output projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _guidance_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        guidance_hidden_states: torch.Tensor,
        guidance_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The θ_c branch: ``query (batch, heads, tokens, head_dim)`` -> `(batch, tokens, heads * head_dim)`."""
        batch_size, heads, _, head_dim = query.shape
        _check_guidance(guidance_hidden_states, guidance_attention_mask, batch_size, self.guidance_dim)
        guidance_hidden_states = guidance_hidden_states.to(query.dtype)
        key = self.to_k_guide(guidance_hidden_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = self.to_v_guide(guidance_hidden_states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        # Guidance keys live in the same head space as the layer's own keys, so they get the same key norm.
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        bias = None
        if guidance_attention_mask is not None:
            keep = guidance_attention_mask.to(query.dtype)
            bias = ((1.0 - keep) * MASKED_BIAS)[:, None, None, :]  # (batch, 1, 1, num_guidance_tokens)

        guided = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        return guided.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
