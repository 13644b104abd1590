"""BLEU-1..4 and ROUGE-L under the R2Gen protocol, against values computed by hand."""

from __future__ import annotations

import math

import pytest

from medm2g_diffusers.evaluation import clean_report_r2gen, report_generation_metrics


def test_cleaning_follows_r2gen():
    # Headers dropped; "1. " and ". 2. " list numbers removed; lower case; punctuation deleted; "." tokens kept.
    assert (clean_report_r2gen("FINDINGS: Heart size normal. IMPRESSION: 1. No acute disease. 2. Stable.")
            == "heart size normal . no acute disease . stable .")
    # R2Gen's character class deletes "/" ";" "(" ")" but keeps hyphens and digits.
    assert clean_report_r2gen("Well-expanded lungs; T2/FLAIR (mild) 12 mm.") == "well-expanded lungs t2flair mild 12 mm ."


def test_identical_reports_score_one():
    reports = ["No pleural effusion. Heart size is normal.", "FINDINGS: Small left pneumothorax."]
    m = report_generation_metrics(reports, reports)
    assert [m[f"bleu_{n}"] for n in range(1, 5)] == pytest.approx([1.0] * 4)
    assert m["rouge_l"] == pytest.approx(1.0) and m["rouge_l_f1"] == pytest.approx(1.0)
    assert m["n"] == 2 and "R2Gen" in m["protocol"]


def test_one_pair_by_hand():
    # "the heart is enlarged ." vs "the heart is normal ." (5 tokens each, brevity penalty 1)
    # 1-grams: the heart is . match -> 4/5; 2-grams: "the heart" "heart is" -> 2/4; 3-grams: "the heart is" -> 1/3;
    # 4-grams: 0/2.  BLEU-1 = 0.8, BLEU-2 = sqrt(0.8 * 0.5) = 0.632456, BLEU-3 = (0.8 * 0.5 / 3)^(1/3) = 0.510873,
    # BLEU-4 = 0 (no smoothing).  LCS = "the heart is ." = 4: P = R = 4/5, so ROUGE-L = 0.8 for any beta.
    m = report_generation_metrics(["The heart is enlarged."], ["The heart is normal."])
    assert m["bleu_1"] == pytest.approx(0.8)
    assert m["bleu_2"] == pytest.approx(math.sqrt(0.4))
    assert m["bleu_3"] == pytest.approx((0.4 / 3) ** (1 / 3))
    assert m["bleu_4"] == 0.0
    assert m["rouge_l"] == pytest.approx(0.8) and m["rouge_l_f1"] == pytest.approx(0.8)


def test_corpus_level_bleu_and_rouge_beta_by_hand():
    predictions = ["No effusion.", "Heart normal."]
    references = ["No pleural effusion.", "Heart normal."]
    # Tokens: "no effusion ." (3) vs "no pleural effusion ." (4); "heart normal ." (3) vs (3).
    # Pooled: 6 predicted vs 7 reference tokens -> BP = exp(1 - 7/6) = 0.846482.
    # 1-grams 6/6; 2-grams: "effusion ." (1 of 2) + "heart normal" "normal ." (2 of 2) = 3/4;
    # 3-grams: "no effusion ." 0/1 + "heart normal ." 1/1 = 1/2.
    bp = math.exp(1 - 7 / 6)
    m = report_generation_metrics(predictions, references)
    assert m["bleu_1"] == pytest.approx(bp)                              # 0.846482
    assert m["bleu_2"] == pytest.approx(bp * math.sqrt(0.75))           # 0.733075
    assert m["bleu_3"] == pytest.approx(bp * (0.75 * 0.5) ** (1 / 3))   # 0.610420
    assert m["length_ratio"] == pytest.approx(6 / 7)
    # ROUGE-L pair 1: LCS 3, P = 3/3, R = 3/4.  beta 1.2: (1 + 1.44) * 0.75 / (0.75 + 1.44) = 0.835616;
    # beta 1: 2 * 0.75 / 1.75 = 0.857143.  Pair 2: 1.  Means: 0.917808 and 0.928571.
    assert m["rouge_l"] == pytest.approx((2.44 * 0.75 / 2.19 + 1) / 2)
    assert m["rouge_l_f1"] == pytest.approx((1.5 / 1.75 + 1) / 2)


def test_order_matters_for_bleu_but_not_unigrams():
    m = report_generation_metrics(["effusion pleural no."], ["No pleural effusion."])
    # "effusion pleural no ." vs "no pleural effusion .": 1-grams 4/4; 2-grams "effusion pleural", "pleural no",
    # "no ." are not in the reference ("no pleural", "pleural effusion", "effusion .") -> 0/3.
    assert m["bleu_1"] == pytest.approx(1.0) and m["bleu_2"] == 0.0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="predictions and references must have equal lengths"):
        report_generation_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="predictions must not be empty"):
        report_generation_metrics([], [])
    with pytest.raises(ValueError, match=r"references\[1\] must be a str"):
        report_generation_metrics(["a", "b"], ["a", None])
    with pytest.raises(ValueError, match=r"references\[0\] is blank"):
        report_generation_metrics(["a"], ["  "])
    with pytest.raises(ValueError, match="predictions must be a list"):
        report_generation_metrics("No effusion.", ["No effusion."])
