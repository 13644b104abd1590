"""`medm2g prepare` for real data: multi-slice NIfTI, the subjects layout, named splits, note cleaning,
prepare_info.json. Everything is made in a temp dir here except the last test, which reads ../shared/data."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medm2g_diffusers.cli import main
from medm2g_diffusers.data.datasets import (
    PREPARE_INFO,
    assign_splits,
    clean_clinical_note,
    foreground_fraction,
    foreground_threshold,
    load_medm2g_dataset,
    parse_nifti_slices,
    prepare_dataset,
    save_dataset,
)
from medm2g_diffusers.data.io import write_png

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROVENANCE = {"model": "test"}
SHAPE = (12, 12, 10)  # rows, columns, slices
BRAIN_SLICES = range(2, 8)  # slices whose middle 6x6 pixels (25 %) are "brain"
SIZE = 16


def _volume(code: int, ringing: bool) -> np.ndarray:
    """Background 0; in BRAIN_SLICES a 6x6 block whose value encodes the contrast and the slice index."""
    volume = np.zeros(SHAPE, np.int16)
    for k in BRAIN_SLICES:
        volume[3:9, 3:9, k] = 1000 * code + 10 * k
    if ringing:  # resampling rings below the background, as in the TCGA subject: must not count as foreground
        volume[0:2, 0:12:2, :] = -50
    return volume


def _subjects(root: Path, names=("S1", "S2", "S3")) -> Path:
    """Subject folders with four contrasts named the ways BraTS and TCGA name them."""
    stems = [("t1n", "t1c", "t2w", "t2f"), ("t1", "t1c", "t2", "fla"), ("T1", "t1ce", "T2", "flair")]
    for index, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for code, stem in enumerate(stems[index % 3], start=1):
            image = nib.Nifti1Image(_volume(code, ringing=index == 1), np.diag([-1.0, -1.0, 1.0, 1.0]))
            nib.save(image, root / name / f"{stem}.nii.gz")
    return root


def _rows(dataset):
    return [row for split in dataset.values() for row in split]


def _codes(row, key):
    """The (contrast code, slice index) a row's image was cut from: the centre pixel of the brain block."""
    value = float(np.asarray(row[key])[SIZE // 2, SIZE // 2])
    return int(round(value)) // 1000, int(round(value)) % 1000 // 10


# ---------------------------------------------------------------------------------------------- NIfTI slices


def test_subjects_layout_gives_paired_slices_of_every_contrast(tmp_path):
    root = _subjects(tmp_path / "subjects")
    dataset, info = prepare_dataset(root, layout="subjects", nifti_slices="all", min_foreground=0.1, size=SIZE,
                                    return_info=True)
    rows = _rows(dataset)
    contrasts = ("mri_t1", "mri_t1c", "mri_t2", "mri_flair")
    assert len(rows) == 3 * len(BRAIN_SLICES)  # the empty slices at both ends are no samples
    for row in rows:
        assert all(row[key] is not None for key in contrasts) and row["ct"] is None
        found = {key: _codes(row, key) for key in contrasts}
        assert [code for code, _ in found.values()] == [1, 2, 3, 4]
        assert len({k for _, k in found.values()}) == 1  # the same slice index in every contrast
    assert {row["patient_id"] for row in rows} == {"S1", "S2", "S3"}
    assert info["nifti"]["slices_considered"] == 3 * SHAPE[2]
    assert info["nifti"]["slices_below_min_foreground"] == 3 * (SHAPE[2] - len(BRAIN_SLICES))
    assert info["nifti"]["axis"] == 2 and info["nifti"]["rows_columns_axis_codes"] == ["LP"]
    assert info["intensity"]["mri_t1"] == ["nifti: stored values after scl_slope/scl_inter, scanner signal as stored"]


def test_slice_ranges_and_the_default_middle_slice(tmp_path):
    root = _subjects(tmp_path / "subjects", names=("S1",))
    stepped = _rows(prepare_dataset(root, layout="subjects", nifti_slices="2:8:2", size=SIZE))
    assert [_codes(row, "mri_t1")[1] for row in stepped] == [2, 4, 6]
    middle = _rows(prepare_dataset(root, layout="subjects", size=SIZE))
    assert len(middle) == 1 and _codes(middle[0], "mri_t2") == (3, SHAPE[2] // 2)
    assert parse_nifti_slices("middle") is None and parse_nifti_slices("all") == slice(None)
    assert parse_nifti_slices("::3") == slice(None, None, 3) and parse_nifti_slices("5:") == slice(5, None, None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("every", "must be 'middle', 'all' or START:STOP"), ("1:2:3:4", "START:STOP"), ("-1:5", "non-negative"),
     ("::0", "STEP must be at least 1"), ("6:2", "START must be below STOP")],
)
def test_bad_slice_specs_name_the_parameter(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_nifti_slices(spec)
    assert "nifti_slices" in str(error.value)


def test_slices_past_the_volume_and_foreground_without_slices_are_refused(tmp_path):
    root = _subjects(tmp_path / "subjects", names=("S1",))
    with pytest.raises(ValueError, match=r"nifti_slices '0:11' reaches past the 10 slices"):
        prepare_dataset(root, layout="subjects", nifti_slices="0:11", size=SIZE)
    with pytest.raises(ValueError, match="min_foreground filters the slices of NIfTI volumes"):
        prepare_dataset(root, layout="subjects", min_foreground=0.1, size=SIZE)
    with pytest.raises(ValueError, match=r"min_foreground must be a fraction in \[0, 1\)"):
        prepare_dataset(root, layout="subjects", nifti_slices="all", min_foreground=1.5, size=SIZE)


def test_volumes_that_cannot_pair_by_index_are_refused(tmp_path):
    root = _subjects(tmp_path / "subjects", names=("S1",))
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 9), np.int16), np.eye(4)), root / "S1" / "t2w.nii.gz")
    with pytest.raises(ValueError, match="differ in shape"):
        prepare_dataset(root, layout="subjects", nifti_slices="all", size=SIZE)
    (root / "S1" / "t2w.nii.gz").unlink()
    write_png(root / "S1" / "ct.png", np.zeros((12, 12)), provenance=PROVENANCE)
    with pytest.raises(ValueError, match="mixes NIfTI volumes"):
        prepare_dataset(root, layout="subjects", nifti_slices="all", size=SIZE)


def test_foreground_threshold_ignores_ringing_below_the_background():
    volume = _volume(1, ringing=True).astype(np.float32)
    threshold = foreground_threshold(volume)
    assert 0 < threshold < 1000
    assert foreground_fraction(volume[:, :, 0], threshold) == 0.0  # ringing only: empty
    assert foreground_fraction(volume[:, :, 4], threshold) == pytest.approx(36 / 144)
    assert np.mean(volume[:, :, 0] > volume.min()) > 0.9  # what "above the minimum" would have called foreground


# ------------------------------------------------------------------------------------------ subjects layout


def test_subjects_layout_errors_name_the_problem(tmp_path):
    root = _subjects(tmp_path / "subjects", names=("S1",))
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), np.eye(4)), root / "S1" / "seg.nii.gz")
    with pytest.raises(ValueError, match=r"layout 'subjects': the file stem of S1/seg.nii.gz, 'seg' is not a known"):
        prepare_dataset(root, layout="subjects", size=SIZE)
    (root / "S1" / "seg.nii.gz").unlink()
    with pytest.raises(ValueError, match="layout 'subjects' takes patients from folder names"):
        prepare_dataset(root, tmp_path / "r.csv", layout="subjects")
    with pytest.raises(ValueError, match="with layout 'subjects' the folder is the patient"):
        prepare_dataset(root, layout="subjects", patient_regex=r"(\d+)")
    with pytest.raises(ValueError, match="layout must be one of"):
        prepare_dataset(root, layout="bids")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), np.eye(4)), root / "t1.nii.gz")
    with pytest.raises(ValueError, match="sits directly in a subject folder"):
        prepare_dataset(root, layout="subjects", size=SIZE)


def test_subjects_layout_takes_the_modality_map(tmp_path):
    root = _subjects(tmp_path / "subjects", names=("S1",))
    (root / "S1" / "t2f.nii.gz").rename(root / "S1" / "dark_fluid.nii.gz")
    rows = _rows(prepare_dataset(root, layout="subjects", size=SIZE, modality_map={"dark_fluid": "mri_flair"}))
    assert rows[0]["mri_flair"] is not None


# --------------------------------------------------------------------------------------------------- splits


def test_named_patients_override_the_hash_and_count_towards_their_share():
    ids = [f"p{i}" for i in range(10)]
    split = assign_splits(ids, validation_patients=["p3"], test_patients=["p7", "p8"])
    assert split["p3"] == "validation" and split["p7"] == split["p8"] == "test"
    counts = {name: list(split.values()).count(name) for name in ("train", "validation", "test")}
    assert counts == {"train": 7, "validation": 1, "test": 2}  # shares of 1 and 1 already filled by name
    only_named = assign_splits(ids, fractions=(1, 0, 0), validation_patients=["p0"])
    assert [p for p, s in only_named.items() if s != "train"] == ["p0"]
    assert assign_splits(ids, seed=4, validation_patients=["p1"]) == assign_splits(
        list(reversed(ids)), seed=4, validation_patients=["p1"]
    )


def test_named_patient_errors():
    ids = ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"validation_patients names 'x', which no file has; patients are \['a', 'b', 'c'\]"):
        assign_splits(ids, validation_patients=["x"])
    with pytest.raises(ValueError, match="named in both validation_patients and test_patients"):
        assign_splits(ids, validation_patients=["a"], test_patients=["a"])
    with pytest.raises(ValueError, match="fractions must be three non-negative numbers summing to 1"):
        assign_splits(ids, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="test_patients must be a list of patient ids, not the string 'ab'"):
        assign_splits(ids, test_patients="ab")


def test_prepare_holds_out_named_subjects_and_never_splits_a_patient(tmp_path):
    root = _subjects(tmp_path / "subjects")
    dataset = prepare_dataset(root, layout="subjects", nifti_slices="all", size=SIZE, fractions=(1, 0, 0),
                              validation_patients=["S2"], test_patients=["S3"])
    assert set(dataset["train"]["patient_id"]) == {"S1"}
    assert set(dataset["validation"]["patient_id"]) == {"S2"} and set(dataset["test"]["patient_id"]) == {"S3"}
    assert dataset["train"].num_rows == SHAPE[2]
    for seed in range(5):  # hash splits of many slices per patient: each patient's rows in one split only
        hashed = prepare_dataset(root, layout="subjects", nifti_slices="all", size=SIZE, seed=seed)
        splits_of = {}
        for name, split in hashed.items():
            for pid in split["patient_id"]:
                splits_of.setdefault(pid, set()).add(name)
        assert all(len(names) == 1 for names in splits_of.values())


def test_prepare_checks_named_and_excluded_patients_before_reading(tmp_path):
    root = _subjects(tmp_path / "subjects")
    with pytest.raises(ValueError, match="test_patients names 'S9', which no file has"):
        prepare_dataset(root, layout="subjects", test_patients=["S9"])
    with pytest.raises(ValueError, match="exclude_patients names 'S0'"):
        prepare_dataset(root, layout="subjects", exclude_patients=["S0"])
    with pytest.raises(ValueError, match="named in both exclude_patients and validation_patients"):
        prepare_dataset(root, layout="subjects", exclude_patients=["S1"], validation_patients=["S1"])
    with pytest.raises(ValueError, match="fractions must be three"):
        prepare_dataset(root, layout="subjects", fractions=(0.9, 0.2, 0.0))
    kept = prepare_dataset(root, layout="subjects", size=SIZE, exclude_patients=["S2"])
    assert {row["patient_id"] for row in _rows(kept)} == {"S1", "S3"}


def test_prepare_is_deterministic(tmp_path):
    root = _subjects(tmp_path / "subjects")
    a = prepare_dataset(root, layout="subjects", nifti_slices="1:9", min_foreground=0.2, size=SIZE, seed=2)
    b = prepare_dataset(root, layout="subjects", nifti_slices="1:9", min_foreground=0.2, size=SIZE, seed=2)
    for name in a:
        assert a[name].data.equals(b[name].data)


# ------------------------------------------------------------------------------ CSV: modalities, anatomy, notes


def _notes_csv(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x1.png", "x2.png", "c1.png"):
        write_png(root / name, rng.random((20, 20)), provenance=PROVENANCE)
    rows = [
        ["x1.png", "X-ray", "Case 1: frontal film on Jan 3 (1A). Right basal opacity.", "P1", "chest"],
        ["x2.png", "X-ray", "Left effusion.", "P2", ""],
        ["c1.png", "CT", "Case 1: axial CT (1B). Ground-glass opacity.", "P1", "chest"],
    ]
    with (tmp_path / "notes.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "modality", "notes", "pid", "anatomy"])
        writer.writerows(rows)
    return root, tmp_path / "notes.csv"


def test_modalities_filter_drops_samples_without_images_and_notes_are_cleaned(tmp_path):
    from medm2g_diffusers.data.datasets import CsvColumns

    root, table = _notes_csv(tmp_path)
    columns = CsvColumns(report="notes", patient_id="pid")
    dataset, info = prepare_dataset(root, table, csv_columns=columns, size=SIZE, modalities=["xray"],
                                    clean_notes=True, return_info=True)
    rows = {row["patient_id"]: row for row in _rows(dataset)}
    assert len(_rows(dataset)) == 2 and all(row["ct"] is None for row in rows.values())
    assert rows["P1"]["report"] == "frontal film. Right basal opacity."
    assert rows["P1"]["anatomy"] == "chest" and rows["P2"]["anatomy"] is None
    assert info["samples_without_kept_images"] == 1 and info["layout"] == "csv"
    assert info["clean_notes"] == {"notes": 3, "changed": 2, "emptied": 0}
    assert list(info["intensity"]) == ["xray"]
    with pytest.raises(ValueError, match="modalities must be image modality keys"):
        prepare_dataset(root, table, csv_columns=columns, modalities=["text"])
    with pytest.raises(ValueError, match="is left with an image of modalities"):
        prepare_dataset(root, table, csv_columns=columns, modalities=["mri_t1"])


@pytest.mark.parametrize(
    ("note", "cleaned"),
    [
        # 1. URLs and DOIs
        ("Basal opacity, see https://example.org/a?b=1. No effusion.", "Basal opacity. No effusion."),
        ("Hazy lungs (doi:10.9999/xyz.12). Heart normal.", "Hazy lungs. Heart normal."),
        ("Nodule at www.example.com/case, and 10.1234/abc-5 in the apex.", "Nodule, and in the apex."),
        # 2. courtesy lines
        ("Large effusion. Image courtesy of Dr Q and colleagues. Tube in place.", "Large effusion. Tube in place."),
        # 3. web-page headings
        ("Presentation: Cough.. Imaging Notes: Patchy opacity. Discussion: Viral.", "Cough. Patchy opacity. Viral."),
        # 4. case numbering as a label, not as a subject
        ("Case 12: dense consolidation.", "dense consolidation."),
        ("Patient 3 - CXR: clear lungs.", "CXR: clear lungs."),
        ("Case 2 was the sister of Case 1.", "Case 2 was the sister of Case 1."),
        # 5. figure and panel references
        ("(A) Film shows nodules (Fig. 4b). (B, C) CT confirms them (see Figures 2 and 3).",
         "Film shows nodules. CT confirms them."),
        ("Opacity (3A) at the base; Figure 5 shows more.", "Opacity at the base; shows more."),
        ("Fever (39) with cough (a) dry (b) productive.", "Fever (39) with cough (a) dry (b) productive."),
        # 6. annotation marks
        ("Cavity (white arrowheads) and nodule (asterisk).", "Cavity and nodule."),
        # 7. dates, with their lead-in words; relative times stay
        ("Film obtained on Feb 2 showed opacity; on 14/02/2021 it cleared.", "Film obtained showed opacity; it cleared."),
        ("Travel from March 8 to 12, onset 2021-03-14 (April 3). Day 3: worse; 4 days later better.",
         "Travel, onset. Day 3: worse; 4 days later better."),
        ("In May 2021 a 40-year-old had fever.", "a 40-year-old had fever."),
        # 8. tidying
        ("  Opacity  ,  .  Effusion  ;  ", "Opacity. Effusion;"),
    ],
)
def test_clean_clinical_note_rules(note, cleaned):
    assert clean_clinical_note(note) == cleaned


def test_clean_clinical_note_returns_none_when_nothing_is_left():
    assert clean_clinical_note("Case 4: (2A) Figure 3. Image courtesy of the authors.") is None
    assert clean_clinical_note(None) is None


# ------------------------------------------------------------------------------- prepare_info.json and the CLI


def test_save_dataset_writes_the_info_atomically(tmp_path):
    root = _subjects(tmp_path / "subjects", names=("S1",))
    dataset, info = prepare_dataset(root, layout="subjects", size=SIZE, return_info=True)
    save_dataset(dataset, tmp_path / "out", info=info)
    assert json.loads((tmp_path / "out" / PREPARE_INFO).read_text()) == json.loads(json.dumps(info))
    assert load_medm2g_dataset(tmp_path / "out")["train"].num_rows == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_prepare_command_records_arguments_and_ct_convention(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for folder in ("CT", "MRI"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        for name in ("1001", "1002", "2001", "3001"):
            write_png(tmp_path / "in" / folder / f"{name}.png", rng.random((16, 16)), provenance=PROVENANCE)
    argv = ["prepare", "--images", str(tmp_path / "in"), "--modality-map", "MRI=mri_t2", "--patient-regex",
            r"^(\d)\d{3}$", "--png-ct-window=-1000,2000", "--validation-patients", "2", "--test-patients", "3",
            "--split-fractions", "1,0,0", "--remark", "made up", "--size", "16", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    info = json.loads((tmp_path / "out" / PREPARE_INFO).read_text())
    assert info["arguments"]["png_ct_window"] == [-1000.0, 2000.0] and info["remarks"] == ["made up"]
    assert info["intensity"]["ct"] == [
        "png: a grey value g in [0, 1] (8-bit v: g = v/255) stands for -1000 + g * 3000 HU (png_ct_window [-1000, 2000])"
    ]
    assert {name: split["patients"] for name, split in info["splits"].items()} == {
        "train": ["1"], "validation": ["2"], "test": ["3"]
    }
    with pytest.raises(SystemExit):
        main([*argv[:-1], str(tmp_path / "other"), "--split-fractions", "0.5,0.5,0.5"])
    assert "--split-fractions: expected three non-negative numbers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real data

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "brain-mri-multicontrast").is_dir(),
                                  reason="../shared/data is not present")


@needs_shared
def test_real_brats_subjects_give_paired_slices_and_the_explicit_split():
    dataset, info = prepare_dataset(
        SHARED_DATA / "brain-mri-multicontrast", layout="subjects", nifti_slices="0:155:2", min_foreground=0.1,
        size=32, fractions=(1, 0, 0), validation_patients=["TCGA-DU-7294"], return_info=True,
    )
    assert set(dataset["train"]["patient_id"]) == {"BraTS-GLI-00001-000"}
    assert set(dataset["validation"]["patient_id"]) == {"TCGA-DU-7294"} and dataset["test"].num_rows == 0
    assert 40 <= dataset["train"].num_rows <= 70 and 40 <= dataset["validation"].num_rows <= 70
    for split in ("train", "validation"):
        for key in ("mri_t1", "mri_t1c", "mri_t2", "mri_flair"):
            images = np.asarray(dataset[split].with_format("numpy")[key])
            assert images.shape == (dataset[split].num_rows, 32, 32)
            assert (images.max(axis=(1, 2)) > 0).all()  # every kept slice has signal in every contrast
    assert info["nifti"]["rows_columns_axis_codes"] == ["LP"]  # stored order, axial slices (S), no reorientation


def test_synthrad_captions_come_from_file_names(tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "real_data" / "synthrad_captions.py"
    spec = importlib.util.spec_from_file_location("synthrad_captions", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("GT_1BA001-010.png", "GT_1BA001-011.png", "GT_1BA001-012.png", "GT_1PC002-005.png"):
        write_png(tmp_path / name, np.zeros((8, 8)), provenance=PROVENANCE)
    assert _caption_tuples(module, tmp_path, every=2) == [
        ("GT_1BA001-010.png", "1BA001", "head", "Axial CT slice of the brain."),
        ("GT_1BA001-012.png", "1BA001", "head", "Axial CT slice of the brain."),
        ("GT_1PC002-005.png", "1PC002", "pelvis", "Axial CT slice of the pelvis."),
    ]
    assert module.main(["--images", str(tmp_path), "--out", str(tmp_path / "c.csv")]) == 0
    dataset = prepare_dataset(tmp_path, tmp_path / "c.csv", size=SIZE)
    assert {row["anatomy"] for row in _rows(dataset)} == {"head", "pelvis"}
    write_png(tmp_path / "scan.png", np.zeros((8, 8)), provenance=PROVENANCE)
    with pytest.raises(ValueError, match="scan.png is not named GT_"):
        module.caption_rows(tmp_path)


def _caption_tuples(module, images, every):
    return [(r["file"], r["patient_id"], r["anatomy"], r["report"]) for r in module.caption_rows(images, every)]
