"""The rule-based finding labeller: negation, mass vs tumour, the phantoms' phrasings, and finding F1 by hand."""

from __future__ import annotations

import json

import pytest

from medm2g_diffusers.data.phantoms import (
    FINDING_PHRASES,
    FINDING_VOCABULARY,
    IMPRESSION_PHRASES,
    LOBE_NAMES,
    NEGATIVE_PHRASES,
    PhantomGenerator,
)
from medm2g_diffusers.evaluation import (
    FINDING_TYPES,
    find_mentions,
    finding_f1,
    finding_types,
    label_report,
    label_report_with_attributes,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No pleural effusion.", set()),
        ("There is no evidence of pneumothorax.", set()),
        ("Small left pleural effusion.", {"pleural_effusion"}),
        ("Midline structures are central, no shift.", set()),
        ("The midline is maintained without shift.", set()),
        ("Heart size is normal.", set()),
        ("The heart is enlarged.", {"cardiomegaly"}),
        ("The heart is not enlarged.", set()),
        ("No pleural effusion or pneumothorax.", set()),
        ("No focal consolidation, pneumothorax or large pleural effusion.", set()),
        ("Pneumothorax is not seen.", set()),
        ("The lungs are clear without consolidation.", set()),
        ("Negative for pneumothorax.", set()),
        ("The lungs are free of consolidation.", set()),
        ("Cardiomegaly without pleural effusion.", {"cardiomegaly"}),
        ("No pneumothorax, but there is a small right pleural effusion.", {"pleural_effusion"}),
        ("No pneumothorax. Small right pleural effusion.", {"pleural_effusion"}),
        ("No change in the small left pleural effusion.", {"pleural_effusion"}),  # pseudo-negation
        ("Right lower lobe consolidation cannot be excluded.", {"consolidation"}),  # hedged = present
        ("If clinically indicated, CT could be performed to identify a small nodule.", set()),  # hypothetical
        ("Pericardial effusion.", set()),
        ("There is 7 mm of leftward midline shift.", {"midline_shift"}),
        ("Mass effect with 6 mm shift of the midline to the right.", {"midline_shift"}),  # no mass, no tumour
        ("Rightward shift of the trachea.", set()),
        ("There is an acute left temporal lobe haematoma.", {"haemorrhage"}),
        ("No intracranial hemorrhage.", set()),
        ("Left-sided pacemaker with leads in the right ventricle.", {"pacemaker"}),
        ("No pacemaker or other implanted device.", set()),
        ("Focal airspace opacity in the left lower lobe.", {"consolidation"}),
        ("Enlarged cardiac silhouette.", {"cardiomegaly"}),
        ("A 2.5 cm nodule in the right upper lobe. No pneumothorax.", {"nodule"}),
    ],
)
def test_affirmed_and_negated_sentences(text, expected):
    assert label_report(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ring-enhancing 30 mm mass in the right frontal lobe with surrounding oedema.", {"tumour"}),
        ("There is a 40 mm mass in the right upper lobe.", {"mass"}),
        ("A heterogeneous enhancing lesion is seen in the left parietal lobe.", {"tumour"}),
        ("Lung tumour in the left lower lobe.", {"mass"}),
        # The sentence's own anatomy wins over the rest of the report ...
        ("The lungs are clear. No pleural effusion. Pleura normal. Ring-enhancing mass in the left frontal lobe.",
         {"tumour"}),
        ("No intracranial haemorrhage. Brain and ventricles are normal. A 40 mm right upper lobe mass.", {"mass"}),
        # ... without anatomy in the sentence, the report's other sentences decide ...
        ("No intracranial haemorrhage. Ventricles are normal. A 30 mm mass is present.", {"tumour"}),
        ("The lungs are clear. No pleural effusion. A 30 mm mass is present.", {"mass"}),
        # ... and with none anywhere, the word does.
        ("A mass is present.", {"mass"}),
        ("A tumour is present.", {"tumour"}),
        ("No intracranial mass.", set()),
        ("No abnormal enhancement or mass.", set()),
    ],
)
def test_mass_in_the_chest_tumour_in_the_head(text, expected):
    assert label_report(text) == expected


def test_mentions_record_negation_and_phrase():
    mentions = find_mentions("No pleural effusion. The heart is enlarged.")
    assert [(m.finding, m.negated, m.affirmed) for m in mentions] == [
        ("pleural_effusion", True, False),
        ("cardiomegaly", False, True),
    ]
    assert mentions[1].phrase == "heart is enlarged"


# Template fields by hand (the labeller never sees these templates; the test checks it reads them).
_FIELDS = {"size": "small", "side": "left", "s": "", "a": "a ", "is": "is", "size_mm": 21, "direction": "right",
           "ipsilateral": "left", "location": "temporal lobe"}
_LOBE = {"nodule": "RUL", "mass": "LLL", "consolidation": "RML", "tumour": "frontal"}


def _fields(kind: str) -> dict:
    lobe = _LOBE.get(kind, "LUL")
    return {**_FIELDS, "lobe": LOBE_NAMES.get(lobe, lobe)}


@pytest.mark.parametrize("kind", FINDING_TYPES)
def test_every_phantom_phrasing_is_read(kind):
    for template in FINDING_PHRASES[kind] + IMPRESSION_PHRASES[kind]:
        sentence = template.format(**_fields(kind))
        assert label_report(sentence) == {kind}, sentence
    bilateral = {**_fields(kind), "side": "bilateral", "s": "s", "a": "", "is": "are"}
    if kind == "pleural_effusion":
        assert all(label_report(t.format(**bilateral)) == {kind} for t in FINDING_PHRASES[kind])
    for sentence in NEGATIVE_PHRASES[kind]:
        assert label_report(sentence) == set(), sentence


def test_phantom_reports_match_their_findings():
    generator = PhantomGenerator(seed=3, size=32)
    patients = [generator.patient(i) for i in range(150)]
    result = finding_f1([p.report for p in patients], [p.findings for p in patients])
    assert {p.anatomy for p in patients} == {"chest", "head"}
    assert result["micro_f1"] == 1.0 and result["exact_match"] == 1.0, [
        (p.report, p.findings) for p in patients if label_report(p.report) != finding_types(p.findings)
    ]


def test_finding_f1_by_hand():
    predictions = [
        "Small right pleural effusion.",
        "Cardiomegaly. No pleural effusion.",
        "A 12 mm nodule in the left upper lobe.",
    ]
    references = [[{"type": "pleural_effusion"}], {"cardiomegaly", "nodule"}, []]
    result = finding_f1(predictions, references)
    # effusion: 1 TP; cardiomegaly: 1 TP; nodule: 1 FN (example 2) and 1 FP (example 3).
    # micro: P = R = 2 / 3, F1 = 2*2 / (2*2 + 1 + 1) = 2/3.
    assert result["micro_precision"] == pytest.approx(2 / 3)
    assert result["micro_recall"] == pytest.approx(2 / 3)
    assert result["micro_f1"] == pytest.approx(2 / 3)
    # macro over the types in references (effusion 1, cardiomegaly 1, nodule 0) = 2/3; only example 1 matches.
    assert result["macro_f1"] == pytest.approx(2 / 3)
    assert result["types"] == ["pleural_effusion", "cardiomegaly", "nodule"]
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["per_type"]["nodule"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["n"] == 3 and "NegEx" in result["protocol"]


def test_finding_f1_all_normal_is_perfect():
    result = finding_f1(["Heart size is normal. No pleural effusion."], [set()])
    assert result["micro_f1"] == 1.0 and result["exact_match"] == 1.0 and result["types"] == []


def test_finding_types_reads_the_dataset_column():
    assert finding_types(json.dumps([{"type": "mass", "lobe": "RUL"}, {"type": "nodule"}])) == {"mass", "nodule"}
    assert set(FINDING_TYPES) == set(FINDING_VOCABULARY)


def test_finding_f1_rejects_bad_input():
    with pytest.raises(ValueError, match="equal lengths"):
        finding_f1(["No effusion."], [set(), set()])
    with pytest.raises(ValueError, match=r"references\[0\].*pneumonia"):
        finding_f1(["No effusion."], [{"pneumonia"}])
    with pytest.raises(ValueError, match="references must not be empty"):
        finding_f1([], [])
    with pytest.raises(ValueError, match="predictions must be a list"):
        finding_f1("No effusion.", [set()])


def test_label_report_with_attributes_reads_side_and_lobe():
    report = (
        "Moderate left pleural effusion. No right pneumothorax. Consolidation in the right lower lobe. "
        "A 12 mm nodule in the left upper lobe. Enlarged heart. Bilateral pleural effusions."
    )
    assert label_report_with_attributes(report) == {
        ("pleural_effusion", "left", None),
        ("pleural_effusion", "bilateral", None),
        ("consolidation", "right", "RLL"),
        ("nodule", None, "LUL"),  # nodules have a lobe, not a side
        ("cardiomegaly", None, None),
    }
    head = "43 mm rim-enhancing mass in the left occipital lobe. 5 mm midline shift to the right."
    assert label_report_with_attributes(head) == {("tumour", "left", "occipital"), ("midline_shift", None, None)}
    # Two sides in one clause: the side is not guessed.
    assert label_report_with_attributes("Left effusion and right pneumothorax.") == {
        ("pleural_effusion", None, None), ("pneumothorax", None, None)}
    assert label_report_with_attributes("No effusion. Normal heart size.") == frozenset()
