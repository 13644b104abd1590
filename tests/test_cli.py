import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import load_from_disk

from medm2g_diffusers.cli import main
from medm2g_diffusers.data.io import read_provenance, write_png
from medm2g_diffusers.modalities import image_modality_keys

CANONICAL = ["patient_id", "anatomy", "report", "findings", *image_modality_keys()]


def _same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def _run_phantoms(out: Path, n: int) -> None:
    assert main(["phantoms", "--n", str(n), "--seed", "1", "--size", "32", "--out", str(out)]) == 0


def test_phantoms_command_writes_splits_and_preview_identically(tmp_path):
    _run_phantoms(tmp_path / "a", 24)
    _run_phantoms(tmp_path / "b", 24)
    dataset = load_from_disk(str(tmp_path / "a"))
    assert set(dataset) == {"train", "validation", "test"}
    assert all(split.column_names == CANONICAL for split in dataset.values())
    assert sum(split.num_rows for split in dataset.values()) == 24
    provenance = read_provenance(tmp_path / "a" / "preview.png")
    assert provenance is not None and str(provenance.get("synthetic")).lower() == "true"
    assert _same_tree(tmp_path / "a", tmp_path / "b")


def test_phantoms_command_refuses_to_overwrite(tmp_path, capsys):
    _run_phantoms(tmp_path / "a", 8)
    assert main(["phantoms", "--n", "8", "--out", str(tmp_path / "a")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["phantoms", "--n", "0", "--out", str(tmp_path / "x")])
    assert error.value.code == 2
    assert "positive integer" in capsys.readouterr().err
    assert main(["phantoms", "--n", "4", "--size", "30", "--out", str(tmp_path / "y")]) == 2
    assert "size" in capsys.readouterr().err


def test_prepare_command(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for folder in ("CT", "T1"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        for index in range(4):
            write_png(tmp_path / "in" / folder / f"s{index}.png", rng.random((16, 16)), provenance={"model": "test"})
    code = main(["prepare", "--images", str(tmp_path / "in"), "--size", "16", "--out", str(tmp_path / "out")])
    assert code == 0
    dataset = load_from_disk(str(tmp_path / "out"))
    rows = [row for split in dataset.values() for row in split]
    assert len(rows) == 4 and all(row["mri_t1"] is not None and row["ct"] is not None for row in rows)
    assert main(["prepare", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "images must be an existing directory" in capsys.readouterr().err


def test_console_entry_point_is_installed():
    result = subprocess.run([Path(sys.executable).parent / "medm2g", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "phantoms" in result.stdout and "prepare" in result.stdout


@pytest.mark.slow
def test_phantoms_200_as_in_the_issue(tmp_path):
    for name in ("a", "b"):
        assert main(["phantoms", "--n", "200", "--seed", "1", "--out", str(tmp_path / name)]) == 0
    assert _same_tree(tmp_path / "a", tmp_path / "b")


# ------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from medm2g_diffusers import MedM2GPipeline
    from tiny_pipeline import get_dummy_components

    path = tmp_path_factory.mktemp("pipe") / "model"
    MedM2GPipeline(**get_dummy_components()).save_pretrained(path)
    return path


def test_generate_text_to_images_in_every_format(tiny_pipeline_dir, tmp_path, capsys):
    from medm2g_diffusers.data.io import read_image, read_provenance

    for fmt, suffix in (("png", ".png"), ("dicom", ".dcm"), ("nifti", ".nii.gz")):
        out = tmp_path / fmt
        code = main(["generate", "--model", str(tiny_pipeline_dir), "--prompt", "Small left pleural effusion.",
                     "--targets", "xray", "ct", "--steps", "2", "--format", fmt, "--out", str(out)])
        assert code == 0
        for target in ("xray", "ct"):
            path = out / f"{target}_0{suffix}"
            record = read_provenance(path)
            assert record["synthetic"] is True and record["modality"] == target and record["seed"] == 0
            assert read_image(path).array.shape == (32, 32)
    assert "generated xray, ct in" in capsys.readouterr().out


def test_generate_from_condition_files(tiny_pipeline_dir, tmp_path, capsys):
    from medm2g_diffusers.data.io import write_dicom, write_nifti
    from medm2g_diffusers.data.phantoms import PhantomGenerator

    patient = PhantomGenerator(seed=0, size=64).patient(0, anatomy="chest")
    write_dicom(tmp_path / "ct.dcm", patient.images["ct"], modality="ct", provenance={"model": "phantom"})
    write_nifti(tmp_path / "t2.nii.gz", patient.images["mri_t2"], provenance={"model": "phantom"})
    code = main(["generate", "--model", str(tiny_pipeline_dir), "--condition", f"ct={tmp_path / 'ct.dcm'}",
                 "--targets", "text", "--steps", "2", "--out", str(tmp_path / "report")])
    assert code == 0 and (tmp_path / "report" / "report_0.txt").read_text().startswith("SYNTHETIC REPORT")
    assert json.loads((tmp_path / "report" / "report_0.json").read_text())["provenance"]["synthetic"] is True
    assert "resizing ct" in capsys.readouterr().out  # 64 px files for a 32 px model: said, not silent
    code = main(["generate", "--model", str(tiny_pipeline_dir), "--condition", f"mri_t2={tmp_path / 't2.nii.gz'}",
                 "--condition", f"mri_t1={tmp_path / 't2.nii.gz'}", "--targets", "ct", "--steps", "2", "--out", str(tmp_path / "ct")])
    assert code == 0 and (tmp_path / "ct" / "ct_0.png").is_file()


def test_generate_errors_are_one_line(tiny_pipeline_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_pipeline_dir), "--targets", "pet", "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "targets must be one of" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "--targets", "xray", "--prompt", "x"]) == 2
    assert "--model must be a bundled checkpoint" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_pipeline_dir), "--targets", "ct", "--condition", f"xray={tmp_path / 'none.png'}"]) == 2
    assert "none.png" in capsys.readouterr().err


def test_generate_with_another_scheduler(tiny_pipeline_dir, tmp_path):
    from medm2g_diffusers.data.io import read_provenance

    code = main(["generate", "--model", str(tiny_pipeline_dir), "--prompt", "Small left pleural effusion.", "--targets", "xray",
                 "--steps", "3", "--scheduler", "dpmsolver++", "--timestep-spacing", "trailing", "--out", str(tmp_path)])
    assert code == 0
    assert read_provenance(tmp_path / "xray_0.png")["scheduler"] == "DPMSolverMultistepScheduler"
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_pipeline_dir), "--prompt", "x", "--targets", "xray", "--scheduler", "plms"])
