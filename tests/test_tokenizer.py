"""Tests of `medm2g_diffusers.tokenizer`: training, framing, normalisation, save/load and the IU corpus reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from medm2g_diffusers.tokenizer import SPECIAL_TOKENS, clean_report, load_report_corpus, train_report_tokenizer

IU_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu-xray-reports" / "iu_reports.csv"

REPORTS = [
    "FINDINGS: Large right pleural effusion. Heart size is normal. IMPRESSION: Right pleural effusion, large.",
    "FINDINGS: No pleural effusion. The lungs are clear. IMPRESSION: Normal chest.",
    "FINDINGS: Small left pneumothorax.  No consolidation. IMPRESSION: Left pneumothorax, small.",
    "FINDINGS: 12 mm nodule in the right upper lobe. IMPRESSION: Right upper lobe nodule, 12 mm.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_report_tokenizer(REPORTS * 3, vocab_size=300, min_frequency=1, model_max_length=64)


def test_special_tokens_and_ids(tokenizer):
    for attribute, token in SPECIAL_TOKENS.items():
        assert getattr(tokenizer, attribute) == token
    assert tokenizer.pad_token_id == 0
    assert len({tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS.values()}) == len(SPECIAL_TOKENS)
    assert tokenizer.model_max_length == 64


def test_encoding_is_framed_and_round_trips_normalised_text(tokenizer):
    ids = tokenizer(REPORTS[2]).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    # Lower-cased, whitespace collapsed, nothing else changed.
    assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(REPORTS[2].lower().split())
    # Byte-level: unseen characters still round-trip instead of becoming [UNK].
    unseen = "Ödema ≥ 3 cm"
    assert tokenizer.decode(tokenizer(unseen).input_ids, skip_special_tokens=True) == unseen.lower()


def test_padding_is_right_sided_with_pad_id(tokenizer):
    batch = tokenizer(REPORTS[:2], padding=True)
    shorter = min(range(2), key=lambda i: sum(batch.attention_mask[i]))
    assert batch.input_ids[shorter][-1] == tokenizer.pad_token_id
    assert batch.attention_mask[shorter][-1] == 0


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded(REPORTS).input_ids == tokenizer(REPORTS).input_ids
    assert loaded.model_max_length == 64 and loaded.padding_side == "right"
    for attribute in SPECIAL_TOKENS:
        assert getattr(loaded, attribute) == getattr(tokenizer, attribute)


def test_invalid_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="vocab_size"):
        train_report_tokenizer(REPORTS, vocab_size=10)
    with pytest.raises(ValueError, match="texts"):
        train_report_tokenizer(["", "  "])


def test_clean_report_drops_deidentification_runs():
    assert clean_report("There are no XXXX of a pleural effusion.  Normal chest x-XXXX.") == (
        "There are no of a pleural effusion. Normal chest x-."
    )
    assert clean_report("Heart size normal. XXXX. Lungs clear.") == "Heart size normal. Lungs clear."


def test_load_report_corpus_from_csv(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text(
        "report_id,findings,impression\n"
        '1,"Heart normal. No XXXX effusion.",Normal chest.\n'
        "2,,No acute disease.\n"
        "3,,\n"
    )
    assert load_report_corpus(path) == [
        "FINDINGS: Heart normal. No effusion. IMPRESSION: Normal chest.",
        "IMPRESSION: No acute disease.",
    ]
    with pytest.raises(FileNotFoundError, match="iu_csv_path"):
        load_report_corpus(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="findings"):
        load_report_corpus(tmp_path / "bad.csv")


@pytest.mark.skipif(not IU_CSV.is_file(), reason=f"IU X-ray reports {IU_CSV} are absent")
def test_real_iu_corpus_has_no_deidentification_tokens():
    reports = load_report_corpus(IU_CSV)
    assert len(reports) > 3000
    assert not any("XX" in report for report in reports)
