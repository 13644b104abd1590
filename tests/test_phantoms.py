"""Virtual patients: determinism, image physics, findings in every modality, and reports that match them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from medm2g_diffusers.data.phantoms import (
    FINDING_PHRASES,
    FINDING_VOCABULARY,
    IMPRESSION_PHRASES,
    LOBE_NAMES,
    MODALITY_KEYS,
    MRI_SEQUENCES,
    NEGATIVE_PHRASES,
    NORMAL_PHRASES,
    TISSUE_LABELS,
    TISSUES,
    PhantomGenerator,
    inversion_recovery_signal,
    spin_echo_signal,
)

COHORT_SIZE = 300


@pytest.fixture(scope="module")
def generator() -> PhantomGenerator:
    return PhantomGenerator(seed=0, size=64)


@pytest.fixture(scope="module")
def cohort(generator):
    return [generator.patient(i) for i in range(COHORT_SIZE)]


def first(cohort, predicate):
    patient = next((p for p in cohort if predicate(p)), None)
    assert patient is not None, "the cohort has no patient of the kind this test needs"
    return patient


def types(patient) -> set[str]:
    return {f["type"] for f in patient.findings}


def interior(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """The mask away from its edges, where the CT point-spread function does not mix tissues."""
    return ndimage.binary_erosion(mask, iterations=iterations)


# ---- determinism -------------------------------------------------------------------------------------------


def assert_same_patient(a, b):
    assert (a.patient_id, a.anatomy, a.report, a.to_json(), a.slice_index) == (
        b.patient_id,
        b.anatomy,
        b.report,
        b.to_json(),
        b.slice_index,
    )
    for key in MODALITY_KEYS:
        if a.images[key] is None:
            assert b.images[key] is None
        else:
            assert a.images[key].tobytes() == b.images[key].tobytes(), key


def test_same_seed_and_size_give_byte_identical_patients(cohort):
    other = PhantomGenerator(seed=0, size=64)
    for index in range(6):
        assert_same_patient(cohort[index], other.patient(index))


def test_patient_does_not_depend_on_generation_order(cohort):
    fresh = PhantomGenerator(seed=0, size=64)
    for index in (11, 3, 7):  # out of order, skipping the others
        assert_same_patient(cohort[index], fresh.patient(index))


def test_forcing_the_natural_anatomy_changes_nothing(cohort, generator):
    for patient in cohort[:4]:
        index = int(patient.patient_id.rsplit("-", 1)[1])
        assert generator.anatomy(index) == patient.anatomy
        assert_same_patient(patient, generator.patient(index, anatomy=patient.anatomy))


def test_forced_anatomy_is_respected(generator):
    assert generator.patient(0, anatomy="chest").anatomy == "chest"
    assert generator.patient(0, anatomy="head").anatomy == "head"


def test_seeds_give_different_patients(cohort):
    other = PhantomGenerator(seed=1, size=64).patient(0, anatomy=cohort[0].anatomy)
    assert other.images["ct"].tobytes() != cohort[0].images["ct"].tobytes()
    assert other.patient_id == "phantom-s1-000000" and cohort[0].patient_id == "phantom-s0-000000"


# ---- shapes, dtypes, ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 96])
@pytest.mark.parametrize("anatomy", ["chest", "head"])
def test_images_have_the_documented_shape_dtype_and_range(size, anatomy):
    patient = PhantomGenerator(seed=3, size=size).patient(5, anatomy=anatomy)
    assert tuple(patient.images) == MODALITY_KEYS
    for key, image in patient.images.items():
        if key == "xray" and anatomy == "head":
            assert image is None
            continue
        assert image.shape == (size, size) and image.dtype == np.float32, key
        assert np.isfinite(image).all(), key
    ct = patient.images["ct"]
    assert -1024.0 <= ct.min() and ct.max() <= 3071.0 and ct.min() < -900.0  # air around the body
    if anatomy == "chest":
        xray = patient.images["xray"]
        assert 0.0 <= xray.min() and xray.max() <= 1.0 and xray.max() - xray.min() > 0.5
    for key in ("mri_t1", "mri_t2", "mri_pd", "mri_flair"):
        assert patient.images[key].min() >= 0.0 and 0.2 < patient.images[key].max() < 1.5, key


def test_volume_is_the_phantom_every_image_comes_from(generator, cohort):
    patient = first(cohort, lambda p: p.anatomy == "chest")
    index = int(patient.patient_id.rsplit("-", 1)[1])
    volume = generator.volume(index)
    assert volume.shape == (64, 64, 64) and volume.dtype == np.uint8
    assert volume.max() < len(TISSUES)
    # The CT is the label slice through the HU table: away from edges it equals the tissue HU up to noise.
    labels = volume[patient.slice_index]
    hu = np.array([t.hu for t in TISSUES], dtype=np.float32)[labels]
    inner = interior(labels == TISSUE_LABELS["lung"], 2)
    assert inner.sum() > 50
    assert np.abs(patient.images["ct"][inner] - hu[inner]).mean() < 15.0


# ---- CT ---------------------------------------------------------------------------------------------------


def test_ct_hounsfield_units_are_plausible(generator, cohort):
    patient = first(cohort, lambda p: p.anatomy == "chest" and p.is_normal)
    labels = generator.volume(int(patient.patient_id.rsplit("-", 1)[1]))[patient.slice_index]
    ct = patient.images["ct"]

    def mean_hu(*names, depth=1):
        mask = interior(np.isin(labels, [TISSUE_LABELS[n] for n in names]), depth)
        assert mask.sum() > 10, names
        return float(ct[mask].mean())

    assert abs(mean_hu("air", depth=3) + 1000.0) < 15.0
    assert -850.0 <= mean_hu("lung", depth=2) <= -700.0
    assert 20.0 <= mean_hu("muscle") <= 60.0
    assert ct[labels == TISSUE_LABELS["cancellous_bone"]].max() > 300.0  # vertebral body


def test_head_ct_shows_acute_haemorrhage_hyperdense(generator, cohort):
    patient = first(cohort, lambda p: "haemorrhage" in types(p))
    labels = generator.volume(int(patient.patient_id.rsplit("-", 1)[1]))[patient.slice_index]
    ct = patient.images["ct"]
    blood = interior(labels == TISSUE_LABELS["haematoma"])
    white = interior(labels == TISSUE_LABELS["white_matter"])
    assert 60.0 <= ct[blood].mean() <= 80.0
    assert ct[blood].mean() > ct[white].mean() + 30.0


# ---- X-ray ------------------------------------------------------------------------------------------------


def path_lengths(volume: np.ndarray, *names: str) -> np.ndarray:
    """Voxels of the given tissues along each anterior-posterior ray: ``(z, x)`` like the radiograph."""
    return np.isin(volume, [TISSUE_LABELS[n] for n in names]).sum(axis=1)


def test_xray_lungs_are_darker_than_heart_and_spine(generator, cohort):
    patient = first(cohort, lambda p: p.anatomy == "chest" and p.is_normal)
    volume = generator.volume(int(patient.patient_id.rsplit("-", 1)[1]))
    xray = patient.images["xray"]
    lung = path_lengths(volume, "lung") >= 20
    heart = path_lengths(volume, "myocardium", "blood") >= 12
    spine = (path_lengths(volume, "cancellous_bone") >= 4) & (path_lengths(volume, "lung") < 4)
    assert lung.sum() > 100 and heart.sum() > 20 and spine.sum() > 20
    assert xray[lung].mean() + 0.15 < xray[heart].mean()
    assert xray[lung].mean() + 0.15 < xray[spine].mean()


def test_xray_effusion_side_is_brighter_at_the_lung_base(generator, cohort):
    def one_sided_effusion(p):
        effusion = next((f for f in p.findings if f["type"] == "pleural_effusion"), None)
        clear = not types(p) & {"pneumothorax", "mass", "consolidation"}
        return effusion is not None and effusion["side"] != "bilateral" and effusion["size"] != "small" and clear

    patient = first(cohort, one_sided_effusion)
    volume = generator.volume(int(patient.patient_id.rsplit("-", 1)[1]))
    xray = patient.images["xray"]
    fluid = path_lengths(volume, "pleural_fluid") >= 4
    # The same rows on the other side, mirrored about the midline, where that side still has aerated lung.
    mirrored = fluid[:, ::-1] & (path_lengths(volume, "lung") >= 8) & (path_lengths(volume, "pleural_fluid") == 0)
    pairs = fluid & mirrored[:, ::-1]
    assert pairs.sum() > 10
    assert xray[pairs].mean() > xray[:, ::-1][pairs].mean() + 0.1


def test_xray_shows_the_pacemaker_as_the_brightest_object(cohort):
    patient = first(cohort, lambda p: "pacemaker" in types(p))
    side = next(f["side"] for f in patient.findings if f["type"] == "pacemaker")
    xray = patient.images["xray"]
    row, col = np.unravel_index(np.argmax(xray), xray.shape)
    assert xray[row, col] > 0.95
    # Radiological convention: the patient's left is on the image right.
    assert (col >= 32) == (side == "left")


# ---- MRI --------------------------------------------------------------------------------------------------


def test_signal_equations_and_csf_nulling():
    one = np.array([1.0])
    assert spin_echo_signal(one, one * 800.0, one * 80.0, tr=1e9, te=0.0)[0] == pytest.approx(1.0)
    seq = MRI_SEQUENCES["mri_flair"]
    csf = TISSUES[TISSUE_LABELS["csf"]]
    nulled = inversion_recovery_signal(one, one * csf.t1_ms, one * csf.t2_ms, seq["tr_ms"], seq["te_ms"], seq["ti_ms"])
    assert nulled[0] < 1e-4
    assert seq["ti_ms"] == pytest.approx(csf.t1_ms * np.log(2.0), rel=0.05)


def test_flair_nulls_csf_that_is_bright_on_t2(generator, cohort):
    patient = first(cohort, lambda p: p.anatomy == "head" and p.is_normal)
    labels = generator.volume(int(patient.patient_id.rsplit("-", 1)[1]))[patient.slice_index]
    csf = interior(labels == TISSUE_LABELS["csf"])
    white = interior(labels == TISSUE_LABELS["white_matter"], 2)
    assert csf.sum() > 5 and white.sum() > 50
    t2, flair = patient.images["mri_t2"], patient.images["mri_flair"]
    assert t2[csf].mean() / t2[white].mean() > 1.5
    assert flair[csf].mean() / flair[white].mean() < 0.5
    t1 = patient.images["mri_t1"]
    assert t1[white].mean() > t1[interior(labels == TISSUE_LABELS["grey_matter"])].mean()  # T1: WM > GM


def test_tumour_oedema_is_bright_on_t2_and_flair_and_dark_on_t1(generator, cohort):
    patient = first(cohort, lambda p: "tumour" in types(p))
    labels = generator.volume(int(patient.patient_id.rsplit("-", 1)[1]))[patient.slice_index]
    oedema = interior(labels == TISSUE_LABELS["oedema"])
    white = interior(labels == TISSUE_LABELS["white_matter"], 2)
    rim = labels == TISSUE_LABELS["enhancing_tumour"]
    assert oedema.sum() > 5 and white.sum() > 50 and rim.sum() > 3
    images = patient.images
    for key in ("mri_t2", "mri_flair"):
        assert images[key][oedema].mean() > 1.3 * images[key][white].mean(), key
    assert images["mri_t1"][oedema].mean() < images["mri_t1"][white].mean()
    assert images["mri_t1"][rim].mean() > images["mri_t1"][oedema].mean()  # the enhancing rim


def test_effusion_is_bright_on_t2(generator, cohort):
    patient = first(cohort, lambda p: "pleural_effusion" in types(p))
    labels = generator.volume(int(patient.patient_id.rsplit("-", 1)[1]))[patient.slice_index]
    fluid = labels == TISSUE_LABELS["pleural_fluid"]
    muscle = interior(labels == TISSUE_LABELS["muscle"])
    assert fluid.sum() > 5
    assert patient.images["mri_t2"][fluid].mean() > 2.0 * patient.images["mri_t2"][muscle].mean()


# ---- findings ---------------------------------------------------------------------------------------------

# Label that each finding puts into the axial slice shared by CT and MRI.
FINDING_LABEL = {
    "pleural_effusion": "pleural_fluid",
    "nodule": "tumour",
    "mass": "tumour",
    "consolidation": "consolidation",
    "pacemaker": "metal",
    "tumour": "enhancing_tumour",
    "haemorrhage": "haematoma",
}


def test_every_finding_lies_in_the_ct_and_mri_slice(generator, cohort):
    checked = 0
    for patient in cohort[:120]:
        wanted = [FINDING_LABEL[t] for t in types(patient) if t in FINDING_LABEL]
        if not wanted:
            continue
        labels = generator.volume(int(patient.patient_id.rsplit("-", 1)[1]))[patient.slice_index]
        for name in wanted:
            assert (labels == TISSUE_LABELS[name]).any(), (patient.patient_id, name)
            checked += 1
    assert checked > 40


def test_about_a_third_of_patients_are_normal(cohort):
    normal = sum(p.is_normal for p in cohort) / len(cohort)
    assert 0.25 <= normal <= 0.42
    anatomies = [p.anatomy for p in cohort]
    assert 0.4 <= anatomies.count("chest") / len(cohort) <= 0.6


def test_every_finding_type_appears_and_findings_co_occur(cohort):
    seen = {f["type"] for p in cohort for f in p.findings}
    assert seen == set(FINDING_VOCABULARY)
    assert any(len(types(p) - {"midline_shift"}) >= 2 for p in cohort)


def test_findings_use_the_vocabulary_and_are_json(cohort):
    for patient in cohort:
        assert json.loads(patient.to_json()) == patient.findings
        for finding in patient.findings:
            spec = FINDING_VOCABULARY[finding["type"]]
            assert spec["anatomy"] == patient.anatomy
            assert set(finding) - {"type"} == set(spec) - {"anatomy"}, finding
            for key, value in finding.items():
                if key == "type":
                    continue
                allowed = spec[key]
                if isinstance(allowed, dict):
                    assert allowed["min"] <= value <= allowed["max"], finding
                else:
                    assert value in allowed, finding
        if patient.anatomy == "head":
            assert patient.images["xray"] is None


# ---- reports ----------------------------------------------------------------------------------------------


def attribute_words(finding: dict) -> list[str]:
    words = []
    for key, value in finding.items():
        if key in ("side", "size", "direction"):
            words.append(value)
        elif key == "lobe":
            words.append(LOBE_NAMES.get(value, value))
        elif key == "location":
            words.append(value.replace("_", " "))
        elif key == "size_mm":
            words.append(f"{value} mm")
    return words


def test_reports_state_every_finding_with_its_attributes(cohort):
    for patient in cohort:
        report = patient.report
        assert report.startswith("FINDINGS: ") and report.count(" IMPRESSION: ") == 1, report
        findings_part, impression = report.lower().split(" impression: ")
        for finding in patient.findings:
            for word in attribute_words(finding):
                assert word in findings_part, (word, report)
                assert word in impression, (word, report)


def test_reports_negate_every_absent_finding(cohort):
    for patient in cohort:
        present = types(patient)
        for kind, spec in FINDING_VOCABULARY.items():
            if spec["anatomy"] != patient.anatomy or kind in present:
                continue
            negatives = [p[0].upper() + p[1:] for p in NEGATIVE_PHRASES[kind]]
            assert any(n in patient.report for n in negatives), (kind, patient.report)


def test_normal_reports_say_so_in_the_impression(cohort):
    for patient in cohort:
        if patient.is_normal:
            impression = patient.report.split("IMPRESSION: ")[1]
            options = [p[0].upper() + p[1:] for p in NORMAL_PHRASES[f"{patient.anatomy}_impression"]]
            assert impression in options


def test_sentence_order_and_phrasing_vary(cohort):
    normal_chest = [p.report for p in cohort if p.anatomy == "chest" and p.is_normal]
    first_sentences = {r.split(". ")[0] for r in normal_chest}
    assert len(first_sentences) >= 5
    assert len(set(normal_chest)) == len(normal_chest)


def test_phrase_tables_have_at_least_five_phrasings_that_all_format():
    samples = {
        "side": "bilateral",
        "size": "moderate",
        "lobe": "right lower lobe",
        "size_mm": 17,
        "location": "basal ganglia",
        "direction": "left",
        "ipsilateral": "right",
        "s": "s",
        "a": "",
        "is": "are",
    }
    assert set(FINDING_PHRASES) == set(FINDING_VOCABULARY) == set(NEGATIVE_PHRASES) == set(IMPRESSION_PHRASES)
    for table in (FINDING_PHRASES, NEGATIVE_PHRASES, NORMAL_PHRASES):
        for kind, phrases in table.items():
            assert len(set(phrases)) >= 5, kind
            for phrase in phrases:
                assert phrase.format(**samples).endswith("."), phrase


# ---- argument checks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [31, 36, 24, 520, 64.0, "64", True, None])
def test_bad_size_is_rejected_naming_the_parameter(size):
    with pytest.raises(ValueError, match=r"size must be an integer multiple of 8 between 32 and 512"):
        PhantomGenerator(seed=0, size=size)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", None, False])
def test_bad_seed_is_rejected_naming_the_parameter(seed):
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer"):
        PhantomGenerator(seed=seed, size=64)


def test_bad_index_and_anatomy_are_rejected(generator):
    with pytest.raises(ValueError, match="index"):
        generator.patient(-1)
    with pytest.raises(ValueError, match="anatomy"):
        generator.patient(0, anatomy="knee")


def test_noiseless_render_is_the_same_patient_without_noise():
    gen = PhantomGenerator(seed=4, size=32)
    for index in range(4):
        noisy, clean = gen.patient(index), gen.patient(index, noiseless=True)
        assert noisy.report == clean.report and noisy.findings == clean.findings
        for key, image in noisy.images.items():
            if image is None:
                assert clean.images[key] is None
                continue
            residual = image - clean.images[key]
            assert 0 < np.abs(residual).mean()  # noise was there
            scale = 30.0 if key == "ct" else 0.1  # HU vs [0, 1]-ish units
            assert np.abs(residual).mean() < scale  # and it was only noise
