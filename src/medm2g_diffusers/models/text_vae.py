"""The text autoencoder of MedM2G's report flow: report tokens <-> a `text_latent_dim` vector.

Optimus-style (Li et al., 2020): a BERT-style encoder pools the report into a latent ``z``; a GPT-2 decoder
reads ``z`` twice, as ``num_prefix_tokens`` soft-prompt embeddings in front of the report and as a vector
added to every token embedding. The latent diffusion model of the text flow denoises ``z``.

The default regulariser is the one measured in ``shared/notes/text-path.md``: a Gaussian VAE (KL, even
annealed) collapsed to encoding phrasing rather than findings, so by default ``z`` is LayerNorm-ed (no
affine, so the noise cannot be out-scaled), perturbed with ``N(0, latent_noise_std²)`` during training only,
and must also predict the report's bag of words (Zhao et al., 2017) through a linear head that inference
never uses. ``regulariser="kl"`` restores the Gaussian VAE.

Both backbones are built from their configs here, so nothing is downloaded. GPT-2's output embedding is
untied from its input embedding because diffusers' safetensors writer refuses shared tensors.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from transformers import BertConfig, BertModel, DynamicCache, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

REGULARISERS = ("layernorm", "kl")
POOLINGS = ("mean", "cls")
STRATEGIES = ("greedy", "beam", "top_p")

# transformers 5.x renamed the cache argument of causal LMs from `past_key_values` to `cache`.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


@dataclass
class TextVAEEncoderOutput(BaseOutput):
    """Output of :meth:`MedM2GTextVAE.encode`.

    Args:
        latent (`torch.Tensor` of shape `(batch, text_latent_dim)`):
            The latent the decoder reads: the posterior mean in eval mode; with training noise (or a posterior
            sample for ``regulariser="kl"``) in training mode.
        mean (`torch.Tensor` of shape `(batch, text_latent_dim)`):
            The deterministic latent (LayerNorm output, or the posterior mean).
        logvar (`torch.Tensor` of shape `(batch, text_latent_dim)`, *optional*):
            Posterior log-variance; only for ``regulariser="kl"``.
    """

    latent: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor | None = None


@dataclass
class TextVAEOutput(BaseOutput):
    """Output of :meth:`MedM2GTextVAE.forward` (all losses are scalars).

    Args:
        loss (`torch.Tensor`):
            ``reconstruction_loss + bow_weight * bow_loss + kl_weight * kl_loss``.
        reconstruction_loss (`torch.Tensor`):
            Token cross-entropy of the decoder, averaged over the non-padding target tokens.
        bow_loss (`torch.Tensor`):
            Bag-of-words negative log-likelihood per token (0 when ``bow_weight == 0``).
        kl_loss (`torch.Tensor`):
            KL divergence to N(0, I), summed over latent dimensions, averaged over the batch (0 unless
            ``regulariser="kl"``).
        latent (`torch.Tensor` of shape `(batch, text_latent_dim)`):
            The latent the decoder read.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    bow_loss: torch.Tensor
    kl_loss: torch.Tensor
    latent: torch.Tensor


class MedM2GTextVAE(ModelMixin, ConfigMixin):
    r"""Report autoencoder: BERT-style encoder -> `text_latent_dim` latent -> GPT-2 decoder.

    Args:
        vocab_size (`int`, defaults to 4096): size of the report tokenizer's vocabulary.
        pad_token_id, bos_token_id, eos_token_id (`int`): special ids; must match the tokenizer.
        text_latent_dim (`int`, defaults to 64): dimension ``D`` of the latent.
        max_position_embeddings (`int`, defaults to 256): longest tokenised report, ``[BOS]`` and ``[EOS]`` included.
        encoder_hidden_size, encoder_num_layers, encoder_num_heads, encoder_intermediate_size (`int`):
            size of the BERT encoder.
        decoder_hidden_size, decoder_num_layers, decoder_num_heads (`int`): size of the GPT-2 decoder.
        dropout (`float`, defaults to 0.1): dropout of both backbones.
        pooling (`str`, defaults to `"mean"`): `"mean"` (mask-aware mean of the encoder states) or `"cls"`
            (the state of the first token, ``[BOS]``).
        regulariser (`str`, defaults to `"layernorm"`): `"layernorm"` (LayerNorm latent + training noise) or
            `"kl"` (Gaussian posterior with a KL penalty).
        latent_noise_std (`float`, defaults to 0.1): std of the training noise added to the LayerNorm latent.
        kl_weight (`float`, defaults to 0.1): weight of the KL term (``regulariser="kl"`` only).
        bow_weight (`float`, defaults to 1.0): weight of the bag-of-words loss; 0 removes the head.
        num_prefix_tokens (`int`, defaults to 4): soft-prompt embeddings made from ``z``.
        scaling_factor (`float`, defaults to 1.0): multiply latents by this before diffusion (set after
            training to 1/std of the training latents, like `AutoencoderKL.config.scaling_factor`).
    """

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        pad_token_id: int = 0,
        bos_token_id: int = 2,
        eos_token_id: int = 3,
        text_latent_dim: int = 64,
        max_position_embeddings: int = 256,
        encoder_hidden_size: int = 128,
        encoder_num_layers: int = 2,
        encoder_num_heads: int = 4,
        encoder_intermediate_size: int = 512,
        decoder_hidden_size: int = 256,
        decoder_num_layers: int = 4,
        decoder_num_heads: int = 4,
        dropout: float = 0.1,
        pooling: str = "mean",
        regulariser: str = "layernorm",
        latent_noise_std: float = 0.1,
        kl_weight: float = 0.1,
        bow_weight: float = 1.0,
        num_prefix_tokens: int = 4,
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        if regulariser not in REGULARISERS:
            raise ValueError(f"regulariser must be one of {list(REGULARISERS)}; got {regulariser!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}; got {pooling!r}")
        if num_prefix_tokens < 1:
            raise ValueError(f"num_prefix_tokens must be at least 1; got {num_prefix_tokens}")
        if latent_noise_std < 0 or kl_weight < 0 or bow_weight < 0:
            raise ValueError(
                "latent_noise_std, kl_weight and bow_weight must be non-negative; "
                f"got {latent_noise_std}, {kl_weight}, {bow_weight}"
            )
        for name, value in (("pad_token_id", pad_token_id), ("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
            if not 0 <= value < vocab_size:
                raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}); got {value}")

        self.encoder = BertModel(
            BertConfig(
                vocab_size=vocab_size,
                hidden_size=encoder_hidden_size,
                num_hidden_layers=encoder_num_layers,
                num_attention_heads=encoder_num_heads,
                intermediate_size=encoder_intermediate_size,
                max_position_embeddings=max_position_embeddings,
                type_vocab_size=1,
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
                pad_token_id=pad_token_id,
            ),
            add_pooling_layer=False,
        )
        moments = 2 if regulariser == "kl" else 1
        self.latent_proj = nn.Linear(encoder_hidden_size, moments * text_latent_dim)
        self.latent_norm = nn.LayerNorm(text_latent_dim, elementwise_affine=False) if regulariser == "layernorm" else None

        self.decoder = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab_size,
                n_positions=max_position_embeddings + num_prefix_tokens,
                n_embd=decoder_hidden_size,
                n_layer=decoder_num_layers,
                n_head=decoder_num_heads,
                resid_pdrop=dropout,
                embd_pdrop=dropout,
                attn_pdrop=dropout,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                tie_word_embeddings=False,
            )
        )
        self.latent_to_prefix = nn.Linear(text_latent_dim, num_prefix_tokens * decoder_hidden_size)
        # Zero-initialised: a default-initialised vector added to every token embedding swamps GPT-2's small
        # (std 0.02) embeddings and stalls the decoder (token CE 3.6 vs 0.6 after 300 steps, text-path notes).
        self.latent_to_embedding = nn.Linear(text_latent_dim, decoder_hidden_size)
        nn.init.zeros_(self.latent_to_embedding.weight)
        nn.init.zeros_(self.latent_to_embedding.bias)

        self.bow_head = nn.Linear(text_latent_dim, vocab_size) if bow_weight > 0 else None

    # ------------------------------------------------------------------------------------------ encoder

    def encode(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> TextVAEEncoderOutput | tuple:
        r"""Encodes tokenised reports into latents.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`):
                ``[BOS] report [EOS]`` ids, right-padded with ``pad_token_id``.
            attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*):
                1 for real tokens, 0 for padding; derived from ``pad_token_id`` when omitted.
            generator (`torch.Generator`, *optional*):
                Draws the training noise (training mode only), so a training step is reproducible.

        Returns:
            [`TextVAEEncoderOutput`] (or the tuple ``(latent, mean, logvar)``): ``latent`` is deterministic in eval mode.
        """
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        projected = self.latent_proj(pooled)

        logvar = None
        if self.config.regulariser == "kl":
            mean, logvar = projected.chunk(2, dim=-1)
            logvar = logvar.clamp(-30.0, 20.0)
            latent = mean
            if self.training:
                latent = mean + torch.exp(0.5 * logvar) * self._randn_like(mean, generator)
        else:
            mean = self.latent_norm(projected)
            latent = mean
            if self.training and self.config.latent_noise_std > 0:
                latent = mean + self.config.latent_noise_std * self._randn_like(mean, generator)

        if not return_dict:
            return latent, mean, logvar
        return TextVAEEncoderOutput(latent=latent, mean=mean, logvar=logvar)

    @staticmethod
    def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # Drawn on the generator's device (CPU generators are the norm) and moved, as diffusers' randn_tensor does.
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)

    # ------------------------------------------------------------------------------------------ decoder

    def _prefix_embeddings(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, D) -> (B, num_prefix_tokens, decoder_hidden_size)`` soft-prompt embeddings."""
        return self.latent_to_prefix(latent).view(latent.shape[0], self.config.num_prefix_tokens, -1)

    def _token_embeddings(self, token_ids: torch.LongTensor, latent_embedding: torch.Tensor) -> torch.Tensor:
        """GPT-2 token embeddings ``(B, T, H)`` plus the projected latent ``(B, 1, H)`` at every position."""
        return self.decoder.get_input_embeddings()(token_ids) + latent_embedding

    def _reconstruction_loss(
        self, latent: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Teacher-forced token CE of ``input_ids[:, 1:]`` given ``[prefix(z), input_ids[:, :-1]]``."""
        num_prefix = self.config.num_prefix_tokens
        inputs = torch.cat(
            [
                self._prefix_embeddings(latent),
                self._token_embeddings(input_ids[:, :-1], self.latent_to_embedding(latent).unsqueeze(1)),
            ],
            dim=1,
        )
        mask = torch.cat([attention_mask.new_ones(latent.shape[0], num_prefix), attention_mask[:, :-1]], dim=1)
        logits = self.decoder(inputs_embeds=inputs, attention_mask=mask).logits[:, num_prefix:]
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    def _bow_loss(self, latent: torch.Tensor, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``-1/n Σ_t log softmax(W z)[x_t]`` over the report's n non-special tokens."""
        log_probs = F.log_softmax(self.bow_head(latent).float(), dim=-1)
        special = (
            (input_ids == self.config.pad_token_id)
            | (input_ids == self.config.bos_token_id)
            | (input_ids == self.config.eos_token_id)
        )
        weights = (attention_mask.bool() & ~special).to(log_probs.dtype)
        token_log_probs = log_probs.gather(1, input_ids)
        per_report = -(token_log_probs * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return per_report.mean()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> TextVAEOutput | tuple:
        r"""Encodes, decodes with teacher forcing, and returns the training losses.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`):
                ``[BOS] report [EOS]`` ids, right-padded with ``pad_token_id``; ``seq_len <= max_position_embeddings``.
            attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*):
                1 for real tokens, 0 for padding; derived from ``pad_token_id`` when omitted.
            generator (`torch.Generator`, *optional*):
                Draws the latent noise of a training step.

        Returns:
            [`TextVAEOutput`], or the tuple ``(loss, reconstruction_loss, bow_loss, kl_loss, latent)``.
        """
        if input_ids.ndim != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len >= 2); got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens but max_position_embeddings is "
                f"{self.config.max_position_embeddings}; tokenize with truncation=True"
            )
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()

        encoded = self.encode(input_ids, attention_mask, generator=generator)
        latent = encoded.latent
        zero = latent.new_zeros(())
        reconstruction_loss = self._reconstruction_loss(latent, input_ids, attention_mask)
        bow_loss = self._bow_loss(latent, input_ids, attention_mask) if self.bow_head is not None else zero
        kl_loss = zero
        if encoded.logvar is not None:
            kl_loss = 0.5 * (encoded.mean.pow(2) + encoded.logvar.exp() - 1.0 - encoded.logvar).sum(-1).mean()
        loss = reconstruction_loss + self.config.bow_weight * bow_loss + self.config.kl_weight * kl_loss

        if not return_dict:
            return loss, reconstruction_loss, bow_loss, kl_loss, latent
        return TextVAEOutput(
            loss=loss, reconstruction_loss=reconstruction_loss, bow_loss=bow_loss, kl_loss=kl_loss, latent=latent
        )

    # --------------------------------------------------------------------------------------- generation

    def _next_token_logits(self, inputs_embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Runs the decoder on new positions, extending ``cache`` in place; returns the last logits ``(B, V)``."""
        output = self.decoder(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1, **{_CACHE_KWARG: cache})
        return output.logits[:, -1].float()

    @staticmethod
    def _apply_repetition_penalty(logits: torch.Tensor, generated: torch.LongTensor, penalty: float) -> torch.Tensor:
        """CTRL-style penalty (as transformers' ``RepetitionPenaltyLogitsProcessor``) on already generated tokens."""
        if penalty == 1.0 or generated.shape[1] == 0:
            return logits
        scores = logits.gather(1, generated)
        scores = torch.where(scores < 0, scores * penalty, scores / penalty)
        return logits.scatter(1, generated, scores)

    @staticmethod
    def _sample_top_p(
        logits: torch.Tensor, top_p: float, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.LongTensor:
        """Nucleus sampling: keeps the smallest set of tokens whose probability reaches ``top_p``."""
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the most likely token always stays).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        if isinstance(generator, list):
            picks = torch.cat(
                [torch.multinomial(row.unsqueeze(0).cpu(), 1, generator=g) for row, g in zip(sorted_probs, generator)]
            ).to(logits.device)
        else:
            device = generator.device if generator is not None else logits.device
            picks = torch.multinomial(sorted_probs.to(device), 1, generator=generator).to(logits.device)
        return sorted_ids.gather(1, picks).squeeze(1)

    @torch.no_grad()
    def generate(
        self,
        latent: torch.Tensor,
        max_new_tokens: int = 128,
        strategy: str = "greedy",
        num_beams: int = 4,
        top_p: float = 0.9,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.LongTensor:
        r"""Decodes latents into token ids with a KV cache (a transformers `DynamicCache`).

        Every sequence starts from the same ``[prefix(z), [BOS]]`` length, so batches need no padding and a
        batched greedy decode equals decoding each latent alone.

        Args:
            latent (`torch.Tensor` of shape `(batch, text_latent_dim)`):
                Unscaled latents (divide diffusion outputs by ``config.scaling_factor`` first).
            max_new_tokens (`int`, defaults to 128): most tokens generated after ``[BOS]``, ``[EOS]`` included.
            strategy (`str`, defaults to `"greedy"`): `"greedy"`, `"beam"` or `"top_p"`.
            num_beams (`int`, defaults to 4): beams kept by `"beam"`.
            top_p (`float`, defaults to 0.9): nucleus mass for `"top_p"`.
            temperature (`float`, defaults to 1.0): logits are divided by it for `"top_p"`.
            repetition_penalty (`float`, defaults to 1.0): >1 discourages tokens already generated.
            length_penalty (`float`, defaults to 1.0): `"beam"` ranks finished beams by score / length**length_penalty.
            generator (`torch.Generator` or a list of one per latent, *optional*): the randomness of `"top_p"`.

        Returns:
            `torch.LongTensor` of shape `(batch, generated_len)`: the generated ids (without ``[BOS]``), each row
            ending at its ``[EOS]`` and padded after it with ``pad_token_id``.
        """
        if latent.ndim != 2 or latent.shape[1] != self.config.text_latent_dim:
            raise ValueError(
                f"latent must have shape (batch, {self.config.text_latent_dim}); got {tuple(latent.shape)}"
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}; got {strategy!r}")
        if not 1 <= max_new_tokens <= self.config.max_position_embeddings - 1:
            raise ValueError(
                f"max_new_tokens must be in [1, {self.config.max_position_embeddings - 1}] "
                f"(max_position_embeddings - 1); got {max_new_tokens}"
            )
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive; got {repetition_penalty}")
        if strategy == "top_p":
            if not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
            if temperature <= 0:
                raise ValueError(f"temperature must be positive; got {temperature}")
            if isinstance(generator, list) and len(generator) != latent.shape[0]:
                raise ValueError(f"generator is a list of {len(generator)} but the batch has {latent.shape[0]} latents")
        if strategy == "beam":
            if num_beams < 1:
                raise ValueError(f"num_beams must be at least 1; got {num_beams}")
            return self._beam_search(latent, max_new_tokens, num_beams, repetition_penalty, length_penalty)

        pad, eos = self.config.pad_token_id, self.config.eos_token_id
        batch = latent.shape[0]
        latent_embedding = self.latent_to_embedding(latent).unsqueeze(1)
        bos = torch.full((batch, 1), self.config.bos_token_id, dtype=torch.long, device=latent.device)
        cache = DynamicCache(config=self.decoder.config)
        logits = self._next_token_logits(
            torch.cat([self._prefix_embeddings(latent), self._token_embeddings(bos, latent_embedding)], dim=1), cache
        )
        generated = torch.empty((batch, 0), dtype=torch.long, device=latent.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=latent.device)
        for _ in range(max_new_tokens):
            logits = self._apply_repetition_penalty(logits, generated, repetition_penalty)
            if strategy == "greedy":
                next_ids = logits.argmax(-1)
            else:
                next_ids = self._sample_top_p(logits / temperature, top_p, generator)
            next_ids = next_ids.masked_fill(finished, pad)
            generated = torch.cat([generated, next_ids.unsqueeze(1)], dim=1)
            finished |= next_ids == eos
            if finished.all():
                break
            logits = self._next_token_logits(self._token_embeddings(next_ids.unsqueeze(1), latent_embedding), cache)
        return generated

    def _beam_search(
        self,
        latent: torch.Tensor,
        max_new_tokens: int,
        num_beams: int,
        repetition_penalty: float,
        length_penalty: float,
    ) -> torch.LongTensor:
        """Batched beam search; a finished beam keeps its slot and score and only extends with padding."""
        pad, eos = self.config.pad_token_id, self.config.eos_token_id
        batch, device = latent.shape[0], latent.device
        flat = latent.repeat_interleave(num_beams, dim=0)  # (B*K, D), beams of one latent adjacent
        latent_embedding = self.latent_to_embedding(flat).unsqueeze(1)
        bos = torch.full((batch * num_beams, 1), self.config.bos_token_id, dtype=torch.long, device=device)
        cache = DynamicCache(config=self.decoder.config)
        logits = self._next_token_logits(
            torch.cat([self._prefix_embeddings(flat), self._token_embeddings(bos, latent_embedding)], dim=1), cache
        )
        # Only the first beam is live at the start, otherwise all K beams would expand into the same tokens.
        scores = torch.full((batch, num_beams), float("-inf"), device=device)
        scores[:, 0] = 0.0
        generated = torch.empty((batch * num_beams, 0), dtype=torch.long, device=device)
        finished = torch.zeros(batch * num_beams, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch * num_beams, device=device)
        offsets = (torch.arange(batch, device=device) * num_beams).unsqueeze(1)
        for _ in range(max_new_tokens):
            logits = self._apply_repetition_penalty(logits, generated, repetition_penalty)
            log_probs = logits.log_softmax(-1)
            log_probs[finished] = float("-inf")
            log_probs[finished, pad] = 0.0
            vocab = log_probs.shape[-1]
            candidates = (scores.view(-1, 1) + log_probs).view(batch, num_beams * vocab)
            scores, flat_index = candidates.topk(num_beams, dim=1)
            source = (offsets + torch.div(flat_index, vocab, rounding_mode="floor")).view(-1)
            next_ids = (flat_index % vocab).view(-1)
            lengths = lengths[source] + (~finished[source]).float()
            finished = finished[source] | (next_ids == eos)
            generated = torch.cat([generated[source], next_ids.unsqueeze(1)], dim=1)
            if finished.all():
                break
            cache.reorder_cache(source)
            logits = self._next_token_logits(self._token_embeddings(next_ids.unsqueeze(1), latent_embedding), cache)
        ranked = scores / lengths.view(batch, num_beams).clamp(min=1.0) ** length_penalty
        best = offsets.squeeze(1) + ranked.argmax(dim=1)
        return generated[best]

    def decode(
        self,
        latent: torch.Tensor,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int = 128,
        strategy: str = "greedy",
        num_beams: int = 4,
        top_p: float = 0.9,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> list[str]:
        r"""Decodes latents into report strings; arguments as in :meth:`generate`.

        Args:
            latent (`torch.Tensor` of shape `(batch, text_latent_dim)`): unscaled latents.
            tokenizer (`PreTrainedTokenizerBase`): the report tokenizer this model was trained with.

        Returns:
            `list[str]` of length `batch`: the reports, special tokens removed.
        """
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name) != getattr(self.config, name):
                raise ValueError(
                    f"tokenizer.{name} is {getattr(tokenizer, name)} but the model was trained with "
                    f"{getattr(self.config, name)}; pass the tokenizer saved next to this model"
                )
        ids = self.generate(
            latent,
            max_new_tokens=max_new_tokens,
            strategy=strategy,
            num_beams=num_beams,
            top_p=top_p,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            generator=generator,
        )
        return [text.strip() for text in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]
