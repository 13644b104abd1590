"""The report tokenizer: a byte-level BPE trained on radiology reports, served as a `PreTrainedTokenizerFast`.

Radiology reports use a small, repetitive vocabulary ("no pleural effusion", "cardiomediastinal
silhouette"), so a 4k-token BPE trained on the reports themselves gives short sequences where a general
GPT-2/BERT vocabulary would split domain words into many pieces. Byte-level BPE never emits an unknown
token, so user text with unusual characters still round-trips. Text is lower-cased and its whitespace
collapsed before tokenisation, so ``decode(encode(text))`` returns exactly the normalised text.

Every encoded report is framed as ``[BOS] report [EOS]``: the text VAE's encoder reads the whole frame and
its GPT-2 decoder learns to predict every token after ``[BOS]``, including the ``[EOS]`` that ends
generation.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Order fixes the ids: [PAD] is 0 so zero-filled id tensors are padding.
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "bos_token": "[BOS]",
    "eos_token": "[EOS]",
    "mask_token": "[MASK]",
    "sep_token": "[SEP]",
    "cls_token": "[CLS]",
}

# IU X-ray de-identification replaces names, dates and some words by runs of "X" ("XXXX", "x-XXXX").
_DEIDENTIFIED = re.compile(r"X{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:])")
_REPEATED_PUNCT = re.compile(r"([.,;:])(\s*[.,;:])+")
_WHITESPACE = re.compile(r"\s+")


def train_report_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """Trains a lower-cased byte-level BPE tokenizer on reports.

    Args:
        texts (`Iterable[str]`):
            Training reports; empty strings are skipped.
        vocab_size (`int`, *optional*, defaults to 4096):
            Target vocabulary size, special tokens and the 256 byte symbols included.
        min_frequency (`int`, *optional*, defaults to 2):
            Minimum count for a merge to enter the vocabulary.
        model_max_length (`int`, *optional*, defaults to 256):
            Longest sequence (``[BOS]`` and ``[EOS]`` included) the text models accept; longer reports are
            truncated when encoded with ``truncation=True``.

    Returns:
        `PreTrainedTokenizerFast`: with ``[PAD]`` = 0, ``[UNK]``, ``[BOS]``, ``[EOS]``, ``[MASK]``, ``[SEP]``,
        ``[CLS]`` set as its special tokens and ``[BOS] … [EOS]`` added around every encoded text. Save it
        with ``save_pretrained(folder)`` and reload it with ``PreTrainedTokenizerFast.from_pretrained(folder)``.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes); got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be positive; got {min_frequency}")
    if model_max_length < 3:
        raise ValueError(f"model_max_length must leave room for [BOS], a token and [EOS]; got {model_max_length}")

    texts = [text for text in texts if text and text.strip()]
    if not texts:
        raise ValueError("texts must contain at least one non-empty report")

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    # add_prefix_space=False keeps decode(encode(text)) == normalised text, with no leading space to strip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length, padding_side="right", **SPECIAL_TOKENS
    )


def clean_report(text: str) -> str:
    """Drops IU X-ray de-identification runs ("XXXX") and tidies the punctuation and spaces they leave."""
    text = _DEIDENTIFIED.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    return _WHITESPACE.sub(" ", text).strip()


def load_report_corpus(iu_csv_path: str | Path) -> list[str]:
    """Reads the Indiana University chest X-ray reports as plain report texts.

    Each row becomes ``"FINDINGS: <findings> IMPRESSION: <impression>"`` (the section a row lacks is left out)
    with the de-identification runs removed by :func:`clean_report`; rows with neither section are skipped.

    Args:
        iu_csv_path (`str` or `Path`):
            The IU X-ray reports CSV with columns ``findings`` and ``impression``.

    Returns:
        `list[str]`: the cleaned reports, in file order.
    """
    path = Path(iu_csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"iu_csv_path {str(path)!r} is not a file")
    reports = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"findings", "impression"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)} (columns: {reader.fieldnames})")
        for row in reader:
            sections = []
            for name in ("findings", "impression"):
                text = clean_report(row.get(name) or "")
                if text:
                    sections.append(f"{name.upper()}: {text}")
            if sections:
                reports.append(" ".join(sections))
    return reports
