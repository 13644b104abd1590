"""``medm2g verify``: exit 0 for a file with MedM2G provenance (and which model), 1 without; pixel edits show."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from medm2g_diffusers.cli import main
from medm2g_diffusers.data.io import pixels_unchanged, tag_synthetic, write_dicom, write_nifti, write_png

PROVENANCE = {"model": "medm2g-tiny", "seed": 3}
IMAGE = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)


@pytest.fixture()
def files(tmp_path):
    write_png(tmp_path / "a.png", IMAGE, provenance=PROVENANCE)
    write_png(tmp_path / "a16.png", IMAGE, provenance=PROVENANCE, bit_depth=16)
    write_dicom(tmp_path / "ct.dcm", IMAGE * 2000 - 1000, modality="ct", provenance=PROVENANCE)
    write_dicom(tmp_path / "t2.dcm", IMAGE, modality="mri_t2", provenance=PROVENANCE)
    write_nifti(tmp_path / "v.nii.gz", IMAGE * 100, provenance=PROVENANCE)
    tag_synthetic(Image.fromarray(np.uint8(IMAGE * 255)), PROVENANCE).save(tmp_path / "pil.png")
    return {path.name: path for path in tmp_path.iterdir()}


def test_files_we_write_verify_with_their_model(files, capsys):
    assert main(["verify", *map(str, files.values())]) == 0
    out = capsys.readouterr().out
    assert out.count("SYNTHETIC, MedM2G provenance: model medm2g-tiny") == len(files)
    assert out.count("pixels unchanged since generation") == len(files)
    for path in files.values():
        assert pixels_unchanged(path) is True


def test_a_file_without_provenance_exits_1(files, tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.fromarray(np.uint8(IMAGE * 255)).save(plain)
    assert main(["verify", str(plain)]) == 1
    assert "no MedM2G provenance" in capsys.readouterr().out
    assert main(["verify", str(files["a.png"]), str(plain)]) == 1  # one unmarked file fails the lot
    assert main(["verify", str(tmp_path / "missing.png")]) == 2


def test_edited_pixels_are_reported_and_fail_strict(files, capsys):
    with Image.open(files["a.png"]) as image:
        image.load()
        edited = image.copy()
        info = image.info
    edited.putpixel((3, 4), 255 - edited.getpixel((3, 4)))
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    for key, value in info.items():
        if isinstance(value, str):
            chunks.add_text(key, value)
    edited.save(files["a.png"], pnginfo=chunks)  # same metadata, one pixel changed
    ds = pydicom.dcmread(files["ct.dcm"])
    pixels = ds.pixel_array.copy()
    pixels[0, 0] += 100
    ds.PixelData = pixels.tobytes()
    ds.save_as(files["ct.dcm"])
    assert pixels_unchanged(files["a.png"]) is False and pixels_unchanged(files["ct.dcm"]) is False
    assert main(["verify", str(files["a.png"]), str(files["ct.dcm"])]) == 0  # still carries provenance
    assert capsys.readouterr().out.count("PIXELS CHANGED after generation") == 2
    assert main(["verify", "--strict", str(files["a.png"])]) == 1


def test_json_output_and_stripped_private_tags(files, capsys):
    ds = pydicom.dcmread(files["t2.dcm"])
    ds.remove_private_tags()  # what de-identification tools do
    ds.save_as(files["t2.dcm"])
    assert main(["verify", "--json", str(files["t2.dcm"]), str(files["v.nii.gz"])]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["synthetic"] is True and rows[0]["model"] is None and rows[0]["pixels_unchanged"] is None
    assert rows[1]["model"] == "medm2g-tiny" and rows[1]["provenance"]["seed"] == 3 and rows[1]["pixels_unchanged"] is True
