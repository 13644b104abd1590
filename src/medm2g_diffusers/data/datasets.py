"""Hugging Face datasets in the canonical MedM2G layout, from phantoms or from a user's folder.

Every dataset this package writes or reads has the same columns, one row per sample (a patient at one
time point, for which any subset of modalities may exist):

| column | type | meaning |
| --- | --- | --- |
| ``patient_id`` | string | splits are made by this column, never by row |
| ``anatomy`` | string or None | ``chest`` / ``head`` for phantoms; what the user says, else None |
| ``report`` | string or None | radiology report (or clinical note) |
| ``findings`` | string or None | JSON list of structured findings (phantoms only: real data has no ground truth) |
| ``xray`` ``ct`` ``mri_t1`` ``mri_t2`` ``mri_pd`` ``mri_flair`` | ``Array2D((size, size), float32)`` or None | images in native units (CT in HU, X-ray in ``[0, 1]``, MRI signal) |

Images are stored in native units rather than ``[-1, 1]`` so that the intensity convention stays in one
place (:mod:`medm2g_diffusers.modalities`) and a dataset can be checked by eye in HU. The conversion to the
model range happens lazily in the training transforms.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Array2D, Dataset, DatasetDict, Features, Value, load_from_disk
from PIL import Image

from ..modalities import get_modality, image_modality_keys
from .io import SUPPORTED_SUFFIXES, read_image
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
}


def canonical_features(size: int) -> Features:
    """The canonical schema for square images of side ``size``."""
    features = {name: Value("string") for name in TEXT_COLUMNS}
    features.update({key: Array2D((size, size), "float32") for key in image_modality_keys()})
    return Features(features)


def assign_splits(
    patient_ids: Iterable[str], seed: int = 0, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
) -> dict[str, str]:
    """Assigns every distinct patient to one split, deterministically and independently of input order.

    Patients are ranked by a seeded hash and cut by the fractions, so adding patients never moves an
    existing one between train and test by more than the cut points shift. With three or more patients,
    validation and test each get at least one.

    Returns:
        ``{patient_id: split_name}`` with split names from :data:`SPLITS`.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1; got {tuple(fractions)}")
    unique = sorted(set(patient_ids))
    ranked = sorted(unique, key=lambda pid: hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest())
    n = len(ranked)
    n_test = int(round(fractions[2] * n))
    n_val = int(round(fractions[1] * n))
    if n >= 3:
        n_test, n_val = max(n_test, 1 if fractions[2] > 0 else 0), max(n_val, 1 if fractions[1] > 0 else 0)
    n_train = n - n_val - n_test
    names = ["train"] * n_train + ["validation"] * n_val + ["test"] * n_test
    return dict(zip(ranked, names))


def _dataset_dict(rows: list[dict], size: int, split_seed: int, fractions: Sequence[float]) -> DatasetDict:
    split_of = assign_splits((row["patient_id"] for row in rows), split_seed, fractions)
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
    return _dataset_dict(rows, size, seed, fractions)


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


@dataclass(frozen=True)
class CsvColumns:
    """Which CSV columns hold the file path, modality, report and patient id (renamable for foreign CSVs)."""

    file: str = "file"
    modality: str = "modality"
    report: str = "report"
    patient_id: str = "patient_id"

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
) -> DatasetDict:
    """Turns a folder of medical images (and optionally a CSV of reports) into the canonical dataset.

    Two layouts are understood:

    * **with a CSV** (columns ``file, modality, report, patient_id``, renamable with ``csv_columns``): one
      sample per row; ``file`` is relative to ``images``. Rows without a ``modality`` take it from the DICOM
      ``Modality`` tag or the parent folder name.
    * **without a CSV**: every sub-folder named for a modality (``CT/``, ``T1/``, ``xray/`` ... or mapped with
      ``modality_map``) holds one modality, and files with the same name across those folders are one
      paired sample (the layout of co-registered CT-MRI sets). ``patient_regex`` (one group, applied to
      the file stem) gives the patient id; otherwise each stem is its own patient.

    Args:
        size: side of the square images written (padded then resized; see :func:`to_square`).
        png_ct_window: the HU window that an 8-bit CT PNG's ``[0, 1]`` stands for.
        seed: seeds the patient-wise split.
    """
    images = Path(images)
    if not images.is_dir():
        raise ValueError(f"images must be an existing directory; got {str(images)!r}")
    if not isinstance(size, int) or not 16 <= size <= 1024:
        raise ValueError(f"size must be an integer in [16, 1024]; got {size!r}")
    pattern = re.compile(patient_regex) if patient_regex else None
    if pattern is not None and pattern.groups != 1:
        raise ValueError(f"patient_regex must have exactly one capture group; got {patient_regex!r}")

    entries = (
        _entries_from_csv(images, Path(reports_csv), csv_columns or CsvColumns(), modality_map)
        if reports_csv is not None
        else _entries_from_folders(images, modality_map)
    )
    samples: dict[str, dict] = {}
    for sample_id, patient_id, key, path, report in entries:
        if pattern is not None:
            match = pattern.search(_stem(path))
            if match is None:
                raise ValueError(f"patient_regex {patient_regex!r} does not match the file name {path.name!r}")
            patient_id = match.group(1)
        row = samples.setdefault(sample_id, {"patient_id": patient_id, "anatomy": None, "report": None, "findings": None})
        if key is not None:
            image = read_image(path)
            if key in row:
                raise ValueError(f"sample {sample_id!r} has two {key} images (second: {path})")
            row[key] = to_square(native_units(image, key, png_ct_window), size)
        if report:
            row["report"] = report
    if not samples:
        raise ValueError(f"no images with suffixes {sorted(SUPPORTED_SUFFIXES)} found under {images}")
    return _dataset_dict(list(samples.values()), size, seed, fractions)


def _entries_from_folders(root: Path, modality_map: dict[str, str] | None):
    for path in _files_under(root):
        folder = path.parent.relative_to(root)
        if not folder.parts:
            raise ValueError(
                f"{path} is not inside a modality folder; without a CSV, files must sit in folders named for "
                "their modality (e.g. CT/, T2/) so pairs can be matched by file name"
            )
        key = resolve_modality(folder.parts[-1], modality_map, parameter="folder name")
        rest = Path(*folder.parts[:-1]) / _stem(path)
        yield str(rest), str(rest), key, path, None


def _entries_from_csv(root: Path, csv_path: Path, columns: CsvColumns, modality_map: dict[str, str] | None):
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
            yield f"{line}", patient, key, path, report


def _modality_from_file(path: Path, modality_map: dict[str, str] | None) -> str:
    image = read_image(path)
    if image.modality in ("ct", "xray"):
        return image.modality
    return resolve_modality(path.parent.name, modality_map, parameter=f"modality of {path}")


def save_dataset(dataset: DatasetDict, out: str | Path, num_shards: int = 1) -> None:
    """Writes with ``save_to_disk``; refuses to overwrite a non-empty directory (nothing written is lost)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out directory {str(out)!r} is not empty; choose a new directory or delete it first")
    dataset.save_to_disk(str(out), num_shards={name: num_shards for name in dataset})


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
