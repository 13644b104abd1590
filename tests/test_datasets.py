import csv
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from medm2g_diffusers.data.datasets import (
    CsvColumns,
    assign_splits,
    build_phantom_dataset,
    canonical_features,
    load_medm2g_dataset,
    prepare_dataset,
    resolve_modality,
    save_dataset,
    summarize,
    to_square,
)
from medm2g_diffusers.data.io import write_dicom, write_png
from medm2g_diffusers.modalities import image_modality_keys

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CANONICAL = ["patient_id", "anatomy", "report", "findings", *image_modality_keys()]
PROVENANCE = {"model": "test"}


@pytest.fixture(scope="module")
def phantom_dataset():
    return build_phantom_dataset(30, seed=3, size=32)


def test_phantom_dataset_has_three_patient_wise_splits(phantom_dataset):
    assert list(phantom_dataset) == ["train", "validation", "test"]
    ids = {name: set(split["patient_id"]) for name, split in phantom_dataset.items()}
    assert sum(len(v) for v in ids.values()) == 30
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["validation"])
    assert all(split.num_rows > 0 for split in phantom_dataset.values())
    for split in phantom_dataset.values():
        assert split.column_names == CANONICAL
        assert split.features == canonical_features(32)


def test_phantom_rows_are_consistent(phantom_dataset):
    for row in phantom_dataset["train"]:
        findings = json.loads(row["findings"])
        assert isinstance(findings, list)
        assert "FINDINGS" in row["report"] and "IMPRESSION" in row["report"]
        assert row["ct"] is not None and row["mri_t1"] is not None
        assert (row["xray"] is not None) == (row["anatomy"] == "chest")
        assert np.asarray(row["ct"]).shape == (32, 32)


def test_phantom_dataset_is_deterministic_and_independent_of_n():
    a = build_phantom_dataset(12, seed=5, size=32)
    b = build_phantom_dataset(12, seed=5, size=32)
    c = build_phantom_dataset(20, seed=5, size=32)
    for name in a:
        assert a[name].data.equals(b[name].data)
    # patient i depends only on (seed, i): the same patient id has the same CT whatever n is
    rows_c = {row["patient_id"]: row for split in c.values() for row in split}
    for split in a.values():
        for row in split:
            np.testing.assert_array_equal(np.asarray(row["ct"]), np.asarray(rows_c[row["patient_id"]]["ct"]))


def test_bad_n_rejected():
    with pytest.raises(ValueError, match="n must be a positive integer"):
        build_phantom_dataset(0)


def test_assign_splits_is_order_independent_and_nonempty():
    ids = [f"p{i}" for i in range(50)]
    a, b = assign_splits(ids, seed=1), assign_splits(list(reversed(ids)), seed=1)
    assert a == b
    counts = {name: list(a.values()).count(name) for name in ("train", "validation", "test")}
    assert counts == {"train": 40, "validation": 5, "test": 5}
    small = assign_splits(["a", "b", "c"], seed=0)
    assert sorted(small.values()) == ["test", "train", "validation"]
    assert assign_splits(ids, seed=2) != a
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(ids, fractions=(0.5, 0.5, 0.5))


def test_save_refuses_non_empty_dir_and_load_checks_columns(tmp_path, phantom_dataset):
    out = tmp_path / "ds"
    save_dataset(phantom_dataset, out)
    with pytest.raises(FileExistsError, match="not empty"):
        save_dataset(phantom_dataset, out)
    loaded = load_medm2g_dataset(out)
    assert loaded["test"].num_rows == phantom_dataset["test"].num_rows
    bad = tmp_path / "bad"
    phantom_dataset.remove_columns(["findings"]).save_to_disk(str(bad))
    with pytest.raises(ValueError, match="lacks the canonical columns"):
        load_medm2g_dataset(bad)
    with pytest.raises(FileNotFoundError):
        load_medm2g_dataset(tmp_path / "missing")


def test_summary_counts_present_images(phantom_dataset):
    summary = summarize(phantom_dataset)
    for name, split in phantom_dataset.items():
        chest = sum(a == "chest" for a in split["anatomy"])
        assert summary[name]["images"]["xray"] == chest
        assert summary[name]["images"]["ct"] == split.num_rows
        assert summary[name]["rows"] == split.num_rows


def test_to_square_pads_then_resizes():
    wide = np.zeros((10, 20), np.float32)
    wide[:, :] = 5.0
    wide[0, 0] = -1.0
    out = to_square(wide, 16)
    assert out.shape == (16, 16) and out.dtype == np.float32
    assert out[0, 8] == pytest.approx(-1.0)  # padding uses the image minimum, top rows are padding
    assert out[8, 8] == pytest.approx(5.0)


def test_resolve_modality_aliases_and_explicit_map():
    assert resolve_modality("CT") == "ct"
    assert resolve_modality("X-ray") == "xray"
    assert resolve_modality("t2f") == "mri_flair"
    assert resolve_modality("MRI", {"MRI": "mri_t2"}) == "mri_t2"
    with pytest.raises(ValueError, match="--modality-map MRI=mri_t2"):
        resolve_modality("MRI")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_modality("MRI", {"MRI": "pet"})


def test_csv_columns_parse():
    cols = CsvColumns.parse("report=clinical_notes,patient_id=patientid")
    assert (cols.file, cols.report, cols.patient_id) == ("file", "clinical_notes", "patientid")
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        CsvColumns.parse("nonsense=x")


def _paired_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for folder in ("CT", "MRI"):
        (root / folder).mkdir(parents=True)
        for series in (1, 2, 3, 4):
            for index in range(3):
                write_png(root / folder / f"{series}{index:03d}.png", rng.random((24, 24)), provenance=PROVENANCE)
    return root


def test_prepare_pairs_folders_by_file_name(tmp_path):
    root = _paired_folder(tmp_path / "pairs")
    ds = prepare_dataset(root, size=16, modality_map={"MRI": "mri_t2"}, patient_regex=r"^(\d+)\d{3}$")
    rows = [row for split in ds.values() for row in split]
    assert len(rows) == 12
    assert all(row["ct"] is not None and row["mri_t2"] is not None and row["xray"] is None for row in rows)
    # 8-bit CT PNG [0, 1] mapped onto the stated HU window
    ct = np.concatenate([np.asarray(row["ct"]).ravel() for row in rows])
    assert -1000.0 <= ct.min() and ct.max() <= 1000.0 and ct.max() > 500.0
    patients = {name: set(split["patient_id"]) for name, split in ds.items()}
    assert set().union(*patients.values()) == {"1", "2", "3", "4"}
    assert not patients["train"] & patients["test"]


def test_prepare_without_contrast_name_fails_loudly(tmp_path):
    root = _paired_folder(tmp_path / "pairs")
    with pytest.raises(ValueError, match="MRI"):
        prepare_dataset(root, size=16)


def test_prepare_with_csv_and_dicom(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(1)
    write_dicom(root / "a.dcm", rng.uniform(-1000, 400, (20, 20)), modality="ct", provenance=PROVENANCE)
    write_png(root / "b.png", rng.random((20, 30)), provenance=PROVENANCE)
    with (tmp_path / "reports.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "kind", "notes", "pid"])
        writer.writerow(["a.dcm", "", "Small   left effusion.", "P1"])
        writer.writerow(["b.png", "X-ray", "Clear lungs.", "P2"])
        writer.writerow(["b.png", "x-ray", "Same image, later note.", "P3"])
    ds = prepare_dataset(
        root, tmp_path / "reports.csv", size=16,
        csv_columns=CsvColumns(file="path", modality="kind", report="notes", patient_id="pid"),
    )
    rows = {row["patient_id"]: row for split in ds.values() for row in split}
    assert set(rows) == {"P1", "P2", "P3"}
    assert rows["P1"]["report"] == "Small left effusion."  # whitespace normalised
    assert rows["P1"]["ct"] is not None and rows["P1"]["xray"] is None  # modality from the DICOM tag
    assert np.asarray(rows["P1"]["ct"]).min() < -500  # HU kept
    assert rows["P2"]["xray"] is not None


def test_prepare_rejects_paths_outside_root_and_missing_files(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (tmp_path / "r.csv").write_text("file,modality\n../secret.png,xray\n")
    with pytest.raises(ValueError, match="outside"):
        prepare_dataset(root, tmp_path / "r.csv")
    (tmp_path / "r2.csv").write_text("file,modality\nmissing.png,xray\n")
    with pytest.raises(ValueError, match="does not exist"):
        prepare_dataset(root, tmp_path / "r2.csv")
    with pytest.raises(ValueError, match="images must be an existing directory"):
        prepare_dataset(tmp_path / "nope")


needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


@needs_shared
def test_prepare_real_harvard_ct_mri(tmp_path):
    ds = prepare_dataset(
        SHARED_DATA / "harvard-ct-mri", size=64, modality_map={"MRI": "mri_t2"}, patient_regex=r"^(\d+)\d{3}$"
    )
    rows = [row for split in ds.values() for row in split]
    assert len(rows) == 127
    assert len({row["patient_id"] for row in rows}) == 7
    assert all(row["ct"] is not None and row["mri_t2"] is not None for row in rows)
    assert ds["test"].num_rows > 0 and ds["validation"].num_rows > 0
    save_dataset(ds, tmp_path / "harvard")
    assert set(load_from_disk(str(tmp_path / "harvard"))) == {"train", "validation", "test"}


@needs_shared
def test_prepare_real_covid_xrays_with_notes():
    ds = prepare_dataset(
        SHARED_DATA / "covid-chestxray", SHARED_DATA / "covid-chestxray" / "metadata.csv", size=64,
        csv_columns=CsvColumns.parse("report=clinical_notes,patient_id=patientid"),
    )
    rows = [row for split in ds.values() for row in split]
    assert len(rows) == 475
    xrays = [row for row in rows if row["xray"] is not None]
    cts = [row for row in rows if row["ct"] is not None]
    assert len(xrays) > 400 and len(cts) > 0
    assert sum(row["report"] is not None for row in rows) > 300
    ids = {name: set(split["patient_id"]) for name, split in ds.items()}
    assert not ids["train"] & ids["test"]


def test_build_phantom_split_matches_the_full_dataset():
    from medm2g_diffusers.data.datasets import build_phantom_split

    full = build_phantom_dataset(30, seed=3, size=32)
    test = build_phantom_split(30, "test", seed=3, size=32)
    assert test["patient_id"] == full["test"]["patient_id"] and test["report"] == full["test"]["report"]
    np.testing.assert_array_equal(np.asarray(test["ct"][0]), np.asarray(full["test"]["ct"][0]))
    assert build_phantom_split(30, "train", seed=3, size=32, limit=2)["patient_id"] == full["train"]["patient_id"][:2]
    with pytest.raises(ValueError, match="split must be one of"):
        build_phantom_split(30, "holdout")


def test_has_image_honours_a_selected_view():
    from medm2g_diffusers.data.datasets import has_image

    split = build_phantom_dataset(20, seed=0, size=32)["train"]
    chest = [i for i, a in enumerate(split["anatomy"]) if a == "chest"]
    head = [i for i, a in enumerate(split["anatomy"]) if a == "head"]
    view = split.select(head + chest[:1])  # the underlying table still has every row
    assert has_image(view, "xray").tolist() == [False] * len(head) + [True]
    with pytest.raises(ValueError, match="no column 'pet'"):
        has_image(view, "pet")
