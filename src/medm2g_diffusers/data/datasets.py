"""Hugging Face datasets in the canonical MedM2G layout, from phantoms or from a user's folder.

Every dataset this package writes or reads has the same columns, one row per sample (a patient at one
time point, for which any subset of modalities may exist):

| column | type | meaning |
| --- | --- | --- |
| ``patient_id`` | string | splits are made by this column, never by row |
| ``anatomy`` | string or None | ``chest`` / ``head`` for phantoms; what the user says, else None |
| ``report`` | string or None | radiology report (or clinical note) |
| ``findings`` | string or None | JSON list of structured findings (phantoms only: real data has no ground truth) |
| ``xray`` ``ct`` ``mri_t1`` ``mri_t2`` ``mri_pd`` ``mri_flair`` ``mri_t1c`` | ``Array2D((size, size), float32)`` or None | images in native units (CT in HU, X-ray in ``[0, 1]``, MRI signal) |

Images are stored in native units rather than ``[-1, 1]`` so that the intensity convention stays in one
place (:mod:`medm2g_diffusers.modalities`) and a dataset can be checked by eye in HU. The conversion to the
model range happens lazily in the training transforms.

Real data (``medm2g prepare``, :func:`prepare_dataset`)
-------------------------------------------------------

``scripts/real_data/prepare_all.sh`` prepares the shared real sets (``../shared/data``) this way, each at the
bundled model's 64 px, with ``prepare_info.json`` (arguments, intensity conventions, split patients) beside
the dataset::

    # Harvard CT-MRI: CT/ and MRI/ folders pair by file name; the patient is the series (digits before the
    # last three); series 2's MRI is FLAIR, not T2, so it is left out; 16 and 32 are held out by name.
    medm2g prepare --images harvard-ct-mri --modality-map MRI=mri_t2 --patient-regex '^(\\d+)\\d{3}$' \\
        --exclude-patients 2 --validation-patients 16 --test-patients 32 --split-fractions 1,0,0 --size 64 --out ...
    # BraTS / TCGA: one folder per subject, files named by contrast; every 2nd axial slice that is at least
    # 10 % brain in all four contrasts; one subject trains, the other validates.
    medm2g prepare --images brain-mri-multicontrast --layout subjects --nifti-slices 0:155:2 --min-foreground 0.1 \\
        --validation-patients TCGA-DU-7294 --split-fractions 1,0,0 --size 64 --out ...
    # COVID chest X-rays: the CSV's case notes, boilerplate removed; the CT rows dropped; a hash split by patient.
    medm2g prepare --images covid-chestxray --reports covid-chestxray/metadata.csv \\
        --csv-columns report=clinical_notes,patient_id=patientid --modalities xray --clean-notes --size 64 --out ...
    # SynthRAD CT slices: captions made from the file names (scripts/real_data/synthrad_captions.py writes the
    # CSV); the 8-bit values fit a [-1000, 2000] HU window (fat and muscle peaks); per held-out split one brain
    # and one pelvis patient, the first two of each region in the seed-0 hash order.
    medm2g prepare --images synthrad-ct-slices --reports captions.csv --png-ct-window=-1000,2000 \\
        --validation-patients 1BB007 1PA009 --test-patients 1BB002 1PA030 --split-fractions 1,0,0 --size 64 --out ...
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Array2D, Dataset, DatasetDict, Features, Value, load_from_disk
from PIL import Image

from ..modalities import get_modality, image_modality_keys
from ..training_utils import atomic_save_folder
from .io import SUPPORTED_SUFFIXES, MedicalImage, read_image, read_volume
from .phantoms import PhantomGenerator

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
TEXT_COLUMNS = ("patient_id", "anatomy", "report", "findings")

# Names users give modalities in folder names and CSVs, mapped to registry keys. Deliberately no bare
# "mri": an MRI without its contrast is ambiguous, and guessing would train the wrong contrast silently.
MODALITY_ALIASES = {
    "xray": "xray", "x-ray": "xray", "x_ray": "xray", "cxr": "xray", "cr": "xray", "dx": "xray", "radiograph": "xray",
    "ct": "ct",
    "t1": "mri_t1", "mri_t1": "mri_t1", "t1w": "mri_t1", "t1n": "mri_t1",
    "t2": "mri_t2", "mri_t2": "mri_t2", "t2w": "mri_t2",
    "pd": "mri_pd", "mri_pd": "mri_pd", "pdw": "mri_pd",
    "flair": "mri_flair", "mri_flair": "mri_flair", "fla": "mri_flair", "t2f": "mri_flair",
    "t1c": "mri_t1c", "mri_t1c": "mri_t1c", "t1ce": "mri_t1c", "t1gd": "mri_t1c", "t1post": "mri_t1c",
}


def canonical_features(size: int) -> Features:
    """The canonical schema for square images of side ``size``."""
    features = {name: Value("string") for name in TEXT_COLUMNS}
    features.update({key: Array2D((size, size), "float32") for key in image_modality_keys()})
    return Features(features)


def assign_splits(
    patient_ids: Iterable[str],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    validation_patients: Iterable[str] = (),
    test_patients: Iterable[str] = (),
) -> dict[str, str]:
    """Assigns every distinct patient to one split, deterministically and independently of input order.

    Patients are ranked by a seeded hash and cut by the fractions, so adding patients never moves an
    existing one between train and test by more than the cut points shift. With three or more patients,
    validation and test each get at least one.

    ``validation_patients`` and ``test_patients`` go to their split whatever the hash says and count towards
    its share; the other patients, in hash order, fill what is left of each share (none where the named
    patients already fill it). With ``fractions=(1, 0, 0)`` exactly the named patients are held out.

    Returns:
        ``{patient_id: split_name}`` with split names from :data:`SPLITS`.

    Raises:
        ValueError: bad fractions, a patient named in both lists, or a named patient not in ``patient_ids``.
    """
    _check_fractions(fractions)
    unique = sorted(set(patient_ids))
    named = _named_splits(unique, {"validation": validation_patients, "test": test_patients})
    n = len(unique)
    n_test = int(round(fractions[2] * n))
    n_val = int(round(fractions[1] * n))
    if n >= 3:
        n_test, n_val = max(n_test, 1 if fractions[2] > 0 else 0), max(n_val, 1 if fractions[1] > 0 else 0)
    n_val = max(0, n_val - list(named.values()).count("validation"))
    n_test = max(0, n_test - list(named.values()).count("test"))
    rest = [pid for pid in unique if pid not in named]
    ranked = sorted(rest, key=lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest())
    n_train = len(ranked) - n_val - n_test
    names = ["train"] * n_train + ["validation"] * n_val + ["test"] * n_test
    return {**named, **dict(zip(ranked, names))}


def _named_splits(patients: list[str], named: dict[str, Iterable[str]]) -> dict[str, str]:
    """``{patient: split}`` for patients named per split, checked to exist and to be named for one split only."""
    split_of: dict[str, str] = {}
    for split, names in named.items():
        if isinstance(names, str):
            raise ValueError(f"{split}_patients must be a list of patient ids, not the string {names!r}")
        for name in names:
            if name not in patients:
                raise ValueError(
                    f"{split}_patients names {name!r}, which no file has; patients are {_preview(patients)}"
                )
            if split_of.get(name, split) != split:
                raise ValueError(
                    f"patient {name!r} is named in both {split_of[name]}_patients and {split}_patients; "
                    "a patient belongs to one split"
                )
            split_of[name] = split
    return split_of


def _preview(names: Sequence[str], limit: int = 20) -> str:
    """``[a, b, ...]`` for error messages, cut after ``limit`` names with the total count."""
    shown = ", ".join(repr(name) for name in names[:limit])
    return f"[{shown}]" if len(names) <= limit else f"[{shown}, ...] ({len(names)} in all)"


def _dataset_dict(rows: list[dict], size: int, split_of: dict[str, str]) -> DatasetDict:
    features = canonical_features(size)
    by_split = {name: [row for row in rows if split_of[row["patient_id"]] == name] for name in SPLITS}
    return DatasetDict(
        {
            name: Dataset.from_dict({col: [row.get(col) for row in split_rows] for col in features}, features=features)
            for name, split_rows in by_split.items()
        }
    )


def build_phantom_dataset(
    n: int, seed: int = 0, size: int = 64, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
) -> DatasetDict:
    """Generates ``n`` virtual patients and splits them by patient.

    Byte-identical for the same ``(n, seed, size)``: patient ``i`` depends only on ``(seed, i)``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    generator = PhantomGenerator(seed=seed, size=size)
    rows = []
    for index in range(n):
        patient = generator.patient(index)
        row = {
            "patient_id": patient.patient_id,
            "anatomy": patient.anatomy,
            "report": patient.report,
            "findings": patient.to_json(),
        }
        row.update({key: patient.images.get(key) for key in image_modality_keys()})
        rows.append(row)
    return _dataset_dict(rows, size, assign_splits((row["patient_id"] for row in rows), seed, fractions))


def build_phantom_split(
    n: int,
    split: str,
    seed: int = 0,
    size: int = 64,
    limit: int | None = None,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
) -> Dataset:
    """One split of :func:`build_phantom_dataset` ``(n, seed, size)``, rendering only that split's patients.

    Splits depend only on patient ids, so the benchmark can rebuild the held-out test split of the data a
    model was trained on without rendering the other 90 % of it. ``limit`` keeps the first ``limit`` patients
    of the split (in index order).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    generator = PhantomGenerator(seed=seed, size=size)
    ids = [f"phantom-s{seed}-{index:06d}" for index in range(n)]
    split_of = assign_splits(ids, seed, fractions)
    indices = [index for index, pid in enumerate(ids) if split_of[pid] == split][:limit]
    rows = []
    for index in indices:
        patient = generator.patient(index)
        if patient.patient_id != ids[index]:
            raise RuntimeError(f"phantom ids changed format ({patient.patient_id!r}); update build_phantom_split")
        row = {"patient_id": patient.patient_id, "anatomy": patient.anatomy, "report": patient.report,
               "findings": patient.to_json()}
        row.update({key: patient.images.get(key) for key in image_modality_keys()})
        rows.append(row)
    features = canonical_features(size)
    return Dataset.from_dict({col: [row.get(col) for row in rows] for col in features}, features=features)


def has_image(split: Dataset, key: str) -> np.ndarray:
    """Boolean `(num_rows,)`: where column ``key`` holds an image (not null), honouring a ``select``-ed view.

    ``split.data`` of a selected dataset is the whole underlying table, so it is never read directly.
    """
    if key not in split.column_names:
        raise ValueError(f"split has no column {key!r}; columns are {split.column_names}")
    table = split.select_columns([key]).with_format("arrow")[:]
    return ~np.asarray(table.column(key).is_null().to_numpy(zero_copy_only=False), dtype=bool)


def load_medm2g_dataset(path: str | Path) -> DatasetDict:
    """Loads a dataset written by ``medm2g phantoms`` or ``medm2g prepare`` and checks its columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset directory {str(path)!r} does not exist")
    dataset = load_from_disk(str(path))
    if not isinstance(dataset, DatasetDict):
        raise ValueError(f"{path} holds a single Dataset; expected a DatasetDict with splits {list(SPLITS)}")
    expected = set(TEXT_COLUMNS) | set(image_modality_keys())
    for name, split in dataset.items():
        missing = expected - set(split.column_names)
        if missing:
            raise ValueError(f"split {name!r} of {path} lacks the canonical columns {sorted(missing)}")
    return dataset


# --------------------------------------------------------------------------------------------------
# `medm2g prepare`: a user's folder of DICOM / NIfTI / PNG files (+ an optional reports CSV)
# --------------------------------------------------------------------------------------------------

LAYOUTS = ("modality-folders", "subjects")
PREPARE_INFO = "prepare_info.json"
"""The file :func:`save_dataset` writes beside a prepared dataset: arguments, intensity conventions, split patients."""

NIFTI_SLICE_AXIS = 2
"""The stored voxel axis that NIfTI volumes are cut across: the last spatial one, which
:func:`~medm2g_diffusers.data.io.read_image` slices by default (axial in RAS- or LPS-like volumes). Volumes
are never reoriented; ``prepare_info.json`` records the anatomical directions of the slices' rows and columns."""

FOREGROUND_MARGIN = 0.05
"""How far from the background to the 99th percentile a voxel must be to count as foreground."""


@dataclass(frozen=True)
class CsvColumns:
    """Which CSV columns hold the file path, modality, report, patient id and anatomy (renamable for foreign CSVs).

    Only ``file`` must exist; a CSV without an ``anatomy`` column leaves that column None.
    """

    file: str = "file"
    modality: str = "modality"
    report: str = "report"
    patient_id: str = "patient_id"
    anatomy: str = "anatomy"

    @classmethod
    def parse(cls, spec: str | None) -> "CsvColumns":
        """Parses ``"report=clinical_notes,patient_id=patientid"`` into a mapping (unnamed fields keep defaults)."""
        if not spec:
            return cls()
        values = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in cls.__dataclass_fields__ or not value.strip():
                raise ValueError(
                    f"csv_columns entries must look like FIELD=COLUMN with FIELD in {list(cls.__dataclass_fields__)}; "
                    f"got {item!r}"
                )
            values[key] = value.strip()
        return cls(**values)


def resolve_modality(name: str, modality_map: dict[str, str] | None = None, parameter: str = "modality") -> str:
    """Maps a user's modality name (folder name, CSV value, DICOM code) to a registry key."""
    if modality_map and name in modality_map:
        key = modality_map[name]
    else:
        key = MODALITY_ALIASES.get(name.strip().lower())
        if key is None:
            raise ValueError(
                f"{parameter} {name!r} is not a known modality name; use one of {sorted(MODALITY_ALIASES)} or map it "
                f"explicitly, e.g. --modality-map {name}=mri_t2"
            )
    return get_modality(key, parameter).key


def to_square(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads (in the image's own minimum) to a square, then resizes to ``(size, size)`` bilinearly.

    Padding rather than cropping keeps the whole field of view; the pad value is the image minimum (air
    in CT, background in MRI/X-ray) so no artificial edge appears.
    """
    h, w = array.shape
    side = max(h, w)
    padded = np.full((side, side), float(array.min()), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    padded[top : top + h, left : left + w] = array
    if side == size:
        return padded
    return np.asarray(Image.fromarray(padded, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)


def native_units(image, key: str, png_ct_window: tuple[float, float]) -> np.ndarray:
    """Brings a loaded image into the registry's native units for ``key``."""
    array = image.array
    if key == "ct" and image.units == "unit":
        # A CT PNG/JPEG carries no HU: treat its [0, 1] as the given window, stated by the caller.
        # (NIfTI CT comes as "signal" whose stored values are HU by convention, and is kept as is.)
        low, high = png_ct_window
        array = low + array * (high - low)
    return array.astype(np.float32)


def _files_under(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and _has_supported_suffix(p)
    )


def _has_supported_suffix(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in SUPPORTED_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def parse_nifti_slices(spec: str) -> slice | None:
    """Parses ``nifti_slices``: which slices across :data:`NIFTI_SLICE_AXIS` of each NIfTI volume become samples.

    ``"middle"`` gives ``None``: one slice per volume, the middle one (what :func:`~.io.read_image` reads, and
    the behaviour without the option). ``"all"`` gives ``slice(None)``. ``"START:STOP[:STEP]"`` gives
    ``slice(START, STOP, STEP)`` with Python's meaning (STOP excluded); the numbers are non-negative integers
    and either end may be left out (``"::2"``: every second slice).
    """
    if spec == "middle":
        return None
    if spec == "all":
        return slice(None)
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"[0-9]*", part) for part in parts):
        raise ValueError(
            f"nifti_slices must be 'middle', 'all' or START:STOP[:STEP] with non-negative integers; got {spec!r}"
        )
    start, stop, step = (int(part) if part else None for part in [*parts, ""][:3])
    if step == 0:
        raise ValueError(f"nifti_slices STEP must be at least 1; got {spec!r}")
    if start is not None and stop is not None and start >= stop:
        raise ValueError(f"nifti_slices START must be below STOP; got {spec!r}")
    return slice(start, stop, step)


def _slice_indices(selection: slice, n_slices: int, path: Path) -> range:
    """The slice indices ``selection`` picks among ``n_slices``; one reaching past the volume is an error."""
    if (selection.start or 0) >= n_slices or (selection.stop is not None and selection.stop > n_slices):
        parts = [selection.start, selection.stop] + ([] if selection.step is None else [selection.step])
        spec = ":".join("" if v is None else str(v) for v in parts)
        raise ValueError(
            f"nifti_slices {spec!r} reaches past the {n_slices} slices of {path} along axis {NIFTI_SLICE_AXIS}"
        )
    return range(n_slices)[selection]


def foreground_threshold(volume: np.ndarray) -> float:
    """The value above which a voxel of ``volume`` counts as foreground (for ``min_foreground``).

    The background is the median of the volume's outermost voxels (its faces), which lie outside the body
    whenever the field of view holds all of it: 0 in skull-stripped MRI, air in CT. Not the minimum:
    resampled volumes ring below their background (the TCGA subject of the shared brain set reaches -122
    around a background of 0). The threshold lies :data:`FOREGROUND_MARGIN` of the way from the background
    to the 99th percentile, so that noise in the air of a CT or of an MRI that is not skull-stripped does not
    count.

    Args:
        volume (`np.ndarray` of shape `(rows, columns, slices)`): one volume in any real dtype.
    """
    faces = [np.take(volume, index, axis=axis).ravel() for axis in range(volume.ndim) for index in (0, -1)]
    background = float(np.median(np.concatenate(faces)))
    return background + FOREGROUND_MARGIN * (float(np.percentile(volume, 99)) - background)


def foreground_fraction(image: np.ndarray, threshold: float) -> float:
    """The fraction of the pixels of a 2-D ``image`` above ``threshold`` (see :func:`foreground_threshold`)."""
    return float(np.mean(image > threshold))


# Rules of clean_clinical_note, in the order they run (see its docstring).
_URL_END = r"\S+?(?=[.,;:)\]]*(?:\s|$))"  # a URL ends before whitespace, less closing marks of the sentence
_URL = re.compile(
    rf"(?:\b(?:see|at|via)\s+)?(?:(?:https?://|www\.){_URL_END}|\bdoi:\s*{_URL_END}|\b10\.\d{{4,9}}/{_URL_END})", re.I
)
_COURTESY = re.compile(r"[^.!?]*\bcourtesy\b[^.!?]*[.!?]?", re.I)
_HEADING = re.compile(r"\b(?:Presentation|Imaging Notes|Case Discussion|Discussion)\s*:\s*")
_CASE_LABEL = re.compile(r"\b(?:case|patient)\s*(?:no\.?\s*|#\s*)?\d+[a-z]?\s*(?::|\s[-\u2013\u2014](?=\s))\s*", re.I)
_FIGURE = r"(?i:\bfig(?:ure)?s?\.?)\s*\d+[a-z]?(?:\s*(?:,|and|&|-|\u2013)\s*\d+[a-z]?)*"
_PANEL = r"\d?[A-H](?:\s*(?:,|and|&|-|\u2013)\s*\d?[A-H])*"
_FIGURE_REF = re.compile(rf"\(\s*(?i:see\s+)?(?:{_FIGURE}|{_PANEL})\s*\)|(?i:\bsee\s+)?{_FIGURE}")
_MARK = r"(?:[a-z]+\s+)?(?:arrows?|arrowheads?|asterisks?|circles?|stars?)"
_MARKS = re.compile(rf"\(\s*{_MARK}(?:\s*(?:,|and|&|;)\s*{_MARK})*\s*\)", re.I)
_MONTH = (
    r"\b(?:January|February|March|April|May|June|July|August|September|October|November|December"
    r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)\.?"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?(?![0-9])"
_DATE = (
    rf"(?:{_MONTH}\s+{_DAY}(?:,?\s+\d{{4}})?|\b{_DAY}\s+{_MONTH}(?:,?\s+\d{{4}})?|{_MONTH}\s+\d{{4}}"
    r"|\b\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\b|\b\d{4}-\d{2}-\d{2}\b)"
)
_DATES = re.compile(
    rf"\(\s*{_DATE}\s*\)|(?:(?i:\b(?:on|in|from|since|until|dated))\s+)?{_DATE}"
    rf"(?:\s*(?:to|until|-|\u2013)\s*(?:{_DATE}|\d{{1,2}}(?![0-9])))?"
)
_EMPTY_PARENTHESES = re.compile(r"\(\s*[,;:]*\s*\)")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:])")
_PUNCTUATION_RUN = re.compile(r"[.,;:](?:\s*[.,;:])+")
_LEADING_PUNCTUATION = re.compile(r"^[\s.,;:\-\u2013\u2014]+")


def clean_clinical_note(text: str | None) -> str | None:
    """Removes the boilerplate of free-text case notes and keeps their clinical content.

    Case notes copied from papers and teaching sites (the COVID chest X-ray set's ``clinical_notes``) carry
    text about the publication rather than the patient; a text-to-image model would learn to expect it.
    The rules, in order:

    1. **URLs and DOIs**: ``http(s)://...``, ``www....``, ``doi:...`` and bare ``10.NNNN/...``, with a
       leading "see", "at" or "via".
    2. **Courtesy lines**: the whole sentence containing "courtesy" ("Image courtesy of Dr A.").
    3. **Web-page headings**: "Presentation:", "Imaging Notes:", "Discussion:", "Case Discussion:" (the
       text after them stays).
    4. **Case numbering**: "Case 2:", "Case #3 -", "Patient 4 -" used as labels (followed by a colon or a
       spaced dash); "the son of Case 1" is content and stays.
    5. **Figure and panel references**: "Figure 3", "Fig. 3a", "see Figs 1 and 2" anywhere, and in
       parentheses panel letters A-H with an optional digit ("(2A)", "(B, C)"); lowercase "(a)" may be a list
       and stays.
    6. **Annotation marks**: "(arrows)", "(white arrowhead)", "(circle)", "(asterisk)": they point into a
       figure the model never sees.
    7. **Dates**: "Jan 6", "January 19, 2020", "5 March", "March 2020", "13/03/2020", "2020-03-13", with a
       leading "on", "in", "from", "since", "until" or "dated" and a trailing range ("from January 8 to
       12"); a date in parentheses goes with them. Relative times ("4 days later", "day 3") are clinical and stay.
    8. **Tidying**: parentheses left empty, whitespace runs (to one space), spaces before ``. , ; :``, runs
       of those marks (to "." if one was a full stop, else the first) and leading punctuation.

    Args:
        text: a note, or None.

    Returns:
        The cleaned note, or None when ``text`` is None or nothing with a letter or digit is left.
    """
    if text is None:
        return None
    for rule in (_URL, _COURTESY, _HEADING, _CASE_LABEL, _FIGURE_REF, _MARKS, _DATES, _EMPTY_PARENTHESES):
        text = rule.sub(" ", text)
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split()))
    text = _PUNCTUATION_RUN.sub(lambda m: "." if "." in m.group() else m.group()[0], text)
    text = _LEADING_PUNCTUATION.sub("", text).strip()
    return text if re.search(r"[A-Za-z0-9]", text) else None


@dataclass
class _Entry:
    """One image file of a sample, before it is read."""

    sample_id: str
    patient_id: str
    key: str
    path: Path
    report: str | None = None
    anatomy: str | None = None


@dataclass(frozen=True)
class _ReadOptions:
    """How :func:`prepare_dataset` turns files into rows (its arguments, parsed)."""

    size: int
    png_ct_window: tuple[float, float]
    selection: slice | None
    min_foreground: float
    keep: frozenset[str] | None


@dataclass
class _PrepareLog:
    """What :func:`prepare_dataset` found while reading, for ``prepare_info.json``."""

    conventions: dict[str, set[str]] = field(default_factory=dict)
    orientations: set[str] = field(default_factory=set)
    slices_considered: int = 0
    slices_below_min_foreground: int = 0
    samples_without_kept_images: int = 0

    def record(self, key: str, image: MedicalImage, png_ct_window: tuple[float, float]) -> None:
        self.conventions.setdefault(key, set()).add(intensity_convention(key, image, png_ct_window))
        if image.source_format == "nifti":
            self.orientations.add("".join(image.metadata["axis_codes"]))


def intensity_convention(key: str, image: MedicalImage, png_ct_window: tuple[float, float]) -> str:
    """One sentence on what the numbers that :func:`native_units` makes of ``image`` mean, for ``prepare_info.json``."""
    source = image.source_format
    if key == "ct" and image.units == "unit":
        low, high = png_ct_window
        return (
            f"{source}: a grey value g in [0, 1] (8-bit v: g = v/255) stands for {low:g} + g * {high - low:g} HU "
            f"(png_ct_window [{low:g}, {high:g}])"
        )
    if image.units == "HU":
        return f"{source}: Hounsfield units through Rescale Slope/Intercept"
    if source == "nifti":
        meaning = "taken as HU (the format does not say)" if key == "ct" else "scanner signal as stored"
        return f"nifti: stored values after scl_slope/scl_inter, {meaning}"
    if image.units == "unit":
        return f"{source}: display value in [0, 1] (grey value over its bit depth's maximum, or DICOM VOI LUT/window)"
    return f"{source}: stored {image.units} as read"


def prepare_dataset(
    images: str | Path,
    reports_csv: str | Path | None = None,
    *,
    size: int = 256,
    seed: int = 0,
    modality_map: dict[str, str] | None = None,
    csv_columns: CsvColumns | None = None,
    patient_regex: str | None = None,
    png_ct_window: tuple[float, float] = (-1000.0, 1000.0),
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    layout: str = "modality-folders",
    nifti_slices: str = "middle",
    min_foreground: float = 0.0,
    modalities: Sequence[str] | None = None,
    clean_notes: bool = False,
    validation_patients: Sequence[str] = (),
    test_patients: Sequence[str] = (),
    exclude_patients: Sequence[str] = (),
    return_info: bool = False,
) -> DatasetDict | tuple[DatasetDict, dict]:
    """Turns a folder of medical images (and optionally a CSV of reports) into the canonical dataset.

    Three layouts are understood:

    * **with a CSV** (columns ``file, modality, report, patient_id, anatomy``, renamable with ``csv_columns``):
      one sample per row; ``file`` is relative to ``images``. Rows without a ``modality`` take it from the
      DICOM ``Modality`` tag or the parent folder name.
    * **modality folders** (``layout="modality-folders"``, the default without a CSV): every sub-folder named
      for a modality (``CT/``, ``T1/``, ``xray/`` ... or mapped with ``modality_map``) holds one modality, and
      files with the same name across those folders are one paired sample (the layout of co-registered
      CT-MRI sets). ``patient_regex`` (one group, applied to the file stem) gives the patient id; otherwise
      each stem is its own patient.
    * **subjects** (``layout="subjects"``): every sub-folder of ``images`` is one patient and one paired
      sample, and each file's stem names its modality (``t1n.nii.gz``, ``t2f.nii.gz``, ``fla.nii.gz``: see
      :data:`MODALITY_ALIASES`, or ``modality_map``), as BraTS subjects come.

    Args:
        size: side of the square images written (padded then resized; see :func:`to_square`).
        png_ct_window: the HU window that a CT PNG's grey values ``[0, 1]`` stand for.
        seed: seeds the patient-wise split.
        fractions: train / validation / test shares of the patients (see :func:`assign_splits`).
        nifti_slices: ``"middle"``, ``"all"`` or ``"START:STOP[:STEP]"`` (:func:`parse_nifti_slices`): the
            slices across :data:`NIFTI_SLICE_AXIS` of every NIfTI volume that become samples, each a row of
            the volume's patient. The same index pairs across the volumes of one sample, which must therefore
            have one shape. DICOM, PNG and JPEG files stay one image each.
        min_foreground: with multi-slice ``nifti_slices``, keep a slice index only when at least this fraction
            of its pixels is foreground (:func:`foreground_threshold`) in every volume of the sample, so the
            empty slices above and below a brain are no samples and the contrasts stay paired.
        modalities: registry keys to keep; other images are not read, and a sample left without an image is
            dropped (e.g. the CT rows of a chest X-ray CSV).
        clean_notes: pass every report through :func:`clean_clinical_note`.
        validation_patients, test_patients: patients held out by name (see :func:`assign_splits`).
        exclude_patients: patients left out altogether (e.g. a series whose contrast is not the one mapped).
        return_info: also return what ``prepare_info.json`` records: intensity conventions per modality,
            slice orientation, dropped slices and samples, note cleaning counts, each split's patients.

    Returns:
        The ``DatasetDict`` (``train``, ``validation``, ``test``; a split may be empty), with the info dict
        when ``return_info``.
    """
    images = Path(images)
    if not images.is_dir():
        raise ValueError(f"images must be an existing directory; got {str(images)!r}")
    if not isinstance(size, int) or not 16 <= size <= 1024:
        raise ValueError(f"size must be an integer in [16, 1024]; got {size!r}")
    pattern = re.compile(patient_regex) if patient_regex else None
    if pattern is not None and pattern.groups != 1:
        raise ValueError(f"patient_regex must have exactly one capture group; got {patient_regex!r}")
    _check_layout(layout, reports_csv, patient_regex)
    _check_fractions(fractions)
    selection = parse_nifti_slices(nifti_slices)
    if not 0.0 <= min_foreground < 1.0:
        raise ValueError(f"min_foreground must be a fraction in [0, 1); got {min_foreground!r}")
    if min_foreground > 0 and selection is None:
        raise ValueError(
            "min_foreground filters the slices of NIfTI volumes, so it needs nifti_slices 'all' or "
            "START:STOP[:STEP]; got nifti_slices 'middle'"
        )
    options = _ReadOptions(size, png_ct_window, selection, min_foreground, _modalities_to_keep(modalities))

    if reports_csv is not None:
        entries = list(_entries_from_csv(images, Path(reports_csv), csv_columns or CsvColumns(), modality_map))
    elif layout == "subjects":
        entries = list(_entries_from_subjects(images, modality_map))
    else:
        entries = list(_entries_from_folders(images, modality_map))
    if not entries:
        raise ValueError(f"no images with suffixes {sorted(SUPPORTED_SUFFIXES)} found under {images}")
    if pattern is not None:
        _apply_patient_regex(entries, pattern)
    note_counts = _clean_notes(entries) if clean_notes else None
    groups: dict[str, list[_Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.sample_id, []).append(entry)
    patients = sorted({group[0].patient_id for group in groups.values()})
    # Checked before any image is read: a typo in a patient id should cost nothing.
    _named_splits(patients, {"exclude": exclude_patients, "validation": validation_patients, "test": test_patients})

    log = _PrepareLog()
    rows = [
        row
        for sample_id, group in groups.items()
        if group[0].patient_id not in exclude_patients
        for row in _sample_rows(sample_id, group, options, log)
    ]
    if not rows:
        raise ValueError(f"no sample under {images} is left with an image of modalities {sorted(options.keep or [])}")
    split_of = assign_splits(
        (row["patient_id"] for row in rows), seed, fractions, validation_patients, test_patients
    )
    dataset = _dataset_dict(rows, size, split_of)
    if not return_info:
        return dataset
    info = {
        "layout": "csv" if reports_csv is not None else layout,
        "intensity": {key: sorted(conventions) for key, conventions in sorted(log.conventions.items())},
        "excluded_patients": sorted(exclude_patients),
        "samples_without_kept_images": log.samples_without_kept_images,
        "splits": {
            name: {"rows": split.num_rows, "patients": sorted(set(split["patient_id"]))}
            for name, split in dataset.items()
        },
    }
    if log.orientations:
        info["nifti"] = {
            "slices": nifti_slices,
            "axis": NIFTI_SLICE_AXIS,
            "rows_columns_axis_codes": sorted(log.orientations),
            "min_foreground": min_foreground,
            "slices_considered": log.slices_considered,
            "slices_below_min_foreground": log.slices_below_min_foreground,
        }
    if note_counts is not None:
        info["clean_notes"] = note_counts
    return dataset, info


def _check_layout(layout: str, reports_csv: str | Path | None, patient_regex: str | None) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}; got {layout!r}")
    if layout == "subjects" and reports_csv is not None:
        raise ValueError(
            "layout 'subjects' takes patients from folder names and modalities from file names, so it reads no "
            f"reports_csv; got {str(reports_csv)!r}"
        )
    if layout == "subjects" and patient_regex:
        raise ValueError(
            "patient_regex reads the patient from a file stem, but with layout 'subjects' the folder is the "
            f"patient and the stem the modality; got {patient_regex!r}"
        )


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1; got {tuple(fractions)}")


def _modalities_to_keep(modalities: Sequence[str] | None) -> frozenset[str] | None:
    if modalities is None:
        return None
    keys = image_modality_keys()
    for key in modalities:
        if key not in keys:
            raise ValueError(f"modalities must be image modality keys {keys}; got {key!r}")
    return frozenset(modalities)


def _apply_patient_regex(entries: list[_Entry], pattern: re.Pattern) -> None:
    for entry in entries:
        match = pattern.search(_stem(entry.path))
        if match is None:
            raise ValueError(f"patient_regex {pattern.pattern!r} does not match the file name {entry.path.name!r}")
        entry.patient_id = match.group(1)


def _clean_notes(entries: list[_Entry]) -> dict[str, int]:
    """Cleans every entry's report in place (:func:`clean_clinical_note`); counts notes, changed and emptied."""
    counts = {"notes": 0, "changed": 0, "emptied": 0}
    for entry in entries:
        if entry.report is None:
            continue
        cleaned = clean_clinical_note(entry.report)
        counts["notes"] += 1
        counts["changed"] += cleaned != entry.report
        counts["emptied"] += cleaned is None
        entry.report = cleaned
    return counts


def _sample_rows(sample_id: str, group: list[_Entry], options: _ReadOptions, log: _PrepareLog) -> list[dict]:
    """The rows of one sample: one row, or one per kept slice index when its images are NIfTI volumes."""
    row = {"patient_id": group[0].patient_id, "anatomy": None, "report": None, "findings": None}
    images: dict[str, MedicalImage] = {}
    for entry in group:
        row["report"] = entry.report or row["report"]
        row["anatomy"] = entry.anatomy or row["anatomy"]
        if options.keep is not None and entry.key not in options.keep:
            continue
        if entry.key in images:
            raise ValueError(f"sample {sample_id!r} has two {entry.key} images (second: {entry.path})")
        multi_slice = options.selection is not None and _is_nifti(entry.path)
        images[entry.key] = _read_nifti_stack(entry.path) if multi_slice else read_image(entry.path)
        log.record(entry.key, images[entry.key], options.png_ct_window)
    if not images:
        log.samples_without_kept_images += 1
        return []
    arrays = {key: native_units(image, key, options.png_ct_window) for key, image in images.items()}
    volumes = sorted(key for key, array in arrays.items() if array.ndim == 3)
    if not volumes:
        return [{**row, **{key: to_square(array, options.size) for key, array in arrays.items()}}]
    if len(volumes) != len(arrays):
        raise ValueError(
            f"sample {sample_id!r} mixes NIfTI volumes ({volumes}) with 2-D images "
            f"({sorted(set(arrays) - set(volumes))}); with multi-slice nifti_slices every slice needs its partner"
        )
    kept = _kept_slices(sample_id, arrays, group[0].path, options, log)
    return [{**row, **{key: to_square(array[:, :, k], options.size) for key, array in arrays.items()}} for k in kept]


def _read_nifti_stack(path: Path) -> MedicalImage:
    """A whole NIfTI volume as a `(rows, columns, slices)` image in stored voxel order (volume 0 of a 4-D file)."""
    first = read_image(path, slice_index=0)  # the slices' axis codes and spacing, without reading every voxel
    array, _, units = read_volume(path)
    if array.ndim == 4:
        array = array[..., 0]  # the volume read_image reads
    elif array.ndim == 2:
        array = array[..., np.newaxis]
    metadata = {name: value for name, value in first.metadata.items() if name != "slice_index"}
    return MedicalImage(array, units, None, first.spacing, "nifti", metadata)


def _kept_slices(
    sample_id: str, volumes: dict[str, np.ndarray], path: Path, options: _ReadOptions, log: _PrepareLog
) -> list[int]:
    """The slice indices of a sample's co-registered volumes that ``options`` select and keep."""
    shapes = {key: volume.shape for key, volume in volumes.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(
            f"sample {sample_id!r}: its volumes differ in shape ({shapes}); slices pair by index only across "
            "co-registered volumes of one shape"
        )
    indices = _slice_indices(options.selection, next(iter(shapes.values()))[NIFTI_SLICE_AXIS], path)
    log.slices_considered += len(indices)
    if options.min_foreground == 0:
        return list(indices)
    thresholds = {key: foreground_threshold(volume) for key, volume in volumes.items()}
    kept = [
        k
        for k in indices
        if all(
            foreground_fraction(volume[:, :, k], thresholds[key]) >= options.min_foreground
            for key, volume in volumes.items()
        )
    ]
    log.slices_below_min_foreground += len(indices) - len(kept)
    return kept


def _entries_from_folders(root: Path, modality_map: dict[str, str] | None) -> Iterator[_Entry]:
    for path in _files_under(root):
        folder = path.parent.relative_to(root)
        if not folder.parts:
            raise ValueError(
                f"{path} is not inside a modality folder; without a CSV, files must sit in folders named for "
                "their modality (e.g. CT/, T2/) so pairs can be matched by file name"
            )
        key = resolve_modality(folder.parts[-1], modality_map, parameter="folder name")
        rest = str(Path(*folder.parts[:-1]) / _stem(path))
        yield _Entry(rest, rest, key, path)


def _entries_from_subjects(root: Path, modality_map: dict[str, str] | None) -> Iterator[_Entry]:
    for path in _files_under(root):
        parts = path.relative_to(root).parts
        if len(parts) != 2:
            raise ValueError(
                f"{path}: with layout 'subjects' every file sits directly in a subject folder of {root} "
                f"(SUBJECT/MODALITY.nii.gz); got {'/'.join(parts)}"
            )
        parameter = f"layout 'subjects': the file stem of {'/'.join(parts)},"
        key = resolve_modality(_stem(path), modality_map, parameter=parameter)
        yield _Entry(parts[0], parts[0], key, path)


def _entries_from_csv(
    root: Path, csv_path: Path, columns: CsvColumns, modality_map: dict[str, str] | None
) -> Iterator[_Entry]:
    if not csv_path.is_file():
        raise ValueError(f"reports_csv must be an existing CSV file; got {str(csv_path)!r}")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for required in (columns.file,):
            if required not in header:
                raise ValueError(f"{csv_path} has no column {required!r} (columns: {header})")
        for line, record in enumerate(reader, start=2):
            rel = (record.get(columns.file) or "").strip()
            if not rel:
                continue
            path = (root / rel).resolve()
            if root.resolve() not in path.parents:
                raise ValueError(f"{csv_path}:{line}: file {rel!r} points outside {root}")
            if not path.is_file():
                raise ValueError(f"{csv_path}:{line}: file {rel!r} does not exist under {root}")
            name = (record.get(columns.modality) or "").strip()
            if name:
                key = resolve_modality(name, modality_map, parameter=f"{csv_path.name}:{line} modality")
            else:
                key = _modality_from_file(path, modality_map)
            patient = (record.get(columns.patient_id) or "").strip() or _stem(path)
            report = " ".join((record.get(columns.report) or "").split()) or None
            anatomy = (record.get(columns.anatomy) or "").strip() or None
            yield _Entry(f"{line}", patient, key, path, report, anatomy)


def _modality_from_file(path: Path, modality_map: dict[str, str] | None) -> str:
    image = read_image(path)
    if image.modality in ("ct", "xray"):
        return image.modality
    return resolve_modality(path.parent.name, modality_map, parameter=f"modality of {path}")


def save_dataset(dataset: DatasetDict, out: str | Path, num_shards: int = 1, info: dict | None = None) -> None:
    """Writes with ``save_to_disk`` (and ``info`` as :data:`PREPARE_INFO`) into a temp folder renamed into place.

    Refuses a non-empty ``out`` (nothing written is lost), and a reader or a killed run never sees half a
    dataset: a folder that exists is complete, with its ``prepare_info.json`` when ``info`` was given.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out directory {str(out)!r} is not empty; choose a new directory or delete it first")

    def write(tmp: Path) -> None:
        dataset.save_to_disk(str(tmp), num_shards={name: num_shards for name in dataset})
        if info is not None:
            (tmp / PREPARE_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    atomic_save_folder(write, out)


def summarize(dataset: DatasetDict) -> dict:
    """Counts rows, patients, reports and images per modality in each split (read from Arrow null counts)."""
    summary = {}
    for name, split in dataset.items():
        table = split.data
        summary[name] = {
            "rows": split.num_rows,
            "patients": len(set(split["patient_id"])),
            "reports": split.num_rows - table.column("report").null_count,
            "images": {key: split.num_rows - table.column(key).null_count for key in image_modality_keys()},
        }
    return summary
