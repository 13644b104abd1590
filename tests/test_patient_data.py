"""Patient identifiers in an input DICOM never reach an output file, a log line, the console or the demo page.

A CT and an MR DICOM full of identifiers (name, ID, birth date, accession number, institution, physician,
address) go through every command that reads images (``generate`` to PNG/DICOM/NIfTI and to a report,
``prepare``, ``verify``) and through every upload tab of the demo. Every byte of every file written, everything
printed and every log record is searched for each identifier.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from tiny_pipeline import get_dummy_components

from medm2g_diffusers import MedM2GPipeline
from medm2g_diffusers.cli import main

IDENTIFIERS = {
    "PatientName": "DOE^JANE^QUINTESSA",
    "PatientID": "MRN-4417-2291",
    "OtherPatientIDs": "ALT-ID-99812",
    "PatientBirthDate": "19470312",
    "AccessionNumber": "ACC55821X",
    "InstitutionName": "Saint Elsewhere General Hospital",
    "InstitutionAddress": "12 Elmwood Street, Springfield",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "PatientAddress": "77 Larkspur Lane, Shelbyville",
    "StudyID": "STUDY-31337",
    "StudyDescription": "CT HEAD FOR QUINTESSA DOE",
}
# Each identifier and its parts, as they could appear reformatted (DOE^JANE -> "Doe, Jane"; 19470312 -> 1947-03-12).
NEEDLES = sorted(
    {part.lower() for value in IDENTIFIERS.values() for part in [value, *value.replace("^", " ").replace(",", " ").split()] if len(part) >= 4}
    - {"street", "lane", "general", "hospital", "head", "saint"}
    | {"1947-03-12", "quintessa"}
)


def phi_dicom(path: Path, modality: str) -> Path:
    """A 64x64 CT (HU) or MR slice whose header is full of identifiers."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage if modality == "CT" else pydicom.uid.MRImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    yy, xx = np.mgrid[-1:1:64j, -1:1:64j]
    head = (xx**2 + yy**2 < 0.8).astype(np.float32)
    if modality == "CT":
        values = np.where(head > 0, 40.0, -1000.0) + 1024.0  # HU, stored with intercept -1024
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    else:
        values = head * 800.0
    ds.set_pixel_data(values.astype(np.uint16), photometric_interpretation="MONOCHROME2", bits_stored=16)
    ds.PixelSpacing = [1, 1]
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


# Loggers that could see an input file: ours, the demo's, the web stack's and the DICOM reader's, at DEBUG.
# (Not the root logger: libraries such as transformers and nibabel bind StreamHandlers to whatever stderr
# was when they were first imported, which under pytest may be an already closed capture file.)
LOGGERS = ("medm2g_diffusers", "medm2g", "gradio", "gradio_client", "uvicorn", "httpx", "httpcore", "pydicom")


def capture_logs(caplog) -> None:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [needle for needle in NEEDLES if needle in lowered]


def leaks_in_tree(root: Path, skip: set[Path] = frozenset()) -> dict[str, list[str]]:
    """Identifiers found in the bytes of any file under ``root`` (binary files searched as Latin-1 text)."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p not in skip):
        hits = leaks(path.read_bytes().decode("latin-1")) + leaks(path.read_bytes().decode("utf-8", "ignore"))
        if hits:
            found[str(path.relative_to(root))] = sorted(set(hits))
    return found


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("phi") / "tiny-pipeline"
    MedM2GPipeline(**get_dummy_components()).save_pretrained(path)
    return path


@pytest.fixture()
def inputs(tmp_path) -> Path:
    folder = tmp_path / "inputs"
    (folder / "ct").mkdir(parents=True)
    (folder / "mri_t2").mkdir()
    phi_dicom(folder / "ct" / "case1.dcm", "CT")
    phi_dicom(folder / "mri_t2" / "case1.dcm", "MR")
    return folder


def test_the_fixture_really_holds_identifiers(inputs):
    """The search would find them: the input itself is full of them (so an empty result below means something)."""
    assert len(leaks_in_tree(inputs)["ct/case1.dcm"]) >= 8


@pytest.mark.parametrize(
    "condition, targets, fmt",
    [("ct", ["xray"], "dicom"), ("ct", ["xray"], "png"), ("mri_t2", ["ct"], "nifti"), ("ct", ["text"], "png")],
)
def test_generate_leaks_no_identifier(model_dir, inputs, tmp_path, capsys, caplog, condition, targets, fmt):
    capture_logs(caplog)
    out = tmp_path / "out"
    code = main(["generate", "--model", str(model_dir), "--condition", f"{condition}={inputs / condition / 'case1.dcm'}",
                 "--targets", *targets, "--steps", "2", "--format", fmt, "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert any(out.iterdir())
    assert leaks_in_tree(out) == {}
    assert leaks(printed.out + printed.err) == []
    assert leaks("\n".join(record.getMessage() for record in caplog.records)) == []


def test_prepare_leaks_no_identifier(inputs, tmp_path, capsys, caplog):
    capture_logs(caplog)
    out = tmp_path / "dataset"
    assert main(["prepare", "--images", str(inputs), "--size", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert any(out.rglob("*.arrow"))
    assert leaks_in_tree(out) == {}
    assert leaks(printed.out + printed.err) == []
    assert leaks("\n".join(record.getMessage() for record in caplog.records)) == []


def test_verify_leaks_no_identifier(inputs, capsys):
    assert main(["verify", "--json", str(inputs / "ct" / "case1.dcm")]) == 1
    printed = capsys.readouterr()
    assert "no MedM2G provenance" not in printed.out  # --json form
    assert leaks(printed.out + printed.err) == []


DEMO_SCRIPT = """
import json, logging, sys
sys.path.insert(0, {tests!r})
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # every library's log records, at DEBUG
from free_port import free_port
from gradio_client import Client, handle_file
from space_app import load_app
from tiny_pipeline import get_dummy_components
from medm2g_diffusers import MedM2GPipeline

app = load_app()
demo = app.build_demo(MedM2GPipeline(**get_dummy_components()), model_name="tiny-test", examples_dir={examples!r})
_, url, _ = app.launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=False)
client = Client(url, verbose=True, download_files={downloads!r})
ct, t2 = handle_file({ct!r}), handle_file({t2!r})
results = [
    client.predict(ct, "ct", 2, 2.0, 1, api_name="/image_to_report"),
    client.predict(t2, "mri_t2", 2, 2.0, 1, api_name="/mri_to_ct"),
    client.predict(ct, 2, 2.0, 1, api_name="/ct_to_xray"),
    client.predict("mri_t1", None, t2, None, None, 2, 2.0, 1, api_name="/mri_synthesis"),
]
demo.close()
print(json.dumps(results, default=repr))
"""


def test_demo_leaks_no_identifier(inputs, tmp_path):
    """The demo in its own process (its server threads log and print freely there), with every logger at DEBUG."""
    pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
    script = DEMO_SCRIPT.format(tests=str(Path(__file__).parent), examples=str(tmp_path / "examples"),
                                downloads=str(tmp_path / "downloads"), ct=str(inputs / "ct" / "case1.dcm"),
                                t2=str(inputs / "mri_t2" / "case1.dcm"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = run.stdout.strip().splitlines()[-1]  # everything the page shows: report text, captions, status, file names
    assert "synthetic" in results.lower() and leaks(results) == []
    assert any((tmp_path / "downloads").rglob("*.dcm"))
    assert leaks_in_tree(tmp_path / "downloads") == {}
    assert "DEBUG" in run.stderr  # the logs were really on
    assert leaks(run.stdout + run.stderr) == []
