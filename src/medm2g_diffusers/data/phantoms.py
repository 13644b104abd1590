"""Deterministic virtual patients: one analytic 3-D phantom per patient, every image derived from it.

A patient is a function of ``(seed, index)`` only. Its anatomy (``chest`` or ``head``) and findings are drawn
from ``np.random.default_rng([seed, index, stream])``, so patient ``i`` never depends on how many patients are
generated or in which order, and the same ``(seed, index, size)`` gives byte-identical images on every run
(on one platform and numpy version: vectorised transcendental functions may differ in the last bit between
CPU instruction sets).

The phantom is a set of analytic shapes (ellipsoids, capsules, shells, planes) in millimetres, rasterised
into a tissue-label volume of ``(size, size, size)`` isotropic voxels over a fixed field of view (chest
400 mm, head 240 mm). All images come from that one volume:

* ``ct``: one axial slice (``volume[slice_index]``) mapped to Hounsfield units, with a small Gaussian
  point-spread function and noise. float32 HU, clipped to the scanner range ``[-1024, 3071]``.
* ``xray`` (chest only): a digitally reconstructed radiograph. Linear attenuation
  ``mu = mu_water * (1 + HU / 1000)`` is integrated along the anterior-posterior axis (parallel beam),
  transmitted intensity is ``I = exp(-integral(mu))`` (Beer-Lambert), and the radiograph shows
  ``-log(I)`` through a logistic characteristic curve, so bone, heart and soft tissue are bright and lungs dark.
  float32 in ``[0, 1]``.
* ``mri_t1``, ``mri_t2``, ``mri_pd``: the same axial slice through the spin-echo equation
  ``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)``; ``mri_flair`` through inversion recovery
  ``S = PD * |1 - 2 exp(-TI/T1) + exp(-TR/T1)| * exp(-TE/T2)`` with TI chosen to null CSF. One smooth
  multiplicative coil bias field per patient and Rician noise. float32 >= 0, arbitrary units in about
  ``[0, 1]``. Head MRI is post-gadolinium: enhancing tumour has a shortened T1 (see ``TISSUES``).

Orientation (radiological convention, the same for every modality):

* volume axes are ``(z, y, x)``: ``z`` cranial -> caudal, ``y`` anterior -> posterior, ``x`` from the
  patient's right to the patient's left;
* axial CT/MRI images are ``(y, x)``: anterior at the top, the patient's left on the image right;
* the chest radiograph is a PA projection shown as ``(z, x)``: head at the top, the patient's left on the
  image right.

Findings are chosen first and the axial level is chosen so that every finding lies in the CT/MRI slice;
each finding also shows in the radiograph. Reports are written from the same structured findings, which
are kept beside each report as JSON (``VirtualPatient.to_json``).

Example:

```py
>>> from medm2g_diffusers.data.phantoms import PhantomGenerator
>>> patient = PhantomGenerator(seed=0, size=64).patient(7)
>>> sorted(patient.images)
['ct', 'mri_flair', 'mri_pd', 'mri_t1', 'mri_t2', 'xray']
>>> patient.report.startswith("FINDINGS:")
True

```
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "ANATOMIES",
    "BRAIN_LOBES",
    "FIELD_OF_VIEW_MM",
    "HAEMORRHAGE_LOCATIONS",
    "LOBES",
    "LOBE_NAMES",
    "FINDING_PHRASES",
    "FINDING_VOCABULARY",
    "IMPRESSION_PHRASES",
    "MODALITY_KEYS",
    "MRI_SEQUENCES",
    "NEGATIVE_PHRASES",
    "NORMAL_FRACTION",
    "NORMAL_PHRASES",
    "TISSUES",
    "TISSUE_LABELS",
    "PhantomGenerator",
    "Tissue",
    "VirtualPatient",
    "inversion_recovery_signal",
    "spin_echo_signal",
]

MODALITY_KEYS: tuple[str, ...] = ("xray", "ct", "mri_t1", "mri_t2", "mri_pd", "mri_flair")
ANATOMIES: tuple[str, ...] = ("chest", "head")
NORMAL_FRACTION = 1.0 / 3.0

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 32, 512, 8
FIELD_OF_VIEW_MM = {"chest": 400.0, "head": 240.0}

# ----------------------------------------------------------------------------------------------------------
# Tissues
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tissue:
    """Physical properties of one tissue class of the label volume.

    Args:
        name: label name, e.g. ``"white_matter"``.
        hu: CT number in Hounsfield units (unenhanced CT).
        t1_ms, t2_ms: relaxation times at 1.5 T in milliseconds.
        pd: proton density relative to free water (CSF = 1).
        source: where the values come from; keys refer to the references in ``docs/phantoms.md``.
    """

    name: str
    hu: float
    t1_ms: float
    t2_ms: float
    pd: float
    source: str


# Gadolinium shortens T1 and T2 where the blood-brain barrier is broken: 1/T = 1/T0 + r * C
# (relaxivities of a macrocyclic agent in plasma at 1.5 T, Rohrer et al. 2005; C is a typical tissue level).
_GD_R1_PER_MM_S, _GD_R2_PER_MM_S, _GD_TISSUE_MM = 4.0, 5.0, 0.25
_TUMOUR_T1_MS, _TUMOUR_T2_MS = 1200.0, 110.0
_ENHANCING_T1_MS = 1.0 / (1.0 / _TUMOUR_T1_MS + _GD_R1_PER_MM_S * _GD_TISSUE_MM / 1000.0)
_ENHANCING_T2_MS = 1.0 / (1.0 / _TUMOUR_T2_MS + _GD_R2_PER_MM_S * _GD_TISSUE_MM / 1000.0)

# One table, label = position. Air and metal carry placeholder relaxation times: PD = 0 gives no signal.
TISSUES: tuple[Tissue, ...] = (
    Tissue("air", -1000.0, 1.0, 1.0, 0.0, "HU scale definition; no MR signal"),
    Tissue("fat", -90.0, 343.0, 58.0, 1.0, "HU [hu]; T1/T2 subcutaneous fat [debazelaire]; PD [brainweb]"),
    Tissue("muscle", 45.0, 1008.0, 44.0, 0.80, "HU [hu]; T1/T2 skeletal muscle [stanisz]; PD water content"),
    Tissue("lung", -820.0, 1280.0, 40.0, 0.20, "HU [hu]; T1 [stadler]; PD tissue density; T2 chosen"),
    Tissue("blood", 40.0, 1441.0, 290.0, 0.90, "HU [hu]; T1/T2 [stanisz]; spin-echo flow void applied"),
    Tissue("myocardium", 45.0, 1030.0, 40.0, 0.80, "HU [hu]; T1/T2 heart [stanisz]; PD water content"),
    Tissue("liver", 55.0, 576.0, 46.0, 0.75, "HU [hu]; T1/T2 [stanisz]; PD water content"),
    Tissue("cancellous_bone", 350.0, 549.0, 49.0, 0.60, "HU [hu]; T1/T2 vertebral marrow [debazelaire]; PD chosen"),
    Tissue("cortical_bone", 1000.0, 200.0, 0.5, 0.05, "HU [hu]; T1, T2* [reichert]: no spin-echo signal"),
    Tissue("csf", 8.0, 2569.0, 329.0, 1.0, "HU [hu]; T1/T2/PD [brainweb]"),
    Tissue("grey_matter", 40.0, 833.0, 83.0, 0.86, "HU [hu]; T1/T2/PD [brainweb]"),
    Tissue("white_matter", 26.0, 500.0, 70.0, 0.77, "HU [hu]; T1/T2/PD [brainweb]"),
    Tissue("pleural_fluid", 10.0, 2569.0, 329.0, 1.0, "HU transudate [hu]; free water, as CSF [brainweb]"),
    Tissue("consolidation", 35.0, 1280.0, 100.0, 0.85, "HU [hu]; T1 lung [stadler]; T2/PD chosen (fluid-filled)"),
    Tissue("tumour", 40.0, _TUMOUR_T1_MS, _TUMOUR_T2_MS, 0.85, "HU soft tissue [hu]; T1/T2/PD chosen"),
    Tissue(
        "enhancing_tumour",
        40.0,
        round(_ENHANCING_T1_MS, 1),
        round(_ENHANCING_T2_MS, 1),
        0.85,
        "tumour with gadolinium: 1/T = 1/T0 + r*C [rohrer]",
    ),
    Tissue("necrosis", 15.0, 2000.0, 200.0, 0.95, "chosen: fluid-like necrotic core"),
    Tissue("oedema", 18.0, 1150.0, 180.0, 0.92, "chosen: vasogenic oedema, long T1 and T2"),
    Tissue("haematoma", 70.0, 900.0, 45.0, 0.85, "HU acute blood [hu]; acute deoxyhaemoglobin, short T2 [bradley]"),
    Tissue("metal", 3071.0, 1.0, 1.0, 0.0, "CT clips at the 12-bit maximum; signal void on MRI"),
)
TISSUE_LABELS: dict[str, int] = {tissue.name: label for label, tissue in enumerate(TISSUES)}


class _T:
    """Label ids by name, for readable rasterisation code."""

    air = TISSUE_LABELS["air"]
    fat = TISSUE_LABELS["fat"]
    muscle = TISSUE_LABELS["muscle"]
    lung = TISSUE_LABELS["lung"]
    blood = TISSUE_LABELS["blood"]
    myocardium = TISSUE_LABELS["myocardium"]
    liver = TISSUE_LABELS["liver"]
    cancellous = TISSUE_LABELS["cancellous_bone"]
    cortical = TISSUE_LABELS["cortical_bone"]
    csf = TISSUE_LABELS["csf"]
    gm = TISSUE_LABELS["grey_matter"]
    wm = TISSUE_LABELS["white_matter"]
    fluid = TISSUE_LABELS["pleural_fluid"]
    consolidation = TISSUE_LABELS["consolidation"]
    tumour = TISSUE_LABELS["tumour"]
    enhancing = TISSUE_LABELS["enhancing_tumour"]
    necrosis = TISSUE_LABELS["necrosis"]
    oedema = TISSUE_LABELS["oedema"]
    haematoma = TISSUE_LABELS["haematoma"]
    metal = TISSUE_LABELS["metal"]


_HU = np.array([t.hu for t in TISSUES], dtype=np.float32)
_T1 = np.array([t.t1_ms for t in TISSUES], dtype=np.float64)
_T2 = np.array([t.t2_ms for t in TISSUES], dtype=np.float64)
_PD = np.array([t.pd for t in TISSUES], dtype=np.float64)

# X-ray: mu of water at an effective energy of ~60 keV (NIST XCOM: 0.206 cm^-1). Metal is far beyond the
# CT scale, so its attenuation is set directly, of the order of titanium at that energy (> 10x water).
_MU_WATER_PER_MM = 0.0206
_MU_PER_MM = (_MU_WATER_PER_MM * np.clip(1.0 + _HU.astype(np.float64) / 1000.0, 0.0, None)).astype(np.float32)
_MU_PER_MM[_T.metal] = 0.25
# Radiograph characteristic curve: a logistic function of -log(I/I0) (film density is sigmoid in log
# exposure), rescaled so that unattenuated beam is 0: lungs dark grey, heart and abdomen light, bone white.
_XRAY_MIDPOINT, _XRAY_WIDTH = 2.8, 0.75

# Spin-echo images show flowing blood dark (spins leave the slice between the 90 and 180 degree pulses).
_FLOW_VOID = 0.1


def spin_echo_signal(pd: np.ndarray, t1: np.ndarray, t2: np.ndarray, tr: float, te: float) -> np.ndarray:
    """Spin-echo signal ``S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)`` (times in ms)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery_signal(
    pd: np.ndarray, t1: np.ndarray, t2: np.ndarray, tr: float, te: float, ti: float
) -> np.ndarray:
    """Magnitude inversion-recovery signal ``S = PD * |1 - 2 exp(-TI/T1) + exp(-TR/T1)| * exp(-TE/T2)``."""
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


_CSF_T1 = TISSUES[_T.csf].t1_ms
_FLAIR_TR, _FLAIR_TE = 9000.0, 120.0
# Null CSF exactly: 1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0  ->  TI = T1 ln(2 / (1 + exp(-TR/T1))) (~ T1 ln 2).
_FLAIR_TI = _CSF_T1 * math.log(2.0 / (1.0 + math.exp(-_FLAIR_TR / _CSF_T1)))

MRI_SEQUENCES: dict[str, dict[str, float | str]] = {
    "mri_t1": {"sequence": "spin_echo", "tr_ms": 500.0, "te_ms": 15.0},
    "mri_t2": {"sequence": "spin_echo", "tr_ms": 4000.0, "te_ms": 100.0},
    "mri_pd": {"sequence": "spin_echo", "tr_ms": 4000.0, "te_ms": 15.0},
    "mri_flair": {
        "sequence": "inversion_recovery",
        "tr_ms": _FLAIR_TR,
        "te_ms": _FLAIR_TE,
        "ti_ms": round(_FLAIR_TI, 1),
    },
}


def _mri_lookup(anatomy: str) -> dict[str, np.ndarray]:
    """Per-label MRI signal for each contrast, scaled so the brightest tissue is 0.8 (room for bias/noise)."""
    pd = _PD.copy()
    if anatomy == "chest":
        pd[_T.blood] *= _FLOW_VOID
    tables = {}
    for key, seq in MRI_SEQUENCES.items():
        if seq["sequence"] == "spin_echo":
            signal = spin_echo_signal(pd, _T1, _T2, seq["tr_ms"], seq["te_ms"])
        else:
            signal = inversion_recovery_signal(pd, _T1, _T2, seq["tr_ms"], seq["te_ms"], _FLAIR_TI)
        tables[key] = (0.8 * signal / signal.max()).astype(np.float32)
    return tables


_MRI_LUT = {anatomy: _mri_lookup(anatomy) for anatomy in ANATOMIES}
_CT_NOISE_HU = {"chest": 6.0, "head": 3.0}
_XRAY_NOISE, _MRI_NOISE = 0.008, 0.012
_BIAS_STRENGTH = 0.12

# ----------------------------------------------------------------------------------------------------------
# Findings vocabulary and report phrasing
# ----------------------------------------------------------------------------------------------------------

LOBES: tuple[str, ...] = ("RUL", "RML", "RLL", "LUL", "LLL")
LOBE_NAMES = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
}
BRAIN_LOBES: tuple[str, ...] = ("frontal", "parietal", "temporal", "occipital")
HAEMORRHAGE_LOCATIONS: tuple[str, ...] = (*BRAIN_LOBES, "basal_ganglia")
_SIDES = ["left", "right"]

FINDING_VOCABULARY: dict[str, dict[str, Any]] = {
    "pleural_effusion": {"anatomy": "chest", "side": [*_SIDES, "bilateral"], "size": ["small", "moderate", "large"]},
    "cardiomegaly": {"anatomy": "chest"},
    "nodule": {"anatomy": "chest", "lobe": list(LOBES), "size_mm": {"min": 10, "max": 29}},
    "mass": {"anatomy": "chest", "lobe": list(LOBES), "size_mm": {"min": 30, "max": 60}},
    "pneumothorax": {"anatomy": "chest", "side": list(_SIDES), "size": ["small", "large"]},
    "consolidation": {"anatomy": "chest", "side": list(_SIDES), "lobe": list(LOBES)},
    "pacemaker": {"anatomy": "chest", "side": list(_SIDES)},
    "tumour": {"anatomy": "head", "side": list(_SIDES), "lobe": list(BRAIN_LOBES), "size_mm": {"min": 16, "max": 50}},
    "haemorrhage": {
        "anatomy": "head",
        "side": list(_SIDES),
        "location": list(HAEMORRHAGE_LOCATIONS),
        "size_mm": {"min": 12, "max": 40},
    },
    # Not drawn on its own: the mass effect of a tumour or haemorrhage, measured from the phantom.
    "midline_shift": {"anatomy": "head", "direction": list(_SIDES), "size_mm": {"min": 3, "max": 15}},
}
_PRIMARY_FINDINGS = {
    "chest": (
        ("pleural_effusion", 0.22),
        ("cardiomegaly", 0.15),
        ("nodule", 0.15),
        ("mass", 0.10),
        ("pneumothorax", 0.12),
        ("consolidation", 0.15),
        ("pacemaker", 0.11),
    ),
    "head": (("tumour", 0.55), ("haemorrhage", 0.45)),
}
_FINDING_COUNT_P = {"chest": (0.55, 0.30, 0.15), "head": (0.85, 0.15)}

# Templates are str.format-ed with the fields of `_phrase_fields`; the first letter is capitalised afterwards.
FINDING_PHRASES: dict[str, list[str]] = {
    "pleural_effusion": [
        "{size} {side} pleural effusion{s}.",
        "there {is} {a}{size} {side} pleural effusion{s}.",
        "{a}{size} {side} pleural effusion{s} {is} present, blunting the costophrenic angle{s}.",
        "blunting of the {side} costophrenic angle{s} due to {a}{size} pleural effusion{s}.",
        "{size} {side} pleural effusion{s} layering dependently.",
        "{side} pleural effusion{s}, {size} in size.",
    ],
    "cardiomegaly": [
        "the heart is enlarged.",
        "cardiomegaly.",
        "the cardiac silhouette is enlarged.",
        "enlarged cardiac silhouette consistent with cardiomegaly.",
        "heart size is increased, in keeping with cardiomegaly.",
    ],
    "nodule": [
        "{size_mm} mm nodule in the {lobe}.",
        "there is a {size_mm} mm pulmonary nodule in the {lobe}.",
        "a {size_mm} mm solid nodule is seen in the {lobe}.",
        "{lobe} nodule measuring {size_mm} mm.",
        "well-circumscribed {size_mm} mm nodule in the {lobe}.",
    ],
    "mass": [
        "{size_mm} mm mass in the {lobe}.",
        "there is a {size_mm} mm mass in the {lobe}.",
        "a lobulated {size_mm} mm mass is present in the {lobe}.",
        "{lobe} mass measuring {size_mm} mm.",
        "large {lobe} mass, {size_mm} mm in diameter.",
    ],
    "pneumothorax": [
        "{size} {side} pneumothorax.",
        "there is a {size} {side} pneumothorax.",
        "a {size} {side} pneumothorax is present with a visible pleural edge.",
        "{side} pneumothorax, {size}.",
        "{size} {side}-sided pneumothorax with the lung edge retracted from the chest wall.",
    ],
    "consolidation": [
        "{lobe} consolidation.",
        "airspace consolidation in the {lobe}.",
        "there is consolidation of the {lobe}.",
        "dense opacity in the {lobe} consistent with consolidation.",
        "focal consolidation in the {side} lung, involving the {lobe}.",
    ],
    "pacemaker": [
        "{side}-sided cardiac pacemaker with the lead tip in the expected position.",
        "a {side} chest wall pacemaker is present.",
        "cardiac pacemaker, generator in the {side} chest wall.",
        "{side} pectoral pacemaker generator with a single lead.",
        "there is a {side}-sided pacemaker.",
    ],
    "tumour": [
        "{size_mm} mm rim-enhancing mass in the {side} {lobe} lobe with central necrosis and surrounding oedema.",
        "there is a {size_mm} mm {side} {lobe} mass with peripheral enhancement, a necrotic centre and "
        "surrounding vasogenic oedema.",
        "{side} {lobe} lobe mass measuring {size_mm} mm, with an enhancing rim, central necrosis and "
        "perilesional edema.",
        "a heterogeneous enhancing lesion is seen in the {side} {lobe} lobe, measuring {size_mm} mm, with "
        "surrounding T2/FLAIR hyperintense oedema.",
        "ring-enhancing {size_mm} mm mass in the {side} {lobe} lobe with extensive surrounding edema.",
    ],
    "haemorrhage": [
        "{size_mm} mm acute intraparenchymal haemorrhage in the {side} {location}.",
        "there is an acute {side} {location} haematoma measuring {size_mm} mm.",
        "hyperdense {size_mm} mm haemorrhage in the {side} {location} with a thin rim of oedema.",
        "acute intracerebral hemorrhage in the {side} {location}, {size_mm} mm.",
        "a {size_mm} mm hyperdense acute hematoma is centred in the {side} {location}.",
    ],
    "midline_shift": [
        "{size_mm} mm midline shift to the {direction}.",
        "there is {size_mm} mm of {direction}ward midline shift.",
        "mass effect with {size_mm} mm shift of the midline to the {direction}.",
        "midline shift of {size_mm} mm toward the {direction}, with effacement of the {ipsilateral} "
        "lateral ventricle.",
        "subfalcine shift of {size_mm} mm to the {direction}.",
    ],
}
NEGATIVE_PHRASES: dict[str, list[str]] = {
    "pleural_effusion": [
        "no pleural effusion.",
        "there is no pleural effusion.",
        "no pleural effusions are seen.",
        "no evidence of pleural effusion.",
        "no pleural effusion; the costophrenic angles are sharp.",
    ],
    "cardiomegaly": [
        "heart size is normal.",
        "the heart is not enlarged.",
        "normal cardiac silhouette.",
        "cardiac size is within normal limits.",
        "the cardiomediastinal silhouette is normal in size.",
    ],
    "nodule": [
        "no pulmonary nodules.",
        "no suspicious pulmonary nodule.",
        "there is no lung nodule.",
        "no focal nodules are identified.",
        "no nodular opacity.",
    ],
    "mass": [
        "no lung mass.",
        "no pulmonary mass is seen.",
        "there is no mass in the lungs.",
        "no mass lesion in the chest.",
        "no evidence of a pulmonary mass.",
    ],
    "pneumothorax": [
        "no pneumothorax.",
        "there is no pneumothorax.",
        "no evidence of pneumothorax.",
        "pneumothorax is not seen.",
        "no pneumothorax is identified.",
    ],
    "consolidation": [
        "no focal consolidation.",
        "the lungs are clear without consolidation.",
        "there is no consolidation.",
        "no airspace consolidation.",
        "no evidence of consolidation.",
    ],
    "pacemaker": [
        "no pacemaker or other implanted device.",
        "no implanted cardiac device is seen.",
        "there is no pacemaker.",
        "no radiopaque device is present.",
        "no support devices or pacemaker.",
    ],
    "tumour": [
        "no intracranial mass.",
        "there is no mass lesion.",
        "no space-occupying lesion.",
        "no abnormal enhancement or mass.",
        "no evidence of an intracranial tumour.",
    ],
    "haemorrhage": [
        "no intracranial haemorrhage.",
        "there is no intracranial hemorrhage.",
        "no acute haemorrhage.",
        "no hemorrhage is seen.",
        "no evidence of intracranial haemorrhage.",
    ],
    "midline_shift": [
        "no midline shift.",
        "the midline is maintained without shift.",
        "there is no midline shift.",
        "midline structures are central, no shift.",
        "no shift of the midline structures.",
    ],
}
NORMAL_PHRASES: dict[str, list[str]] = {
    "chest_bones": [
        "no acute osseous abnormality.",
        "the visualised bones are intact.",
        "no acute bony abnormality.",
        "osseous structures are unremarkable.",
        "the ribs and spine are intact.",
    ],
    "head_ventricles": [
        "ventricles are normal in size.",
        "the ventricles are normal in size and configuration.",
        "normal ventricular size.",
        "the ventricular system is not dilated.",
        "ventricles and sulci are normal for age.",
    ],
    "head_grey_white": [
        "grey-white matter differentiation is preserved.",
        "normal grey-white matter differentiation.",
        "the brain parenchyma is otherwise normal.",
        "gray-white differentiation is maintained.",
        "normal brain parenchymal signal and attenuation.",
    ],
    "chest_impression": [
        "no acute cardiopulmonary abnormality.",
        "normal chest.",
        "no acute cardiopulmonary process.",
        "no active disease.",
        "normal study of the chest.",
    ],
    "head_impression": [
        "no acute intracranial abnormality.",
        "normal brain.",
        "no intracranial abnormality.",
        "normal study of the head.",
        "no acute intracranial process.",
    ],
}
IMPRESSION_PHRASES: dict[str, list[str]] = {
    "pleural_effusion": ["{size} {side} pleural effusion{s}.", "{side} pleural effusion{s}, {size}."],
    "cardiomegaly": ["cardiomegaly.", "enlarged heart."],
    "nodule": ["{size_mm} mm {lobe} nodule.", "{lobe} nodule, {size_mm} mm."],
    "mass": ["{size_mm} mm {lobe} mass.", "{lobe} mass, {size_mm} mm."],
    "pneumothorax": ["{size} {side} pneumothorax.", "{side} pneumothorax, {size}."],
    "consolidation": ["{lobe} consolidation.", "consolidation in the {lobe}."],
    "pacemaker": ["{side}-sided pacemaker.", "pacemaker in the {side} chest wall."],
    "tumour": [
        "{side} {lobe} enhancing mass with oedema, {size_mm} mm.",
        "{size_mm} mm necrotic {side} {lobe} tumour with surrounding edema.",
    ],
    "haemorrhage": [
        "acute {side} {location} haemorrhage, {size_mm} mm.",
        "{size_mm} mm acute {side} {location} hemorrhage.",
    ],
    "midline_shift": [
        "{size_mm} mm midline shift to the {direction}.",
        "{direction}ward midline shift, {size_mm} mm.",
    ],
}

# ----------------------------------------------------------------------------------------------------------
# Rasterisation: analytic shapes painted into a label slab
# ----------------------------------------------------------------------------------------------------------

MaskFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Shape = tuple[MaskFn, tuple[float, float, float, float, float, float]]
_INF = math.inf
_EVERYWHERE = (-_INF, _INF, -_INF, _INF, -_INF, _INF)


@functools.lru_cache(maxsize=64)
def _allowed_table(labels: tuple[int, ...]) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(labels)] = True
    table.flags.writeable = False
    return table


def _allowed(labels: Sequence[int]) -> np.ndarray:
    """Boolean lookup over label values: True for the labels a paint call may overwrite."""
    return _allowed_table(tuple(labels))


class _Canvas:
    """A slab of the label volume, rows ``z_rows`` of ``(size, size, size)`` voxels over a field of view.

    Coordinates are voxel centres in mm, centred on the volume: ``x`` right -> left, ``y`` anterior ->
    posterior, ``z`` cranial -> caudal.
    """

    def __init__(self, size: int, fov_mm: float, z_rows: slice) -> None:
        self.voxel_mm = fov_mm / size
        self.first_mm = 0.5 * self.voxel_mm - fov_mm / 2.0
        centres = ((np.arange(size) + 0.5) * self.voxel_mm - fov_mm / 2.0).astype(np.float32)
        self.x = self.y = centres
        self.z = centres[z_rows]
        self.z_offset = z_rows.start or 0
        self.labels = np.zeros((len(self.z), size, size), dtype=np.uint8)

    def _span(self, lo: float, hi: float, offset: int, n: int) -> slice:
        """Indices of the voxel centres inside ``[lo, hi]`` mm along an axis of ``n`` voxels from ``offset``."""
        start = 0 if lo == -_INF else math.ceil((lo - self.first_mm) / self.voxel_mm) - offset
        stop = n if hi == _INF else math.floor((hi - self.first_mm) / self.voxel_mm) + 1 - offset
        return slice(min(max(start, 0), n), min(max(stop, 0), n))

    def paint(self, label: int, shape: Shape, only: Sequence[int] | None = None) -> None:
        """Sets ``label`` where the shape's mask is true, optionally only over the labels in ``only``."""
        mask_fn, (x0, x1, y0, y1, z0, z1) = shape
        nz, ny, nx = self.labels.shape
        sz, sy, sx = self._span(z0, z1, self.z_offset, nz), self._span(y0, y1, 0, ny), self._span(x0, x1, 0, nx)
        if sz.start >= sz.stop or sy.start >= sy.stop or sx.start >= sx.stop:
            return
        block = self.labels[sz, sy, sx]
        mask = np.broadcast_to(
            mask_fn(self.x[sx][None, None, :], self.y[sy][None, :, None], self.z[sz][:, None, None]), block.shape
        )
        if only is not None:
            mask = mask & _allowed(only)[block]
        block[mask] = label

    def paint_columns(
        self,
        label: int,
        footprint: Callable[[np.ndarray, np.ndarray], np.ndarray],
        mask_fn: MaskFn,
        only: Sequence[int],
    ) -> None:
        """Like ``paint`` for thin surfaces: ``mask_fn`` is evaluated only in the ``(y, x)`` columns where the
        2-D ``footprint(x, y)`` is true, on arrays of shape `(nz, columns)`."""
        rows, cols = np.nonzero(footprint(self.x[None, :], self.y[:, None]))
        mask = mask_fn(self.x[cols][None, :], self.y[rows][None, :], self.z[:, None])
        mask &= _allowed(only)[self.labels[:, rows, cols]]
        z_index, column = np.nonzero(mask)
        self.labels[z_index, rows[column], cols[column]] = label


# Shape parameters are converted to Python floats: numpy float64 scalars would promote the float32 grids.


def _ellipsoid(centre: Sequence[float], semi: Sequence[float]) -> Shape:
    cx, cy, cz = map(float, centre)
    ax, ay, az = map(float, semi)

    def mask(x, y, z):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0

    return mask, (cx - ax, cx + ax, cy - ay, cy + ay, cz - az, cz + az)


def _rotated_ellipsoid(centre: Sequence[float], semi: Sequence[float], axes: np.ndarray) -> Shape:
    """Ellipsoid whose ``i``-th semi-axis points along the unit row vector ``axes[i]`` (``(3, 3)``)."""
    c = np.asarray(centre, dtype=np.float64)
    semi = np.asarray(semi, dtype=np.float64)
    cx, cy, cz = map(float, c)
    rows = [tuple(float(v) / float(a) for v in row) for row, a in zip(axes, semi)]

    def mask(x, y, z):
        dx, dy, dz = x - cx, y - cy, z - cz
        total = 0.0
        for ux, uy, uz in rows:
            total = total + (ux * dx + uy * dy + uz * dz) ** 2
        return total <= 1.0

    half = np.sqrt(((axes * semi[:, None]) ** 2).sum(axis=0))
    lo, hi = c - half, c + half
    return mask, (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])


def _capsule(p0: Sequence[float], p1: Sequence[float], radius: float, extrude_z: bool = False) -> Shape:
    """All points within ``radius`` of the segment ``p0 -> p1``: vessels, airways, leads, clavicles.

    With ``extrude_z`` the distance is measured in the axial plane only, giving a prism along ``z``.
    """
    a = np.asarray(p0, dtype=np.float64)
    d = np.asarray(p1, dtype=np.float64) - a
    if extrude_z:
        d[2] = 0.0
    ax, ay, az = map(float, a)
    dx_, dy_, dz_ = map(float, d)
    inv_length2 = 1.0 / max(dx_ * dx_ + dy_ * dy_ + dz_ * dz_, 1e-9)
    r2 = float(radius) ** 2

    def mask(x, y, z):
        dx, dy = x - ax, y - ay
        dz = 0.0 if extrude_z else z - az
        t = np.clip((dx * dx_ + dy * dy_ + dz * dz_) * inv_length2, 0.0, 1.0)
        return (dx - t * dx_) ** 2 + (dy - t * dy_) ** 2 + (dz - t * dz_) ** 2 <= r2

    lo = np.minimum(a, a + d) - radius
    hi = np.maximum(a, a + d) + radius
    if extrude_z:
        lo[2], hi[2] = -_INF, _INF
    return mask, (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])


def _cylinder(cx: float, cy: float, ax: float, ay: float, z0: float = -_INF, z1: float = _INF) -> Shape:
    """Elliptic cylinder along ``z`` (a 2-D mask broadcast over the slab)."""

    cx, cy, ax, ay = float(cx), float(cy), float(ax), float(ay)

    def mask(x, y, z):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0

    return mask, (cx - ax, cx + ax, cy - ay, cy + ay, z0, z1)


def _masked(shape: Shape, condition: MaskFn) -> Shape:
    """The shape intersected with an extra condition (same bounding box)."""
    mask_fn, box = shape
    return (lambda x, y, z: mask_fn(x, y, z) & condition(x, y, z)), box


def _side_sign(side: str) -> float:
    return -1.0 if side == "right" else 1.0


# ----------------------------------------------------------------------------------------------------------
# Chest
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Chest:
    """Geometry of one chest phantom (all lengths in mm) and the placed findings."""

    body_ax: float
    body_ay: float
    body_y0: float
    fat: float
    muscle: float
    apex_z: float
    dome_right: float
    dome_left: float
    normal_ctr: float
    heart_tilt: float
    rib_step: float
    arch_z: float
    oblique_top: float
    horizontal_z: float
    effusion: dict[str, float] = field(default_factory=dict)  # side -> fluid top z
    pneumothorax: dict[str, float] = field(default_factory=dict)  # side -> collapse factor
    lesions: list[tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=list)  # centre, semi-axes
    consolidations: list[tuple[str, tuple[float, ...], tuple[float, ...]]] = field(default_factory=list)
    pacemaker: str | None = None
    vessels: list[tuple[tuple[float, ...], tuple[float, ...], float]] = field(default_factory=list)

    # Derived geometry. The cavity sits anterior to the body centre: the back wall holds spine and muscles.
    def __post_init__(self) -> None:
        self.cav_ax = self.body_ax - self.fat - self.muscle
        self.cav_ay = self.body_ay - self.fat - self.muscle - 12.0
        self.cav_y = self.body_y0 - 12.0
        self.medial = 18.0
        self.dome_x = 0.45 * self.cav_ax
        self.dome_y = self.cav_y - 0.15 * self.cav_ay
        self.spine_y = self.cav_y + self.cav_ay - 20.0
        self.lung_az = 240.0
        self.place_heart(self.normal_ctr)

    def place_heart(self, ctr: float) -> None:
        """Sizes the heart for a cardiothoracic ratio ``ctr`` and sets it on the diaphragm."""
        tilt = self.heart_tilt
        # Long axis in the coronal plane pointing down and to the patient's left (apex at the left base).
        self.heart_axes = np.array(
            [[math.cos(tilt), 0.0, math.sin(tilt)], [-math.sin(tilt), 0.0, math.cos(tilt)], [0.0, 1.0, 0.0]]
        )
        unit = np.array([1.0, 0.78, 0.72])
        unit_half_width = math.sqrt(((self.heart_axes[:, 0] * unit) ** 2).sum())
        # Cardiothoracic ratio = heart width / internal thoracic width on the PA radiograph.
        scale = ctr * self.cav_ax / unit_half_width
        self.heart_semi = unit * scale
        half = np.sqrt(((self.heart_axes * self.heart_semi[:, None]) ** 2).sum(axis=0))
        self.heart_half = half
        # A third of the heart lies right of the midline; it rests on the diaphragm.
        x, y = 0.35 * half[0], self.cav_y - 0.35 * self.cav_ay
        self.heart_c = np.array([x, y, float(self.dome(x, y)) + 8.0 - half[2]])

    # ---- analytic predicates, vectorised over broadcastable (x, y, z) arrays ----
    def dome(self, x, y):
        k = 0.0075
        right = self.dome_right + k * ((x + self.dome_x) ** 2 + (y - self.dome_y) ** 2)
        left = self.dome_left + k * ((x - self.dome_x) ** 2 + (y - self.dome_y) ** 2)
        return np.minimum(right, left)

    def cavity_half_width(self, z):
        """The rib cage widens from the apices to the diaphragm (a bell, not a cylinder)."""
        t = np.clip((self.dome_right - z) / (self.dome_right - self.apex_z), 0.0, 1.0)
        return self.cav_ax * (1.0 - 0.22 * t * t)

    def cavity(self, x, y, z):
        return (x / self.cavity_half_width(z)) ** 2 + ((y - self.cav_y) / self.cav_ay) ** 2 <= 1.0

    def lung(self, side: str, x, y, z):
        s = _side_sign(side)
        half_width = (self.cav_ax - self.medial) / 2.0
        cx = s * (self.medial + half_width)
        zc = self.apex_z + self.lung_az
        outer = ((x - cx) / (1.6 * half_width)) ** 2 + ((y - self.cav_y) / (1.35 * self.cav_ay)) ** 2 + (
            (z - zc) / self.lung_az
        ) ** 2 <= 1.0
        return outer & self.cavity(x, y, z) & (s * x >= self.medial) & (z <= self.dome(x, y))

    def oblique_fissure(self, side: str, y):
        """z of the oblique fissure: high posteriorly, reaching the diaphragm anteriorly."""
        dome = self.dome_right if side == "right" else self.dome_left
        post = self.cav_y + self.cav_ay
        return self.oblique_top + (post - y) * (dome - self.oblique_top) / (2.0 * self.cav_ay)

    def in_lobe(self, lobe: str, x, y, z):
        side = "right" if lobe[0] == "R" else "left"
        lower = z > self.oblique_fissure(side, y)
        if lobe.endswith("LL"):
            return lower
        if lobe == "RML":
            return ~lower & (z >= self.horizontal_z)
        if lobe == "RUL":
            return ~lower & (z < self.horizontal_z)
        return ~lower

    def fluid(self, side: str, x, y, z):
        """Pleural fluid: a layer along the chest wall below the fluid top, thickening caudally and posteriorly.

        The layer fills the costophrenic recesses first and climbs the lateral wall (the meniscus of an erect
        radiograph); on an axial slice it is a dependent crescent against the posterior wall.
        """
        u, v = x / self.cavity_half_width(z), (y - self.cav_y) / self.cav_ay
        to_wall = (1.0 - np.sqrt(u * u + v * v)) * math.sqrt(self.cav_ax * self.cav_ay)
        posterior = np.clip((v + 1.0) / 2.0, 0.0, 1.0)
        thickness = 0.8 * (z - self.effusion[side]) * (0.1 + 0.9 * posterior)
        return self.lung(side, x, y, z) & (to_wall <= thickness)

    def hilum(self, side: str) -> np.ndarray:
        return np.array([_side_sign(side) * (self.medial + 30.0), self.cav_y + 5.0, self.arch_z + 60.0])

    def collapsed(self, side: str, x, y, z):
        """The lung after a pneumothorax: the lung shape shrunk towards its hilum."""
        f = self.pneumothorax[side]
        h = [float(v) for v in self.hilum(side)]
        return self.lung(side, h[0] + (x - h[0]) / f, h[1] + (y - h[1]) / f, h[2] + (z - h[2]) / f)

    def in_heart(self, x, y, z, margin: float = 1.0):
        return _rotated_ellipsoid(self.heart_c, self.heart_semi * margin, self.heart_axes)[0](x, y, z)

    def usable_lung(self, side: str, x, y, z):
        """Aerated lung where a nodule, mass or consolidation can sit."""
        ok = self.lung(side, x, y, z) & ~self.in_heart(x, y, z, 1.05)
        if side in self.effusion:
            ok &= ~self.fluid(side, x, y, z)
        if side in self.pneumothorax:
            ok &= self.collapsed(side, x, y, z)
        return ok

    # ---- slice intervals: z levels at which a finding is cut by the axial slice ----
    def lobe_interval(self, lobe: str) -> tuple[float, float]:
        dome = self.dome_right if lobe[0] == "R" else self.dome_left
        upper_end = self.horizontal_z - 10.0 if lobe == "RUL" else dome - 35.0
        return {
            "RUL": (self.apex_z + 25.0, upper_end),
            "LUL": (self.apex_z + 25.0, upper_end),
            "RML": (self.horizontal_z + 10.0, dome - 20.0),
            "RLL": (self.oblique_top + 20.0, dome + 20.0),
            "LLL": (self.oblique_top + 20.0, dome + 20.0),
        }[lobe]

    def lead_points(self, side: str) -> list[np.ndarray]:
        s = _side_sign(side)
        gen_x = s * 0.55 * self.body_ax
        front = self.body_y0 - self.body_ay * math.sqrt(max(0.0, 1.0 - (gen_x / self.body_ax) ** 2))
        gen = np.array([gen_x, front + 10.0, self.apex_z + 30.0])
        entry = np.array([s * 0.3 * self.body_ax, front + 30.0, self.apex_z + 20.0])
        svc = np.array([-22.0, self.cav_y - 0.2 * self.cav_ay, self.apex_z + 45.0])
        atrium = np.array([-25.0, self.heart_c[1], self.heart_c[2] - 0.4 * self.heart_half[2]])
        apex = self.heart_c + np.array([0.35, -0.45, 0.5]) * self.heart_half
        return [gen, entry, svc, atrium, apex]


def _interval_for(chest: _Chest, finding: dict[str, Any]) -> tuple[float, float]:
    kind = finding["type"]
    if kind == "pleural_effusion":
        sides = ["left", "right"] if finding["side"] == "bilateral" else [finding["side"]]
        return _effusion_interval(chest, sides, finding["size"])
    if kind == "cardiomegaly":
        return chest.heart_c[2] - 0.5 * chest.heart_half[2], chest.heart_c[2] + 0.4 * chest.heart_half[2]
    if kind in ("nodule", "mass", "consolidation"):
        return chest.lobe_interval(finding["lobe"])
    if kind == "pneumothorax":
        dome = chest.dome_right if finding["side"] == "right" else chest.dome_left
        return chest.apex_z + 30.0, dome - 25.0
    if kind == "pacemaker":
        points = chest.lead_points(finding["side"])
        return points[1][2] + 8.0, points[-1][2] - 10.0
    raise ValueError(f"unknown chest finding {kind!r}")


def _effusion_interval(chest: _Chest, sides: list[str], size: str) -> tuple[float, float]:
    """Levels where every effusion side shows fluid (more for larger effusions) and aerated lung remains.

    Areas are counted on a 10 mm grid, in millimetres rather than voxels, so the level does not depend on
    the image size.
    """
    min_fluid = {"small": 6, "moderate": 20, "large": 45}[size]
    xy = np.arange(-chest.cav_ax, chest.cav_ax + 1.0, 10.0)
    x, y = xy[None, None, :], (chest.cav_y + np.arange(-chest.cav_ay, chest.cav_ay + 1.0, 10.0))[None, :, None]
    z = np.arange(chest.apex_z + 30.0, max(chest.dome_right, chest.dome_left) + 20.0, 5.0)[:, None, None]
    ok = np.ones(z.shape[0], dtype=bool)
    for side in sides:
        fluid = chest.fluid(side, x, y, z)
        aerated = chest.lung(side, x, y, z) & ~fluid & ~chest.in_heart(x, y, z)
        ok &= (fluid.sum(axis=(1, 2)) >= min_fluid) & (aerated.sum(axis=(1, 2)) >= 12)
    levels = z[ok, 0, 0]
    return (float(levels.min()), float(levels.max())) if levels.size else (0.0, -1.0)


def _sample_chest_findings(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Draws a non-empty finding set: 1-3 distinct kinds with their attributes."""
    names, weights = zip(*_PRIMARY_FINDINGS["chest"])
    count = int(rng.choice([1, 2, 3], p=_FINDING_COUNT_P["chest"]))
    kinds = rng.choice(names, size=count, replace=False, p=np.asarray(weights) / sum(weights))
    findings: list[dict[str, Any]] = []
    used_lobes: set[str] = set()
    for kind in sorted(map(str, kinds), key=names.index):
        if kind == "pleural_effusion":
            side = str(rng.choice(["left", "right", "bilateral"], p=[0.35, 0.4, 0.25]))
            findings.append({"type": kind, "side": side, "size": str(rng.choice(["small", "moderate", "large"]))})
        elif kind == "cardiomegaly":
            findings.append({"type": kind})
        elif kind in ("nodule", "mass", "consolidation"):
            lobe = str(rng.choice([lobe for lobe in LOBES if lobe not in used_lobes]))
            used_lobes.add(lobe)
            if kind == "consolidation":
                findings.append({"type": kind, "side": "right" if lobe[0] == "R" else "left", "lobe": lobe})
            else:
                limits = FINDING_VOCABULARY[kind]["size_mm"]
                size_mm = int(rng.integers(limits["min"], limits["max"] + 1))
                findings.append({"type": kind, "lobe": lobe, "size_mm": size_mm})
        elif kind == "pneumothorax":
            size = str(rng.choice(["small", "large"]))
            findings.append({"type": kind, "side": str(rng.choice(_SIDES)), "size": size})
        elif kind == "pacemaker":
            findings.append({"type": kind, "side": str(rng.choice(_SIDES, p=[0.8, 0.2]))})
    return findings


def _chest_conflict(findings: list[dict[str, Any]]) -> bool:
    """A pneumothorax and an effusion on the same side would be a hydropneumothorax: not in the vocabulary."""
    effusion = next((f["side"] for f in findings if f["type"] == "pleural_effusion"), None)
    ptx = next((f["side"] for f in findings if f["type"] == "pneumothorax"), None)
    return effusion is not None and ptx is not None and effusion in (ptx, "bilateral")


def _plan_chest(
    rng: np.random.Generator, geometry_rng: np.random.Generator, size: int
) -> tuple[_Chest, list[dict[str, Any]], int]:
    """Anatomy, findings, axial level and finding geometry of one chest patient.

    Findings are redrawn (never dropped) until they fit one axial level; a normal patient stays normal.

    Returns:
        The `_Chest`, the findings and the axial slice index on a ``size`` grid.
    """
    g = geometry_rng
    apex_z = float(g.uniform(-170.0, -155.0))
    dome_right = float(g.uniform(60.0, 90.0))
    chest = _Chest(
        body_ax=float(g.uniform(150.0, 172.0)),
        body_ay=float(g.uniform(100.0, 118.0)),
        body_y0=float(g.uniform(-5.0, 5.0)),
        fat=float(g.uniform(6.0, 20.0)),
        muscle=float(g.uniform(10.0, 15.0)),
        apex_z=apex_z,
        dome_right=dome_right,
        dome_left=dome_right + float(g.uniform(6.0, 18.0)),
        normal_ctr=float(g.uniform(0.40, 0.48)),
        heart_tilt=math.radians(float(g.uniform(30.0, 42.0))),
        rib_step=float(g.uniform(23.0, 26.0)),
        arch_z=apex_z + float(g.uniform(80.0, 95.0)),
        oblique_top=apex_z + float(g.uniform(95.0, 110.0)),
        horizontal_z=apex_z + float(g.uniform(140.0, 155.0)),
    )

    canvas = _Canvas(size, FIELD_OF_VIEW_MM["chest"], slice(0, size))
    # Normal or not is decided once, so redrawing an inconsistent finding set cannot bias the normal fraction.
    normal = rng.random() < NORMAL_FRACTION
    for _ in range(200):
        findings = [] if normal else _sample_chest_findings(rng)
        if _chest_conflict(findings):
            continue
        chest.effusion, chest.pneumothorax = {}, {}
        chest.lesions, chest.consolidations, chest.pacemaker = [], [], None
        chest.place_heart(chest.normal_ctr)
        for f in findings:
            if f["type"] == "pleural_effusion":
                drop = {"small": 25.0, "moderate": 75.0, "large": 140.0}[f["size"]]
                for side in ["left", "right"] if f["side"] == "bilateral" else [f["side"]]:
                    dome = chest.dome_right if side == "right" else chest.dome_left
                    chest.effusion[side] = dome - drop + float(rng.uniform(-6.0, 6.0))
            elif f["type"] == "cardiomegaly":
                chest.place_heart(float(rng.uniform(0.57, 0.66)))
            elif f["type"] == "pneumothorax":
                chest.pneumothorax[f["side"]] = 0.75 if f["size"] == "small" else 0.5
        diaphragm = min(dome_right, chest.dome_left)
        # Normal patients get a mid-chest level (aortic arch to diaphragm); findings narrow a wider range.
        lo, hi = (apex_z + 30.0, diaphragm + 10.0) if findings else (chest.arch_z - 10.0, diaphragm - 5.0)
        for f in findings:
            f_lo, f_hi = _interval_for(chest, f)
            lo, hi = max(lo, f_lo), min(hi, f_hi)
        if hi - lo < 6.0:
            continue
        # The axial level is drawn in mm, then every finding is placed so that the slice cuts it.
        z_mm = float(rng.uniform(lo, hi))
        slice_index = int(np.clip(np.searchsorted(canvas.z, z_mm), 0, size - 1))
        z_slice = float(canvas.z[slice_index])
        if all(_place_chest_finding(chest, f, z_slice, g) for f in findings):
            break
    else:  # pragma: no cover - the rules above make this practically unreachable
        raise RuntimeError("could not draw a consistent chest finding set")
    _place_vessels(chest, g)
    return chest, findings, slice_index


def _place_chest_finding(chest: _Chest, finding: dict[str, Any], z_slice: float, g: np.random.Generator) -> bool:
    """Puts a focal finding in aerated lung of its lobe, centred on the slice; False when there is no room."""
    kind = finding["type"]
    if kind == "pacemaker":
        chest.pacemaker = finding["side"]
        return True
    if kind not in ("nodule", "mass", "consolidation"):
        return True
    lobe = finding["lobe"]
    side = "right" if lobe[0] == "R" else "left"
    s = _side_sign(side)
    if kind == "consolidation":
        radius = float(g.uniform(28.0, 42.0))
        semi = tuple(radius * float(v) for v in g.uniform(0.8, 1.25, size=3))
    else:
        radius = finding["size_mm"] / 2.0
        wobble = g.uniform(0.85, 1.15, size=3) if kind == "mass" else np.ones(3)
        semi = tuple(radius * float(v) for v in wobble)
    # Candidates are tested in batches: the centre and four points 0.6 radius away must be usable lung of
    # the lobe; a second round with half the spread lets large masses fit thin lobes.
    offsets = np.array([[0.0, 0.0], [0.6, 0.0], [-0.6, 0.0], [0.0, 0.6], [0.0, -0.6]]) * min(radius, 25.0)
    for spread in (1.0, 0.5):
        n = 256
        x = s * g.uniform(chest.medial, chest.cav_ax, n)
        y = g.uniform(chest.cav_y - chest.cav_ay, chest.cav_y + chest.cav_ay, n)
        z = z_slice + g.uniform(-0.2, 0.2, n) * min(radius, 10.0)
        px, py = x[:, None] + spread * offsets[:, 0], y[:, None] + spread * offsets[:, 1]
        pz = np.broadcast_to(z[:, None], px.shape)
        ok = (chest.usable_lung(side, px, py, pz) & chest.in_lobe(lobe, px, py, pz)).all(axis=1)
        for centre, other in chest.lesions:
            distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
            ok &= distance >= radius + max(other) + 4.0
        if ok.any():
            i = int(np.argmax(ok))
            centre = (float(x[i]), float(y[i]), float(z[i]))
            if kind == "consolidation":
                chest.consolidations.append((lobe, centre, semi))
            else:
                chest.lesions.append((centre, semi))
            return True
    return False


def _place_vessels(chest: _Chest, g: np.random.Generator) -> None:
    """Pulmonary vessels fanning out from each hilum: the lung markings of a radiograph."""
    for side in ("right", "left"):
        s = _side_sign(side)
        hilum = chest.hilum(side)
        for angle in np.linspace(-75.0, 80.0, 7) + g.uniform(-8.0, 8.0, size=7):
            a = math.radians(float(angle))
            length = float(g.uniform(70.0, 120.0))
            direction = np.array([s * math.cos(a), float(g.uniform(-0.5, 0.5)), math.sin(a)])
            direction /= np.linalg.norm(direction)
            mid = hilum + 0.5 * length * direction
            bend = np.array([0.0, float(g.uniform(-8, 8)), float(g.uniform(-8, 8))])
            end = hilum + length * direction + bend
            chest.vessels.append((tuple(hilum), tuple(mid), 4.0))
            chest.vessels.append((tuple(mid), tuple(end), 2.5))


def _render_chest(chest: _Chest, cv: _Canvas) -> None:
    """Paints the chest phantom into the slab, outermost structures first."""
    T, c = _T, chest
    thin = 0.55 * cv.voxel_mm  # keeps thin tubes (vessels, lead) connected on coarse grids

    # Body wall: subcutaneous fat, muscle, then the thoracic cavity (mediastinal fat above the diaphragm,
    # upper abdominal organs below it, neck soft tissue above the lung apices).
    cv.paint(T.fat, _cylinder(0.0, c.body_y0, c.body_ax, c.body_ay))
    cv.paint(T.muscle, _cylinder(0.0, c.body_y0, c.body_ax - c.fat, c.body_ay - c.fat))
    cavity_box = (-c.cav_ax, c.cav_ax, c.cav_y - c.cav_ay, c.cav_y + c.cav_ay)
    cv.paint(T.fat, (c.cavity, (*cavity_box, c.apex_z - 5.0, _INF)))
    cv.paint(T.liver, (lambda x, y, z: c.cavity(x, y, z) & (z > c.dome(x, y)), (*cavity_box, -_INF, _INF)))
    stomach_gas = _ellipsoid((c.dome_x + 10.0, c.cav_y - 15.0, c.dome_left + 30.0), (32.0, 28.0, 18.0))
    cv.paint(T.air, stomach_gas, only=[T.liver])

    for side in ("right", "left"):
        cv.paint(T.lung, (lambda x, y, z, side=side: c.lung(side, x, y, z), _EVERYWHERE), only=[T.fat])

    # Heart (myocardium around blood-filled chambers), great vessels and hila.
    above_diaphragm = lambda x, y, z: z <= c.dome(x, y)  # noqa: E731
    heart = _masked(_rotated_ellipsoid(c.heart_c, c.heart_semi, c.heart_axes), above_diaphragm)
    cv.paint(T.myocardium, heart, only=[T.fat, T.lung])
    cv.paint(T.blood, _rotated_ellipsoid(c.heart_c, 0.72 * c.heart_semi, c.heart_axes), only=[T.myocardium])
    top = c.heart_c[2] - 0.6 * c.heart_half[2]
    front = c.cav_y - 0.25 * c.cav_ay
    arch = (28.0, c.cav_y + 0.05 * c.cav_ay, c.arch_z)
    descending = (22.0, c.spine_y - 28.0, c.arch_z + 40.0)
    vessels = [
        ((8.0, c.heart_c[1], top), (6.0, front, c.arch_z + 15.0), 14.0),  # ascending aorta
        ((6.0, front, c.arch_z + 15.0), arch, 13.0),  # arch: the aortic knob
        (arch, descending, 12.0),
        (descending, (20.0, c.spine_y - 26.0, c.dome_left + 40.0), 12.0),  # descending aorta
        ((-22.0, front, c.apex_z + 5.0), (-22.0, c.heart_c[1], top + 15.0), 10.0),  # superior vena cava
        ((10.0, c.heart_c[1] - 10.0, top + 10.0), (30.0, c.cav_y - 5.0, c.arch_z + 35.0), 12.0),  # pulmonary trunk
    ]
    for side in ("right", "left"):
        h = c.hilum(side)
        vessels.append(((_side_sign(side) * 12.0, c.cav_y, c.arch_z + 45.0), tuple(h), 11.0))
    for p0, p1, r in vessels:
        cv.paint(T.blood, _capsule(p0, p1, r), only=[T.fat, T.lung, T.muscle])

    # Airways.
    carina = (0.0, c.cav_y - 2.0, c.arch_z + 25.0)
    airways = [((0.0, c.cav_y - 8.0, -1000.0), carina, 9.0)]
    airways += [(carina, (-32.0, c.cav_y, c.arch_z + 48.0), 6.5), (carina, (34.0, c.cav_y, c.arch_z + 42.0), 6.0)]
    for p0, p1, r in airways:
        cv.paint(T.air, _capsule(p0, p1, r), only=[T.fat, T.lung, T.muscle])

    _render_chest_skeleton(c, cv)

    # Findings, then lung markings (vessels only where aerated lung remains: none beyond a pneumothorax's
    # pleural edge, none inside fluid or consolidation).
    for side in c.effusion:
        cv.paint(T.fluid, (lambda x, y, z, side=side: c.fluid(side, x, y, z), _EVERYWHERE), only=[T.lung])
    for side in c.pneumothorax:
        gone = lambda x, y, z, side=side: c.lung(side, x, y, z) & ~c.collapsed(side, x, y, z)  # noqa: E731
        cv.paint(T.air, (gone, _EVERYWHERE), only=[T.lung])
    for lobe, centre, semi in c.consolidations:
        in_lobe = lambda x, y, z, lobe=lobe: c.in_lobe(lobe, x, y, z)  # noqa: E731
        cv.paint(T.consolidation, _masked(_ellipsoid(centre, semi), in_lobe), only=[T.lung])
    for centre, semi in c.lesions:
        cv.paint(T.tumour, _ellipsoid(centre, semi), only=[T.lung, T.blood])
    for p0, p1, r in c.vessels:
        cv.paint(T.blood, _capsule(p0, p1, max(r, thin)), only=[T.lung])

    if c.pacemaker is not None:
        points = c.lead_points(c.pacemaker)
        cv.paint(T.metal, _ellipsoid(points[0], (22.0, max(5.0, thin), 18.0)))
        # Wider than a voxel's half-diagonal so that every axial slice the lead crosses contains it.
        for p0, p1 in zip(points[:-1], points[1:]):
            cv.paint(T.metal, _capsule(p0, p1, max(1.5, 1.4 * thin)))


def _render_chest_skeleton(c: _Chest, cv: _Canvas) -> None:
    T = _T
    # Spine: vertebral bodies (marrow) separated by discs, the canal, and the posterior arch.
    disc = lambda x, y, z: np.mod(z - c.apex_z, c.rib_step + 4.0) < 5.0  # noqa: E731
    cv.paint(T.cancellous, _cylinder(0.0, c.spine_y, 17.0, 15.0))
    cv.paint(T.muscle, _masked(_cylinder(0.0, c.spine_y, 17.0, 15.0), disc))
    canal_y = c.spine_y + 25.0
    arch = [
        ((0.0, canal_y + 10.0), (0.0, canal_y + 34.0), 4.0),  # spinous process
        ((-11.0, c.spine_y + 10.0), (0.0, canal_y + 10.0), 4.5),  # pedicles and laminae
        ((11.0, c.spine_y + 10.0), (0.0, canal_y + 10.0), 4.5),
        ((-10.0, canal_y - 2.0), (-30.0, canal_y + 10.0), 4.5),  # transverse processes
        ((10.0, canal_y - 2.0), (30.0, canal_y + 10.0), 4.5),
    ]
    # Thin cortex around marrow: at these voxel sizes the arch averages to cancellous density.
    for (x0, y0), (x1, y1), r in arch:
        cv.paint(T.cancellous, _capsule((x0, y0, 0.0), (x1, y1, 0.0), r, extrude_z=True))
    cv.paint(T.csf, _cylinder(0.0, canal_y, 8.0, 7.0))

    # Sternum.
    sternum_y = c.cav_y - c.cav_ay - 7.0
    sternum = _cylinder(0.0, sternum_y, 14.0, 6.0, c.apex_z + 5.0, c.heart_c[2] + 40.0)
    cv.paint(T.cancellous, sternum, only=[T.fat, T.muscle])

    # Ribs: a thin shell just outside the cavity; rib k's centre line descends from back to front, so on the
    # radiograph posterior and anterior ribs cross, and on an axial slice ribs appear as arcs in the wall.
    rho_in, rho_out = 1.02, 1.02 + 7.0 / (0.5 * (c.cav_ax + c.cav_ay))
    narrowest = float(c.cavity_half_width(c.apex_z))

    def shell_columns(x, y):
        v2 = ((y - c.cav_y) / c.cav_ay) ** 2
        return ((x / narrowest) ** 2 + v2 >= rho_in**2) & ((x / c.cav_ax) ** 2 + v2 <= rho_out**2)

    def ribs(x, y, z):
        v = (y - c.cav_y) / c.cav_ay
        u = x / c.cavity_half_width(z)
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(np.abs(x) / c.cav_ax, v) / math.pi  # 0 at the spine, 1 at the sternum
        phase = (z - c.apex_z - 12.0 - 100.0 * theta**1.6) / c.rib_step
        k = np.round(phase)
        # Posterior ribs are thick; anterior ribs thin out and end at the costal cartilages.
        thickness = 10.0 - 6.0 * theta
        return (
            (rho >= rho_in)
            & (rho <= rho_out)
            & (theta > 0.08)
            & (theta < 0.7)
            & (k >= 0)
            & (k <= 9)
            & (np.abs(phase - k) * c.rib_step <= thickness / 2.0)
        )

    cv.paint_columns(T.cortical, shell_columns, ribs, only=[T.fat, T.muscle, T.lung])
    for s in (-1.0, 1.0):
        medial_end = (s * 18.0, sternum_y - 4.0, c.apex_z - 2.0)
        lateral_end = (s * (c.body_ax - 20.0), c.body_y0 - 10.0, c.apex_z - 30.0)
        cv.paint(T.cortical, _capsule(medial_end, lateral_end, 8.0), only=[T.fat, T.muscle, T.lung])


# ----------------------------------------------------------------------------------------------------------
# Head
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Head:
    """Geometry of one head phantom (mm): nested scalp, skull, CSF, grey and white matter; placed findings."""

    semi: tuple[float, float, float]
    y0: float
    scalp: float
    skull: float
    subarachnoid: float
    cortex: float
    ventricle_scale: float
    gyri: np.ndarray  # (K, 4): angular frequency, elevation frequency, phase, weight
    sulci: np.ndarray  # low-frequency harmonics that bend the sulci
    sulcus_count: int
    tumour: tuple[tuple[float, ...], float, float, float] | None = None  # centre, radius, core, oedema radius
    haematoma: tuple[tuple[float, ...], float] | None = None
    shifts: list[tuple[float, float, float]] = field(default_factory=list)  # (signed shift, y, z)

    def shell(self, inset: float) -> tuple[float, float, float]:
        """Semi-axes of the ellipsoid ``inset`` mm inside the scalp surface."""
        return tuple(a - inset for a in self.semi)

    def rho(self, inset: float, x, y, z):
        """Normalised radius in the ellipsoid ``inset`` mm deep (1 on its surface)."""
        ax, ay, az = self.shell(inset)
        return np.sqrt((x / ax) ** 2 + ((y - self.y0) / ay) ** 2 + (z / az) ** 2)

    def shift(self, y, z):
        """x displacement of midline structures by mass effect (towards the side opposite the lesion)."""
        total = 0.0
        for amount, sy, sz in self.shifts:
            total = total + amount * np.exp(-((y - sy) ** 2 + (z - sz) ** 2) / (2.0 * 55.0**2))
        return total

    @property
    def brain_inset(self) -> float:
        return self.scalp + self.skull + self.subarachnoid

    def in_brain(self, x, y, z, depth: float = 0.0):
        return self.rho(self.brain_inset + depth, x, y, z) <= 1.0


def _harmonics(g: np.random.Generator, count: int, low: int, high: int) -> np.ndarray:
    """``(count, 4)`` random harmonics: azimuthal frequency in [low, high], elevation frequency, phase, weight."""
    return np.stack(
        [
            g.integers(low, high + 1, size=count).astype(np.float64),
            g.integers(2, 7, size=count).astype(np.float64),
            g.uniform(0.0, 2.0 * math.pi, size=count),
            g.uniform(0.5, 1.0, size=count),
        ],
        axis=1,
    )


def _angular_field(table: np.ndarray, x, y, z) -> np.ndarray:
    """Sum of angular harmonics in [-1, 1]: a smooth random pattern over the brain surface."""
    azimuth = np.arctan2(y, x)
    elevation = np.arctan2(z, np.sqrt(x * x + y * y) + 1e-3)
    total = 0.0
    for n, m, phase, weight in table:
        total = total + weight * np.cos(n * azimuth + m * elevation + phase)
    return total / table[:, 3].sum()


# Axial levels (mm from the head centre) through the lateral ventricles, and the sub-range where each
# territory is cut by the slice.
_HEAD_SLICE_RANGE = (-12.0, 22.0)
_HEAD_LOBE_RANGE = {
    "frontal": (-12.0, 22.0),
    "occipital": (-12.0, 22.0),
    "parietal": (-12.0, 6.0),
    "temporal": (8.0, 22.0),
    "basal_ganglia": (4.0, 20.0),
}


def _sample_head_findings(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Draws a non-empty finding set: a tumour, a haemorrhage or both."""
    names, weights = zip(*_PRIMARY_FINDINGS["head"])
    count = int(rng.choice([1, 2], p=_FINDING_COUNT_P["head"]))
    kinds = rng.choice(names, size=count, replace=False, p=np.asarray(weights) / sum(weights))
    findings = []
    for kind in sorted(map(str, kinds), key=names.index):
        limits = FINDING_VOCABULARY[kind]["size_mm"]
        entry = {"type": kind, "side": str(rng.choice(_SIDES))}
        if kind == "tumour":
            entry["lobe"] = str(rng.choice(BRAIN_LOBES))
        else:
            entry["location"] = str(rng.choice(HAEMORRHAGE_LOCATIONS, p=[0.175, 0.175, 0.175, 0.175, 0.3]))
        entry["size_mm"] = int(rng.integers(limits["min"], limits["max"] + 1))
        findings.append(entry)
    return findings


def _plan_head(
    rng: np.random.Generator, geometry_rng: np.random.Generator, size: int
) -> tuple[_Head, list[dict[str, Any]], int]:
    """Anatomy, findings, axial level and lesion geometry of one head patient (see `_plan_chest`)."""
    g = geometry_rng
    head = _Head(
        semi=(float(g.uniform(68.0, 78.0)), float(g.uniform(88.0, 100.0)), 100.0),
        y0=float(g.uniform(-3.0, 3.0)),
        scalp=float(g.uniform(4.0, 7.0)),
        skull=float(g.uniform(5.0, 8.0)),
        subarachnoid=float(g.uniform(2.0, 4.0)),
        cortex=float(g.uniform(9.0, 13.0)),
        ventricle_scale=float(g.uniform(0.8, 1.3)),
        gyri=_harmonics(g, 6, 10, 18),
        sulci=_harmonics(g, 4, 2, 5),
        sulcus_count=int(g.integers(20, 29)),
    )
    canvas = _Canvas(size, FIELD_OF_VIEW_MM["head"], slice(0, size))
    normal = rng.random() < NORMAL_FRACTION
    for _ in range(200):
        findings = [] if normal else _sample_head_findings(rng)
        lo, hi = _HEAD_SLICE_RANGE
        for f in findings:
            f_lo, f_hi = _HEAD_LOBE_RANGE[f.get("lobe", f.get("location"))]
            lo, hi = max(lo, f_lo), min(hi, f_hi)
        if hi - lo < 4.0:  # e.g. a parietal tumour with a temporal haemorrhage: no common level
            continue
        z_mm = float(rng.uniform(lo, hi))
        slice_index = int(np.clip(np.searchsorted(canvas.z, z_mm), 0, size - 1))
        if _place_head_findings(head, findings, float(canvas.z[slice_index]), g):
            break
    else:  # pragma: no cover - the rules above make this practically unreachable
        raise RuntimeError("could not draw a consistent head finding set")
    return head, findings, slice_index


def _place_head_findings(
    head: _Head, findings: list[dict[str, Any]], z_slice: float, g: np.random.Generator
) -> bool:
    """Places tumour/haemorrhage on the slice and appends the midline shift their mass effect causes."""
    head.tumour, head.haematoma, head.shifts = None, None, []
    shift_mm = 0.0
    for f in findings:
        s = _side_sign(f["side"])
        radius = f["size_mm"] / 2.0
        centre = _place_head_lesion(head, f.get("lobe", f.get("location")), s, radius, z_slice, g)
        if centre is None:
            return False
        if f["type"] == "tumour":
            oedema = radius * float(g.uniform(1.6, 2.1))
            head.tumour = (centre, radius, radius * float(g.uniform(0.45, 0.65)), oedema)
            reach = oedema
        else:
            head.haematoma = (centre, radius)
            reach = 1.2 * radius
        # Mass effect grows with the lesion's reach; small lesions leave the midline in place.
        amount = float(np.clip(0.38 * (reach - 12.0), 0.0, 14.0))
        if amount >= 3.0:
            head.shifts.append((-s * amount, centre[1], centre[2]))
            shift_mm += -s * amount
    if abs(shift_mm) >= 3.0:
        direction = "left" if shift_mm > 0 else "right"
        findings.append({"type": "midline_shift", "direction": direction, "size_mm": int(round(abs(shift_mm)))})
    return True


# Lobe territories at the ventricular level, as fractions of the brain's half-width (x) and half-length (y).
_BRAIN_TERRITORY = {
    "frontal": ((0.15, 0.85), (-0.95, -0.35)),
    "parietal": ((0.25, 0.9), (-0.25, 0.45)),
    "temporal": ((0.55, 0.95), (-0.3, 0.4)),
    "occipital": ((0.1, 0.8), (0.5, 0.95)),
    "basal_ganglia": ((0.25, 0.4), (-0.12, 0.08)),
}


def _place_head_lesion(
    head: _Head, where: str, s: float, radius: float, z_slice: float, g: np.random.Generator
) -> tuple[float, float, float] | None:
    """A centre in the territory ``where`` on side ``s``, inside the brain, clear of an earlier lesion."""
    bx, by, _ = head.shell(head.brain_inset)
    (x_lo, x_hi), (y_lo, y_hi) = _BRAIN_TERRITORY[where]
    earlier = head.tumour or head.haematoma
    for attempt in range(400):
        x = s * bx * float(g.uniform(x_lo, x_hi))
        y = head.y0 + by * float(g.uniform(y_lo, y_hi))
        z = z_slice + float(g.uniform(-0.2, 0.2)) * min(radius, 8.0)
        # Intra-axial: the centre lies inside the brain; large lesions may reach the cortex.
        depth = min(0.55 * radius, 10.0) if attempt < 200 else 0.25 * radius
        if not head.in_brain(x, y, z, depth=depth):
            continue
        if earlier is not None and math.dist((x, y, z), earlier[0]) < radius + 1.6 * earlier[1] + 4.0:
            continue
        return (x, y, z)
    return None


# Deep grey nuclei of one hemisphere (|x|, y, z centre and semi-axes, mm): caudate head, thalamus, lentiform.
_DEEP_GREY = (
    ((16.0, -18.0, 6.0), (6.0, 10.0, 12.0)),
    ((11.0, 12.0, 16.0), (10.0, 14.0, 10.0)),
    ((25.0, -2.0, 14.0), (7.0, 16.0, 11.0)),
)


def _render_head(h: _Head, cv: _Canvas) -> None:
    """Paints the head phantom into the slab: scalp, skull, CSF, cortex, white matter, nuclei, ventricles."""
    T = _T
    cv.paint(T.fat, _ellipsoid((0.0, h.y0, 0.0), h.semi))
    cv.paint(T.cortical, _ellipsoid((0.0, h.y0, 0.0), h.shell(h.scalp)))
    cv.paint(T.csf, _ellipsoid((0.0, h.y0, 0.0), h.shell(h.scalp + h.skull)))

    # Cortex with sulci (thin CSF clefts from the surface), white matter with gyral fingers.
    inset = h.brain_inset

    def grey(x, y, z):
        rho = h.rho(inset, x, y, z)
        # Radial clefts, regularly spaced around the brain and bent by a smooth random field.
        azimuth = np.arctan2(y - h.y0, x)
        wiggle = _angular_field(h.sulci, x, y - h.y0, z)
        sulcus = (rho > 0.84 + 0.06 * wiggle) & (np.cos(h.sulcus_count * azimuth + 2.5 * wiggle) > 0.8)
        return (rho <= 1.0) & ~sulcus

    def white(x, y, z):
        rho = h.rho(inset + h.cortex, x, y, z)
        return rho <= 1.0 + 0.12 * _angular_field(h.gyri, x, y - h.y0, z)

    bx, by, bz = h.shell(inset)
    brain_box = (-bx, bx, h.y0 - by, h.y0 + by, -bz, bz)
    cv.paint(T.gm, (grey, brain_box), only=[T.csf])
    cv.paint(T.wm, (white, brain_box), only=[T.gm])

    # Midline structures move with mass effect: evaluate them at x minus the local shift.
    def shifted(shape: Shape) -> Shape:
        fn, (x0, x1, y0, y1, z0, z1) = shape
        return (lambda x, y, z: fn(x - h.shift(y, z), y, z)), (x0 - 15.0, x1 + 15.0, y0, y1, z0, z1)

    def rot_z(angle_deg: float) -> np.ndarray:
        a = math.radians(angle_deg)
        return np.array([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])

    # Interhemispheric fissure, in front of and behind the corpus callosum.
    half_gap = max(1.5, 0.45 * cv.voxel_mm)
    fissure = lambda x, y, z: (np.abs(x) <= half_gap) & (np.abs(y - h.y0 - 5.0) > 45.0)  # noqa: E731
    cv.paint(T.csf, shifted((fissure, brain_box)), only=[T.gm, T.wm])
    for s in (-1.0, 1.0):
        for (cx, cy, cz), semi in _DEEP_GREY:
            cv.paint(T.gm, shifted(_ellipsoid((s * cx, h.y0 + cy, cz), semi)), only=[T.wm])

    # Lateral ventricles: frontal horn and body, then the atrium, diverging like a butterfly. A lesion on
    # side s pushes the midline towards -s and squeezes its own ventricle.
    width = {1.0: 1.0, -1.0: 1.0}
    for amount, _, _ in h.shifts:
        width[-math.copysign(1.0, amount)] *= max(0.45, 1.0 - abs(amount) / 16.0)
    v = h.ventricle_scale
    for s in (-1.0, 1.0):
        w = width[s]
        body = ((s * 9.0 * v, h.y0 - 10.0, 2.0), (5.5 * v * w, 30.0 * v, 20.0 * v), s * 12.0)
        atrium = ((s * 15.0 * v, h.y0 + 22.0, 8.0), (7.0 * v * w, 16.0 * v, 16.0 * v), -s * 25.0)
        for centre, semi, angle in (body, atrium):
            cv.paint(T.csf, shifted(_rotated_ellipsoid(centre, semi, rot_z(angle))), only=[T.gm, T.wm])

    brain = [T.gm, T.wm, T.csf, T.oedema]
    if h.tumour is not None:
        centre, radius, core, oedema = h.tumour
        table = h.gyri[::-1]

        def oedema_mask(x, y, z):
            d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
            return d <= oedema * (1.0 + 0.25 * _angular_field(table, x - centre[0], y - centre[1], z - centre[2]))

        r = 1.3 * oedema
        box = (centre[0] - r, centre[0] + r, centre[1] - r, centre[1] + r, centre[2] - r, centre[2] + r)
        # Vasogenic oedema spreads along white matter and spares the cortex.
        cv.paint(T.oedema, (oedema_mask, box), only=[T.wm])
        semi = (radius * 1.05, radius * 0.95, radius)
        inside = lambda x, y, z: h.in_brain(x, y, z)  # noqa: E731
        cv.paint(T.enhancing, _masked(_ellipsoid(centre, semi), inside), only=brain + [T.gm])
        cv.paint(T.necrosis, _ellipsoid(centre, tuple(a * core / radius for a in semi)), only=[T.enhancing])
    if h.haematoma is not None:
        centre, radius = h.haematoma
        cv.paint(T.oedema, _ellipsoid(centre, (radius * 1.3,) * 3), only=[T.wm, T.gm])
        cv.paint(T.haematoma, _ellipsoid(centre, (radius, radius * 0.9, radius * 0.95)), only=brain)


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


def _phrase_fields(finding: dict[str, Any]) -> dict[str, Any]:
    """Template fields for one finding; grammar follows from a bilateral side (plural)."""
    fields = {key: value for key, value in finding.items() if key != "type"}
    plural = finding.get("side") == "bilateral"
    fields.update(s="s" if plural else "", a="" if plural else "a ", **{"is": "are" if plural else "is"})
    if "lobe" in finding and finding["lobe"] in LOBE_NAMES:
        fields["lobe"] = LOBE_NAMES[finding["lobe"]]
    if "location" in finding:
        location = finding["location"]
        fields["location"] = "basal ganglia" if location == "basal_ganglia" else f"{location} lobe"
    if "direction" in finding:
        fields["ipsilateral"] = "right" if finding["direction"] == "left" else "left"
    return fields


def _sentence(template: str, fields: dict[str, Any]) -> str:
    text = template.format(**fields)
    return text[0].upper() + text[1:]


def _write_report(anatomy: str, findings: list[dict[str, Any]], rng: np.random.Generator) -> str:
    """``FINDINGS: ... IMPRESSION: ...`` with positives, explicit negatives and normal statements, shuffled."""
    present = {f["type"] for f in findings}
    sentences = [_sentence(str(rng.choice(FINDING_PHRASES[f["type"]])), _phrase_fields(f)) for f in findings]
    kinds = [k for k in FINDING_VOCABULARY if FINDING_VOCABULARY[k]["anatomy"] == anatomy]
    sentences += [_sentence(str(rng.choice(NEGATIVE_PHRASES[k])), {}) for k in kinds if k not in present]
    if anatomy == "chest":
        sentences.append(_sentence(str(rng.choice(NORMAL_PHRASES["chest_bones"])), {}))
    else:
        if "midline_shift" not in present:
            sentences.append(_sentence(str(rng.choice(NORMAL_PHRASES["head_ventricles"])), {}))
        if not present:
            sentences.append(_sentence(str(rng.choice(NORMAL_PHRASES["head_grey_white"])), {}))
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]

    if findings:
        items = [_sentence(str(rng.choice(IMPRESSION_PHRASES[f["type"]])), _phrase_fields(f)) for f in findings]
        impression = items[0] if len(items) == 1 else " ".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    else:
        impression = _sentence(str(rng.choice(NORMAL_PHRASES[f"{anatomy}_impression"])), {})
    return f"FINDINGS: {' '.join(sentences)} IMPRESSION: {impression}"


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


@dataclass
class VirtualPatient:
    """One synthetic patient: co-registered images, structured findings and a report.

    Attributes:
        patient_id (`str`): ``"phantom-s{seed}-{index:06d}"``.
        anatomy (`str`): ``"chest"`` or ``"head"``.
        images (`dict[str, np.ndarray | None]`): keys exactly ``MODALITY_KEYS``; each a float32 array of shape
            `(size, size)` or None (``xray`` for head patients). ``ct`` in HU, ``xray`` in ``[0, 1]``, MRI >= 0 in
            arbitrary units.
        findings (`list[dict]`): JSON-serialisable structured findings; ``[]`` for a normal patient.
        report (`str`): ``"FINDINGS: ... IMPRESSION: ..."``.
        slice_index (`int`): the axial level of ``ct`` and MRI in the label volume (``PhantomGenerator.volume``).
    """

    patient_id: str
    anatomy: str
    images: dict[str, np.ndarray | None]
    findings: list[dict[str, Any]]
    report: str
    slice_index: int

    @property
    def is_normal(self) -> bool:
        return not self.findings

    def to_json(self) -> str:
        """The structured findings as a JSON string with sorted keys, stored beside the report."""
        return json.dumps(self.findings, sort_keys=True)


_STREAM_ANATOMY, _STREAM_FINDINGS, _STREAM_GEOMETRY, _STREAM_NOISE, _STREAM_REPORT = range(5)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class PhantomGenerator:
    r"""Deterministic generator of virtual patients.

    Args:
        seed (`int`, defaults to 0): non-negative dataset seed; patient ``i`` depends only on ``(seed, i)``.
        size (`int`, defaults to 64): image side in pixels, a multiple of 8 in ``[32, 512]``. The phantom
            volume is ``(size, size, size)`` voxels over a fixed field of view (chest 400 mm, head 240 mm).

    Example:

    ```py
    >>> gen = PhantomGenerator(seed=0, size=64)
    >>> p = gen.patient(index=3, anatomy="head")
    >>> p.images["mri_flair"].shape, p.images["xray"] is None
    ((64, 64), True)

    ```
    """

    def __init__(self, seed: int = 0, size: int = 64) -> None:
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
        if not _is_int(size) or not (MIN_SIZE <= size <= MAX_SIZE) or size % SIZE_MULTIPLE:
            raise ValueError(
                f"size must be an integer multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}; got {size!r}"
            )
        self.seed = int(seed)
        self.size = int(size)

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, stream])

    def _check(self, index: int, anatomy: str | None) -> None:
        if not _is_int(index) or index < 0:
            raise ValueError(f"index must be a non-negative integer; got {index!r}")
        if anatomy is not None and anatomy not in ANATOMIES:
            raise ValueError(f"anatomy must be one of {list(ANATOMIES)} or None; got {anatomy!r}")

    def anatomy(self, index: int) -> str:
        """The anatomy patient ``index`` has when the caller does not force one (50/50 chest/head)."""
        self._check(index, None)
        return "chest" if self._rng(index, _STREAM_ANATOMY).random() < 0.5 else "head"

    def _plan(self, index: int, anatomy: str | None) -> tuple[str, _Chest | _Head, list[dict[str, Any]], int]:
        anatomy = anatomy or self.anatomy(index)
        plan = _plan_chest if anatomy == "chest" else _plan_head
        phantom, findings, slice_index = plan(
            self._rng(index, _STREAM_FINDINGS), self._rng(index, _STREAM_GEOMETRY), self.size
        )
        return anatomy, phantom, findings, slice_index

    def _rasterise(self, anatomy: str, phantom: _Chest | _Head, rows: slice) -> np.ndarray:
        canvas = _Canvas(self.size, FIELD_OF_VIEW_MM[anatomy], rows)
        (_render_chest if anatomy == "chest" else _render_head)(phantom, canvas)
        return canvas.labels

    def volume(self, index: int, anatomy: str | None = None) -> np.ndarray:
        """The tissue-label volume of patient ``index``.

        Returns:
            `np.ndarray` of dtype uint8 and shape `(size, size, size)` indexed ``(z, y, x)``; labels index
            ``TISSUES`` (names in ``TISSUE_LABELS``).
        """
        self._check(index, anatomy)
        anatomy, phantom, _, _ = self._plan(index, anatomy)
        return self._rasterise(anatomy, phantom, slice(0, self.size))

    def patient(self, index: int, anatomy: str | None = None, noiseless: bool = False) -> VirtualPatient:
        """Generates patient ``index``.

        Args:
            index (`int`): non-negative patient index.
            anatomy (`str`, *optional*): ``"chest"`` or ``"head"`` to force the anatomy; by default it is drawn
                from the patient's own random stream. Forcing the anatomy the patient has anyway changes nothing.
            noiseless (`bool`, defaults to `False`): render the same patient without acquisition noise (the
                MRI bias field stays). Comparing both gives the phantoms' own noise floor, the best PSNR any
                reconstruction of the noisy images can reach.

        Returns:
            [`VirtualPatient`] with images of shape `(size, size)`.
        """
        self._check(index, anatomy)
        anatomy, phantom, findings, slice_index = self._plan(index, anatomy)
        noise = self._rng(index, _STREAM_NOISE)
        # Noise is drawn either way and scaled by 0 when noiseless, so the bias field and everything else match.
        noise_scale = 0.0 if noiseless else 1.0
        if anatomy == "chest":
            labels, line_integral = self._project(phantom, slice_index)
            xray = self._radiograph(line_integral, noise, noise_scale)
        else:
            labels = self._rasterise(anatomy, phantom, slice(slice_index, slice_index + 1))[0]
            xray = None
        images: dict[str, np.ndarray | None] = {"xray": xray, "ct": self._ct(labels, anatomy, noise, noise_scale)}
        images.update(self._mri(labels, anatomy, noise, noise_scale))
        report = _write_report(anatomy, findings, self._rng(index, _STREAM_REPORT))
        return VirtualPatient(
            patient_id=f"phantom-s{self.seed}-{index:06d}",
            anatomy=anatomy,
            images=images,
            findings=findings,
            report=report,
            slice_index=slice_index,
        )

    # ---- image formation ----
    def _project(self, phantom: _Chest, slice_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Rasterises the chest in slabs of rows (bounded memory at 512 px) and integrates mu along y.

        Returns:
            The axial label slice `(size, size)` and the line integral of mu, `(size, size)` as ``(z, x)``.
        """
        size = self.size
        rows_per_slab = max(1, (1 << 21) // (size * size))
        line_integral = np.empty((size, size), dtype=np.float32)
        axial = None
        voxel_mm = FIELD_OF_VIEW_MM["chest"] / size
        for start in range(0, size, rows_per_slab):
            rows = slice(start, min(size, start + rows_per_slab))
            labels = self._rasterise("chest", phantom, rows)
            line_integral[rows] = _MU_PER_MM[labels].sum(axis=1) * voxel_mm
            if rows.start <= slice_index < rows.stop:
                axial = labels[slice_index - rows.start].copy()
        return axial, line_integral

    def _radiograph(self, line_integral: np.ndarray, noise: np.random.Generator, noise_scale: float) -> np.ndarray:
        """-log(I / I0) = integral(mu) through the characteristic curve, detector blur and noise; in [0, 1]."""
        floor = 1.0 / (1.0 + math.exp(_XRAY_MIDPOINT / _XRAY_WIDTH))
        curve = 1.0 / (1.0 + np.exp(-(line_integral - _XRAY_MIDPOINT) / _XRAY_WIDTH))
        image = ndimage.gaussian_filter((curve - floor) / (1.0 - floor), 0.5)
        image = image + noise_scale * noise.normal(0.0, _XRAY_NOISE, image.shape)
        return np.clip(image, 0.0, 1.0).astype(np.float32)

    def _ct(self, labels: np.ndarray, anatomy: str, noise: np.random.Generator, noise_scale: float) -> np.ndarray:
        """Axial slice in HU: tissue HU, a half-pixel PSF and Gaussian noise, clipped to the 12-bit range."""
        hu = ndimage.gaussian_filter(_HU[labels], 0.5)
        hu = hu + noise_scale * noise.normal(0.0, _CT_NOISE_HU[anatomy], hu.shape)
        return np.clip(hu, -1024.0, 3071.0).astype(np.float32)

    def _mri(self, labels: np.ndarray, anatomy: str, noise: np.random.Generator, noise_scale: float) -> dict[str, np.ndarray]:
        """The four contrasts: signal lookup, half-pixel PSF, one coil bias field, Rician noise."""
        n = labels.shape[0]
        v, u = np.meshgrid(np.linspace(-1.0, 1.0, n), np.linspace(-1.0, 1.0, n), indexing="ij")
        c = noise.normal(0.0, _BIAS_STRENGTH, 4)
        bias = np.exp(c[0] * u + c[1] * v + c[2] * u * v + c[3] * (u * u - v * v) / 2.0)
        images = {}
        for key, table in _MRI_LUT[anatomy].items():
            signal = ndimage.gaussian_filter(table[labels], 0.5) * bias
            real = signal + noise_scale * noise.normal(0.0, _MRI_NOISE, signal.shape)
            imag = noise_scale * noise.normal(0.0, _MRI_NOISE, signal.shape)
            images[key] = np.sqrt(real * real + imag * imag).astype(np.float32)
        return images
