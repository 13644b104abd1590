"""Fuzzing of the image readers (`medm2g_diffusers.data.io`): a bounded run of
`scripts/reliability/fuzz_readers.py`, hostile headers that declare enormous images, and regression tests
for what the fuzzer found.

Everything here is synthetic (our writers plus byte patches), so no data folder is needed. The full run
(10,000+ cases) is `OMP_NUM_THREADS=1 .venv/bin/python scripts/reliability/fuzz_readers.py --out fuzz.json`.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medm2g_diffusers.data.io import (
    MAX_SIDE,
    MedicalImageError,
    read_image,
    read_provenance,
    read_volume,
    write_dicom,
    write_nifti,
    write_png,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reliability" / "fuzz_readers.py"
PEAK_BOUND = 16 * 2**20  # bytes traced while refusing a hostile file; a decoded image would need GBs


def load_fuzzer():
    if "fuzz_readers" in sys.modules:
        return sys.modules["fuzz_readers"]
    spec = importlib.util.spec_from_file_location("fuzz_readers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_readers"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def refused_within_bound(read, path: Path, match: str | None = None) -> float:
    """`read(path)` raises MedicalImageError naming the file; returns the peak traced MiB while it ran."""
    tracemalloc.start()
    try:
        with pytest.raises(MedicalImageError) as info:
            read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    assert peak < PEAK_BOUND, f"{peak / 2**20:.1f} MiB traced while refusing {path.name}: {info.value}"
    return peak / 2**20


# --------------------------------------------------------------------------------------------------
# The bounded fuzz run (the default suite's share of scripts/reliability/fuzz_readers.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120, method="thread")
def test_bounded_fuzz_run_finds_no_crash_hang_or_allocation():
    fuzzer = load_fuzzer()
    summary = fuzzer.fuzz(cases=300, seed=0, timeout=5.0, memory_bound_mb=64.0, real_data=None)
    assert summary["failures"] == 0, json.dumps(summary["findings"], indent=1)[:4000]
    totals = summary["totals"]
    assert totals["cases"] == 300
    assert totals["array"] + totals["medical_image_error"] == 300
    # Every format was exercised and both outcomes occur (the mutations are neither all fatal nor all no-ops).
    assert set(summary["per_format"]) == {"dicom", "nifti", "png", "jpeg", "junk"}
    assert totals["array"] > 30 and totals["medical_image_error"] > 100
    assert summary["hostile_huge_dimension_cases"]["cases"] > 10
    assert summary["hostile_huge_dimension_cases"]["array"] == 0
    assert summary["max_peak_traced_mb"] < 64 and summary["max_case_seconds"] < 5


def test_fuzz_cases_are_reproducible(tmp_path):
    fuzzer = load_fuzzer()
    seeds, again = {}, {}
    for seed in fuzzer.synthetic_seeds(tmp_path):
        seeds.setdefault(seed.fmt, []).append(seed)
    for seed in fuzzer.synthetic_seeds(tmp_path):
        again.setdefault(seed.fmt, []).append(seed)
    assert {k: [s.data for s in v] for k, v in seeds.items()} == {k: [s.data for s in v] for k, v in again.items()}
    for index in (0, 7, 123):
        a, b = fuzzer.make_case(index, 5, seeds), fuzzer.make_case(index, 5, again)
        assert (a.data, a.mutations, a.operation) == (b.data, b.mutations, b.operation)


def test_fuzzer_command_line_writes_summary(tmp_path):
    fuzzer = load_fuzzer()
    out = tmp_path / "fuzz.json"
    assert fuzzer.main(["--cases", "20", "--seed", "3", "--no-real-data", "--quiet", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["cases"] == 20 and summary["failures"] == 0 and summary["seed"] == 3


# --------------------------------------------------------------------------------------------------
# Hostile headers: enormous declared dimensions are refused before any pixel buffer exists
# --------------------------------------------------------------------------------------------------


def small_dicom(path: Path) -> bytes:
    write_dicom(path, np.full((4, 4), 0.5), modality="xray", provenance={})
    return path.read_bytes()


def dicom_with(path: Path, **attributes) -> Path:
    small_dicom(path)
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


@pytest.mark.parametrize(
    "attributes",
    [
        {"Rows": 65535, "Columns": 65535},
        {"Rows": MAX_SIDE + 1},
        {"NumberOfFrames": "2147483647"},
        {"Rows": MAX_SIDE, "Columns": MAX_SIDE, "NumberOfFrames": "2"},  # each side allowed, the product is not
    ],
    ids=["65535x65535", "rows-over-limit", "2^31-frames", "voxel-product"],
)
@pytest.mark.parametrize("read", [read_image, read_volume], ids=["read_image", "read_volume"])
def test_hostile_dicom_dimensions_are_refused_before_allocation(tmp_path, attributes, read):
    path = dicom_with(tmp_path / "hostile.dcm", **attributes)
    refused_within_bound(read, path, "declares")


def nifti1_with_dims(path: Path, dims: tuple[int, ...], gz: bool = False) -> Path:
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    raw = bytearray(header.binaryblock + b"\x00" * 4 + np.zeros(8, np.float32).tobytes())
    struct.pack_into("<8h", raw, 40, len(dims), *dims, *[1] * (7 - len(dims)))
    struct.pack_into("<f", raw, 108, 352.0)  # vox_offset
    path.write_bytes(gzip.compress(bytes(raw), mtime=0) if gz else bytes(raw))
    return path


def nifti2_with_dims(path: Path, dims: tuple[int, ...]) -> Path:
    raw = bytearray(nib.Nifti2Image(np.zeros((2, 2, 2), np.float32), np.eye(4)).to_bytes())
    struct.pack_into("<8q", raw, 16, len(dims), *dims, *[1] * (7 - len(dims)))
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("n1.nii", lambda p: nifti1_with_dims(p, (32767, 32767, 32767))),
        ("n1.nii.gz", lambda p: nifti1_with_dims(p, (MAX_SIDE + 1, 2, 2), gz=True)),
        ("n1_4d.nii", lambda p: nifti1_with_dims(p, (4096, 4096, 4096, 4096))),  # sides allowed, product not
        ("n2.nii", lambda p: nifti2_with_dims(p, (2**40, 2**40, 1))),
        ("n2_max.nii", lambda p: nifti2_with_dims(p, (2**62, 3, 3))),
    ],
)
@pytest.mark.parametrize("read", [read_image, read_volume], ids=["read_image", "read_volume"])
def test_hostile_nifti_dimensions_are_refused_before_allocation(tmp_path, name, make, read):
    refused_within_bound(read, make(tmp_path / name), "declares")


def png_with_size(path: Path, width: int, height: int, mode: str = "L") -> Path:
    """A valid small PNG whose IHDR (with a correct CRC) then claims width x height."""
    Image.new(mode, (4, 4)).save(path)
    raw = bytearray(path.read_bytes())
    struct.pack_into(">II", raw, 16, width, height)
    struct.pack_into(">I", raw, 29, zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    ("width", "height"),
    [(2**31 - 1, 1), (100_000, 100_000), (MAX_SIDE + 1, 2), (2, MAX_SIDE + 1), (2**32 - 1, 2**32 - 1)],
)
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_hostile_png_dimensions_are_refused_before_allocation(tmp_path, width, height, mode):
    path = png_with_size(tmp_path / "hostile.png", width, height, mode)
    refused_within_bound(read_image, path)


def jpeg_with_size(path: Path, width: int, height: int) -> Path:
    Image.new("L", (8, 8), 128).save(path, format="JPEG")
    raw = bytearray(path.read_bytes())
    sof = raw.index(b"\xff\xc0")
    struct.pack_into(">HH", raw, sof + 5, height, width)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(("width", "height"), [(65535, 65535), (MAX_SIDE + 1, 8), (8, 20000)])
def test_hostile_jpeg_dimensions_are_refused_before_allocation(tmp_path, width, height):
    refused_within_bound(read_image, jpeg_with_size(tmp_path / "hostile.jpg", width, height))


@pytest.mark.parametrize(
    ("name", "make", "read"),
    [
        # Sizes within the limits, but the file holds a few bytes: refused from the file length or the
        # decoder, never by first allocating the declared image.
        ("big.dcm", lambda p: dicom_with(p, Rows=MAX_SIDE, Columns=MAX_SIDE), read_image),
        ("big_frames.dcm", lambda p: dicom_with(p, NumberOfFrames="1000"), read_volume),
        ("big.nii", lambda p: nifti1_with_dims(p, (MAX_SIDE, MAX_SIDE, 1)), read_image),
        ("big.nii.gz", lambda p: nifti1_with_dims(p, (4096, 4096, 16), gz=True), read_volume),
        ("big.png", lambda p: png_with_size(p, MAX_SIDE, MAX_SIDE), read_image),
        ("big9000.png", lambda p: png_with_size(p, 9000, 9000, "RGB"), read_image),
    ],
)
def test_large_declared_images_without_their_pixels_are_refused_cheaply(tmp_path, name, make, read):
    refused_within_bound(read, make(tmp_path / name))


# --------------------------------------------------------------------------------------------------
# Regressions: crashes and allocations the fuzzer found (fixed in data/io.py)
# --------------------------------------------------------------------------------------------------


def peak_traced(read, path: Path) -> float:
    """Peak traced bytes of `read(path)`, which may return or raise MedicalImageError (nothing else)."""
    tracemalloc.start()
    try:
        try:
            read(path)
        except MedicalImageError as e:
            assert str(path) in str(e)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("element", "refused"),
    [
        (b"\xe0\x7f\x10\x00OW\x00\x00", False),  # Pixel Data, the last element: its bytes are all there
        (b"\x11\x00\x01\x10UT\x00\x00", True),  # our provenance (UT): swallows the rest, Pixel Data is lost
    ],
    ids=["pixel-data", "provenance-ut"],
)
def test_dicom_element_length_beyond_the_file_does_not_allocate_it(tmp_path, element, refused):
    """A corrupt 4-byte element length made pydicom's `read(length)` allocate up to 4 GiB before reading."""
    path = tmp_path / "length.dcm"
    raw = bytearray(small_dicom(path))
    at = raw.index(element)  # explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length
    struct.pack_into("<I", raw, at + 8, 0xFFFFFFF0)
    path.write_bytes(bytes(raw))
    for read in (read_image, read_volume, read_provenance):
        assert peak_traced(read, path) < PEAK_BOUND, read.__name__
    if refused:
        with pytest.raises(MedicalImageError, match=r"length\.dcm has no pixel data"):
            read_image(path)
    else:
        assert read_image(path).array.shape == (4, 4)


def test_dicom_surplus_pixel_data_is_not_read_as_extra_frames_or_colour(tmp_path):
    """Rows=1 on an 8 x 12 int16 image: pydicom returned (8, 1, 12), which read as an RGB image ('unit' < 0);
    a colour image with Columns=1 came back as a 5-D volume."""
    grey = dicom_with(tmp_path / "grey.dcm", Rows=1)
    for read in (read_image, read_volume):
        with pytest.raises(MedicalImageError, match=r"grey\.dcm: decoded pixel data has shape .* declares \(1, 4\)"):
            read(grey)
    ds = pydicom.dcmread(grey)
    ds.Rows = 4
    ds.PixelData = ds.PixelData * 2  # twice the bytes the header declares
    ds.save_as(tmp_path / "double.dcm")
    with pytest.raises(MedicalImageError, match="declares"):
        read_volume(tmp_path / "double.dcm")


def test_dicom_empty_transfer_syntax_is_a_medical_image_error(tmp_path):
    """An empty Transfer Syntax UID raised AttributeError ('str' object has no attribute 'name')."""
    path = tmp_path / "syntax.dcm"
    small_dicom(path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    path.write_bytes(buffer.getvalue())
    for read in (read_image, read_volume):
        with pytest.raises(MedicalImageError, match=r"syntax\.dcm"):
            read(path)


def nifti_with_extension_size(path: Path, esize: int, vox_offset: float | None = None, gz: bool = False) -> Path:
    write_nifti(path.with_suffix(".tmp.nii"), np.zeros((2, 2, 2)), provenance={"k": "v"})
    raw = bytearray(path.with_suffix(".tmp.nii").read_bytes())
    path.with_suffix(".tmp.nii").unlink()
    assert raw[348] == 1  # our writer stores the provenance as an extension
    struct.pack_into("<i", raw, 352, esize)
    if vox_offset is not None:
        struct.pack_into("<f", raw, 108, vox_offset)
    path.write_bytes(gzip.compress(bytes(raw), mtime=0) if gz else bytes(raw))
    return path


@pytest.mark.parametrize(
    ("name", "esize", "vox_offset", "gz"),
    [
        ("ext.nii", 2**31 - 16, None, False),
        ("ext.nii.gz", 2**30, None, True),
        ("ext_vox0.nii", 2**31 - 16, 0.0, False),  # vox_offset 0: nibabel reads extensions to the end of the file
        ("ext_vox0.nii.gz", 2**31 - 16, 0.0, True),
    ],
)
@pytest.mark.parametrize("read", [read_image, read_volume, read_provenance], ids=["image", "volume", "provenance"])
def test_nifti_extension_size_beyond_the_file_does_not_allocate_it(tmp_path, name, esize, vox_offset, gz, read):
    """nibabel's `read(esize - 8)` allocated up to 2 GiB before noticing the file is shorter."""
    path = nifti_with_extension_size(tmp_path / name, esize, vox_offset, gz)
    refused_within_bound(read, path, "extension")


def test_nifti_with_valid_extensions_still_reads(tmp_path):
    path = tmp_path / "ok.nii.gz"
    write_nifti(path, np.arange(8.0).reshape(2, 2, 2), provenance={"model": "m"})
    assert read_provenance(path)["model"] == "m"
    np.testing.assert_array_equal(read_image(path).array, np.arange(8.0).reshape(2, 2, 2)[:, :, 1])


def test_nifti_non_finite_affine_is_a_medical_image_error(tmp_path):
    """An infinite srow (sform_code 1) made `nib.aff2axcodes` raise LinAlgError ('SVD did not converge')."""
    path = tmp_path / "affine.nii"
    write_nifti(path, np.zeros((3, 3, 3)), provenance={})
    raw = bytearray(path.read_bytes())
    struct.pack_into("<h", raw, 254, 1)  # sform_code: scanner
    struct.pack_into("<f", raw, 280, float("inf"))  # srow_x[0]
    path.write_bytes(bytes(raw))
    with pytest.raises(MedicalImageError, match=r"affine\.nii has an invalid orientation"):
        read_image(path)


def test_png_provenance_of_a_decompression_bomb_header_is_a_medical_image_error(tmp_path):
    """read_provenance let Pillow's DecompressionBombError through."""
    write_png(tmp_path / "bomb.png", np.zeros((4, 4)), provenance={})
    raw = bytearray((tmp_path / "bomb.png").read_bytes())
    struct.pack_into(">II", raw, 16, 65535, 100_000)
    struct.pack_into(">I", raw, 29, zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    (tmp_path / "bomb.png").write_bytes(bytes(raw))
    refused_within_bound(read_provenance, tmp_path / "bomb.png")


def test_png_chunk_length_beyond_the_file_does_not_allocate_it(tmp_path):
    """An IDAT length of 0x7FFFFFF0: after decoding, Pillow skips the rest of the chunk with `fp.read(rest)`,
    which allocated 2 GiB (fuzz case 5819 of seed 0)."""
    path = tmp_path / "idat.png"
    write_png(path, np.random.default_rng(0).random((16, 16)), provenance={})
    raw = bytearray(path.read_bytes())
    struct.pack_into(">I", raw, raw.index(b"IDAT") - 4, 0x7FFFFFF0)
    path.write_bytes(bytes(raw))
    for read in (read_image, read_provenance):
        assert peak_traced(read, path) < PEAK_BOUND, read.__name__


@pytest.mark.parametrize("intercept", ["1e308", "-1e308"])
def test_dicom_rescale_beyond_float32_is_a_medical_image_error(tmp_path, intercept):
    """Rescale Intercept 1e308 is finite in float64 but inf in the returned float32 array (fuzz case 9301)."""
    path = tmp_path / "rescale.dcm"
    write_dicom(path, np.zeros((4, 4)), modality="ct", provenance={})
    ds = pydicom.dcmread(path)
    ds.RescaleIntercept = intercept
    ds.save_as(path)
    for read in (read_image, read_volume):
        with pytest.raises(MedicalImageError, match=r"rescale\.dcm has pixel values beyond the float32 range"):
            read(path)


@pytest.mark.parametrize(("mode", "trns"), [("L", b""), ("RGB", b"\x00\x01")], ids=["grey-empty", "rgb-short"])
def test_png_transparency_chunk_too_short_is_a_medical_image_error(tmp_path, mode, trns):
    """A tRNS chunk shorter than its fields, after the image data (Pillow parses it in `load_end`, outside the
    `Image.open` that turns such errors into OSError), raised struct.error (fuzz cases 4139 and 8905 of seed 0)."""
    path = tmp_path / "trns.png"
    Image.new(mode, (4, 4)).save(path)
    raw = path.read_bytes()
    chunk = struct.pack(">I", len(trns)) + b"tRNS" + trns + struct.pack(">I", zlib.crc32(b"tRNS" + trns) & 0xFFFFFFFF)
    at = raw.index(b"IEND") - 4
    path.write_bytes(raw[:at] + chunk + raw[at:])
    for read in (read_image, read_provenance):
        with pytest.raises(MedicalImageError, match=r"trns\.png is a corrupt or truncated PNG file"):
            read(path)


def test_gzip_bomb_nifti_is_refused_without_reading_it_all(tmp_path):
    """A small .nii.gz whose stream inflates far past what its header declares stops early."""
    import time

    plain = tmp_path / "small.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 1), np.float32), np.eye(4)), plain)
    bomb = tmp_path / "bomb.nii.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(plain.read_bytes())
        zeros = bytes(2**20)
        for _ in range(64):  # 64 MiB of zeros, 64 KB on disk (a real bomb is GBs; the reader stops at 1 MiB + 2x the header's size)
            f.write(zeros)
    assert bomb.stat().st_size < 2**20
    started = time.perf_counter()
    with pytest.raises(MedicalImageError, match="decompression bomb"):
        read_image(bomb)
    assert time.perf_counter() - started < 5.0
