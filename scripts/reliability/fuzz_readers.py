#!/usr/bin/env python
"""Seeded mutation fuzzer for the image readers of `medm2g_diffusers.data.io`.

Every case takes a small seed file (DICOM, NIfTI, PNG, JPEG) or random junk, mutates it (bit flips, byte
overwrites, truncation, insertion/deletion/duplication of bytes, interesting integers at random offsets,
and format-aware header overwrites: DICOM Rows/Columns/NumberOfFrames/Bits*/transfer syntax, NIfTI dim[],
datatype, vox_offset, scl_slope, extensions, PNG IHDR width/height/bit depth/colour type with valid CRCs,
corrupt but valid-CRC IDAT streams) and reads it in this process with `read_image`, `read_volume` or
`read_provenance` or `pixels_unchanged` (what `medm2g verify` calls). The contract checked:

* the reader returns a well-formed result (finite float32 2-D image / volume, dict or None), or
* raises `MedicalImageError` whose message names the file;
* anything else is a crash, and a case running past `--timeout` seconds is a hang;
* no case allocates more than `--memory-bound-mb` (peak `tracemalloc` bytes, which include NumPy buffers,
  and growth of the process's peak RSS, which also covers Pillow/zlib buffers): huge-dimension headers
  must be refused before any pixel buffer exists.

Seeds are synthetic (written with our own writers, or with Pillow/pydicom/nibabel for the variants our
writers do not produce), so the fuzzer needs no data files. With `--real-data DIR` (default: the
`shared/data` folder next to the repository, when present) it also uses a handful of small real files, read
in place and mutated only in a temporary folder: real data never enters the repository.

Case `i` of seed `S` depends only on `(S, i)` and the seed files, so `--only-case i --seed S` replays one
case; `--save-failures DIR` keeps the bytes of every failing case.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/reliability/fuzz_readers.py --cases 10000 --out fuzz.json

Exit status: 0 when every case was a result or a `MedicalImageError`, 1 on any crash, hang or memory
overrun, 2 on bad arguments or unreadable seeds.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import random
import signal
import struct
import sys
import tempfile
import time
import tracemalloc
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pydicom.uid
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset

from medm2g_diffusers.data.io import (
    MAX_SIDE,
    MedicalImage,
    MedicalImageError,
    pixels_unchanged,
    read_image,
    read_provenance,
    read_volume,
    write_dicom,
    write_nifti,
    write_png,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_REAL_DATA = REPO.parent / "shared" / "data"
DEFAULT_CASES = 10_000
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_BOUND_MB = 64.0
FORMAT_WEIGHTS = {"dicom": 27, "nifti": 27, "png": 25, "jpeg": 10, "junk": 11}
MAX_REPRODUCERS = 5

PROVENANCE = {"model": "fuzz-seed", "seed": 0, "prompt": "Synthetic fuzz seed. Not a patient."}

# Values that break size arithmetic: zero, negatives, the limits and one past them, sign/width boundaries.
INTERESTING_U16 = [0, 1, 2, 3, 7, 8, 15, 16, 17, 255, 256, 4096, MAX_SIDE - 1, MAX_SIDE, MAX_SIDE + 1, 32767, 32768, 65535]
INTERESTING_U32 = INTERESTING_U16 + [65536, 2**24, 2**28, 2**28 + 1, 2**31 - 1, 2**31, 2**32 - 1]
HUGE_SIDES = [MAX_SIDE + 1, 20_000, 32_767, 46_341, 65_535, 100_000, 2**24, 2**31 - 1, 2**32 - 1]


# --------------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    name: str
    fmt: str  # dicom | nifti | png | jpeg
    suffix: str
    data: bytes
    origin: str  # synthetic | real


def _fixed_dicom(ds: Dataset) -> bytes:
    """Serialise with fixed UIDs, dates and times so that the seed bytes (and so every case) are reproducible."""
    for number, keyword in enumerate(("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"), start=1):
        if keyword in ds:
            setattr(ds, keyword, f"1.2.826.0.1.3680043.8.498.{number}")
    if "file_meta" in ds.__dict__ or getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    for keyword in ("InstanceCreationDate", "ContentDate"):
        if keyword in ds:
            setattr(ds, keyword, "20240101")
    for keyword in ("InstanceCreationTime", "ContentTime"):
        if keyword in ds:
            setattr(ds, keyword, "000000")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _plain_dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attributes: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=pixels.dtype.itemsize * 8,
                      generate_instance_uid=False)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def synthetic_seeds(workdir: Path) -> list[Seed]:
    """Small, deterministic seed files of every format and the reader paths that matter."""
    rng = np.random.default_rng(20240)
    seeds: list[Seed] = []

    def add(name: str, fmt: str, suffix: str, data: bytes) -> None:
        seeds.append(Seed(name, fmt, suffix, data, "synthetic"))

    def written(name: str, writer: Callable[[Path], None]) -> bytes:
        path = workdir / name
        writer(path)
        data = path.read_bytes()
        path.unlink()
        return data

    # PNG: our writer (8-bit, 16-bit, RGB, with provenance text chunks) and Pillow's other modes.
    add("grey8.png", "png", ".png", written("s.png", lambda p: write_png(p, rng.random((24, 20)), provenance=PROVENANCE)))
    add("grey16.png", "png", ".png", written("s.png", lambda p: write_png(p, rng.random((16, 12)), provenance=PROVENANCE, bit_depth=16)))
    add("rgb.png", "png", ".png", written("s.png", lambda p: write_png(p, rng.random((12, 16, 3)), provenance=PROVENANCE)))
    for mode, name in (("P", "palette.png"), ("LA", "grey_alpha.png"), ("1", "bilevel.png"), ("RGBA", "rgba.png")):
        buffer = io.BytesIO()
        base = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        image = base.convert(mode) if mode != "P" else base.quantize(8)
        image.save(buffer, format="PNG", optimize=False)
        add(name, "png", ".png", buffer.getvalue())
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(buffer, format="PNG", interlace=1)
    add("interlaced.png", "png", ".png", buffer.getvalue())

    # JPEG (read, never written, by io.py): baseline grey, baseline colour, progressive.
    for name, array, options in (
        ("grey.jpg", rng.integers(0, 256, (16, 24), dtype=np.uint8), {}),
        ("colour.jpg", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), {}),
        ("progressive.jpg", rng.integers(0, 256, (24, 16), dtype=np.uint8), {"progressive": True}),
    ):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=80, **options)
        add(name, "jpeg", ".jpg", buffer.getvalue())

    # DICOM: our writer (CT int16 + rescale, X-ray, MR), then variants for the other reader paths.
    for name, modality, array in (
        ("ct.dcm", "ct", rng.normal(0, 300, (20, 16))),
        ("xray.dcm", "xray", rng.random((16, 16))),
        ("mri.dcm", "mri_t1", rng.random((12, 16))),
    ):
        data = written("s.dcm", lambda p, m=modality, a=array: write_dicom(p, a, modality=m, provenance=PROVENANCE))
        add(name, "dicom", ".dcm", _fixed_dicom(pydicom.dcmread(io.BytesIO(data))))
    frames = rng.integers(0, 4096, (3, 8, 8), dtype=np.uint16)
    add("multiframe_mono1.dcm", "dicom", ".dcm", _fixed_dicom(_plain_dicom(
        frames, "MONOCHROME1", Modality="CR", NumberOfFrames=3, WindowCenter=2048, WindowWidth=4096, PixelSpacing=[0.5, 0.5])))
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4096, 0, 8])
    lut.add_new("LUTData", "US", [min(v // 16, 255) for v in range(4096)])
    add("voi_lut.dcm", "dicom", ".dcm", _fixed_dicom(_plain_dicom(
        rng.integers(0, 4096, (8, 8), dtype=np.uint16), Modality="DX", VOILUTSequence=[lut], BitsStored=12)))
    add("rgb.dcm", "dicom", ".dcm", _fixed_dicom(_plain_dicom(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB", Modality="XC")))
    rle = _plain_dicom(rng.integers(0, 256, (16, 16), dtype=np.uint8), Modality="MR")
    rle.compress(pydicom.uid.RLELossless, generate_instance_uid=False)
    add("rle.dcm", "dicom", ".dcm", _fixed_dicom(rle))
    implicit = _plain_dicom(rng.integers(-1000, 1000, (8, 12), dtype=np.int16), Modality="CT", RescaleSlope=1, RescaleIntercept=0)
    implicit.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    add("implicit.dcm", "dicom", ".dcm", _fixed_dicom(implicit))
    deflated = _plain_dicom(rng.integers(0, 4096, (8, 8), dtype=np.uint16), Modality="MR")
    deflated.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    add("deflated.dcm", "dicom", "", _fixed_dicom(deflated))  # no suffix: detected from the DICM marker

    # NIfTI: our writer (2-D, 3-D, 4-D; plain and gzip with mtime 0), int16 with scaling, NIfTI-2.
    nii3 = written("s.nii", lambda p: write_nifti(p, rng.normal(size=(10, 8, 6)), provenance=PROVENANCE, spacing=(0.5, 0.7, 2.0)))
    add("volume.nii", "nifti", ".nii", nii3)
    add("volume.nii.gz", "nifti", ".nii.gz", gzip.compress(nii3, mtime=0))
    add("slice.nii", "nifti", ".nii", written("s.nii", lambda p: write_nifti(p, rng.random((9, 7)), provenance=PROVENANCE)))
    add("series.nii", "nifti", ".nii", written("s.nii", lambda p: write_nifti(p, rng.random((4, 5, 3, 2)), provenance=PROVENANCE)))
    scaled = nib.Nifti1Image(rng.integers(-500, 500, (6, 6, 4), dtype=np.int16), np.diag([1.0, 1.0, 3.0, 1.0]))
    scaled.header.set_slope_inter(2.0, -1024.0)
    add("scaled_int16.nii", "nifti", ".nii", scaled.to_bytes())
    add("nifti2.nii", "nifti", ".nii", nib.Nifti2Image(rng.random((6, 5, 4)).astype(np.float32), np.eye(4)).to_bytes())
    return seeds


def real_seeds(data_dir: Path) -> list[Seed]:
    """A handful of small real files, read in place (never copied anywhere but a temporary folder)."""
    picks = [
        ("dicom-examples/CT_small.dcm", "dicom", ".dcm"),
        ("dicom-examples/MR_small.dcm", "dicom", ".dcm"),
        ("dicom-examples/emri_small.dcm", "dicom", ".dcm"),
        ("synthrad-ct-slices/GT_1BA012-019.png", "png", ".png"),
        ("totalsegmentator-examples/example_mr_sm.nii.gz", "nifti", ".nii.gz"),
    ]
    seeds = []
    for relative, fmt, suffix in picks:
        path = data_dir / relative
        if path.is_file():
            seeds.append(Seed(f"real:{relative}", fmt, suffix, path.read_bytes(), "real"))
    harvard = sorted((data_dir / "harvard-ct-mri" / "MRI").glob("*.png"))[:1]
    covid = sorted((data_dir / "covid-chestxray" / "images").glob("*.png"), key=lambda p: p.stat().st_size)[:1]
    for path in harvard + covid:
        seeds.append(Seed(f"real:{path.relative_to(data_dir)}", "png", ".png", path.read_bytes(), "real"))
    return seeds


# --------------------------------------------------------------------------------------------------
# Generic byte mutations
# --------------------------------------------------------------------------------------------------


def _offset(rng: random.Random, data: bytes | bytearray, head_bias: int = 600) -> int:
    """A random offset, half the time inside the first `head_bias` bytes (where headers live)."""
    if not data:
        return 0
    limit = len(data) if rng.random() < 0.5 else min(len(data), head_bias)
    return rng.randrange(limit)


def m_bitflip(rng: random.Random, data: bytearray) -> str:
    flips = [(_offset(rng, data), rng.randrange(8)) for _ in range(rng.randint(1, 8))]
    for position, bit in flips:
        data[position] ^= 1 << bit
    return f"bitflip{flips}"


def m_byteset(rng: random.Random, data: bytearray) -> str:
    position = _offset(rng, data)
    count = min(rng.randint(1, 16), len(data) - position)
    value = rng.choice([0x00, 0xFF, 0x7F, 0x80, None])
    for k in range(count):
        data[position + k] = rng.randrange(256) if value is None else value
    return f"byteset@{position}x{count}={value}"


def m_truncate(rng: random.Random, data: bytearray) -> str:
    position = _offset(rng, data, head_bias=1024)
    del data[position:]
    return f"truncate@{position}"


def m_insert(rng: random.Random, data: bytearray) -> str:
    position = _offset(rng, data)
    count = rng.choice([1, 2, 4, 8, 64, 512])
    data[position:position] = rng.randbytes(count)
    return f"insert@{position}x{count}"


def m_delete(rng: random.Random, data: bytearray) -> str:
    position = _offset(rng, data)
    count = rng.choice([1, 2, 4, 8, 64, 512])
    del data[position:position + count]
    return f"delete@{position}x{count}"


def m_duplicate(rng: random.Random, data: bytearray) -> str:
    if len(data) < 2:
        return "duplicate:skip"
    start = rng.randrange(len(data))
    chunk = bytes(data[start:start + rng.choice([4, 16, 128, 1024])])
    position = _offset(rng, data)
    data[position:position] = chunk
    return f"duplicate{start}->{position}x{len(chunk)}"


def m_integer(rng: random.Random, data: bytearray) -> str:
    width, pool = rng.choice([(2, INTERESTING_U16), (4, INTERESTING_U32)])
    order = rng.choice("<>")
    value = rng.choice(pool) % 2 ** (8 * width)
    position = _offset(rng, data)
    packed = struct.pack(f"{order}{'H' if width == 2 else 'I'}", value)
    data[position:position + width] = packed
    return f"int{8 * width}{order}@{position}={value}"


GENERIC = [m_bitflip, m_byteset, m_truncate, m_insert, m_delete, m_duplicate, m_integer]
GENERIC_WEIGHTS = [20, 15, 10, 10, 10, 5, 20]


def generic(rng: random.Random, data: bytes, count: int) -> tuple[bytes, list[str]]:
    buffer = bytearray(data)
    done = []
    for _ in range(count):
        if not buffer:
            break
        done.append(rng.choices(GENERIC, GENERIC_WEIGHTS)[0](rng, buffer))
    return bytes(buffer), done


# --------------------------------------------------------------------------------------------------
# Format-aware mutations; each returns (bytes, description, hostile) where hostile means "declares a
# dimension beyond the readers' limits"
# --------------------------------------------------------------------------------------------------


def _dicom_set(ds: Dataset, keyword: str, value: Any) -> None:
    if value is None:
        if keyword in ds:
            delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)


def dicom_header(rng: random.Random, data: bytes) -> tuple[bytes, list[str], bool]:
    """Overwrite pixel-describing attributes through pydicom (values kept writable), else fall back to bytes."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        out, done = generic(rng, data, 1)
        return out, ["dicom.unparsable", *done], False
    done = []
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(10)
        if choice == 0:  # hostile: a side beyond MAX_SIDE (US holds at most 65535)
            keyword = rng.choice(["Rows", "Columns"])
            value = rng.choice([MAX_SIDE + 1, 20_000, 32_768, 65_535])
        elif choice == 1:  # within the side limit but far more than the stored pixels
            keyword, value = rng.choice(["Rows", "Columns"]), rng.choice([0, 1, 3, 4096, MAX_SIDE])
        elif choice == 2:
            keyword = "NumberOfFrames"
            value = rng.choice(["0", "-1", "2", "3", "100", str(MAX_SIDE), str(MAX_SIDE + 1), "2147483647", "1e9", "x", None])
        elif choice == 3:
            keyword = rng.choice(["BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PlanarConfiguration"])
            value = rng.choice([0, 1, 2, 3, 4, 7, 8, 12, 15, 16, 17, 24, 31, 32, 33, 64, 65535, None])
        elif choice == 4:
            keyword = "PhotometricInterpretation"
            value = rng.choice(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR", "JUNK", "", None])
        elif choice == 5:
            keyword = rng.choice(["RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"])
            value = rng.choice(["0", "-1", "1e308", "-1e308", "1e-308", "nan", "inf", "-inf", "abc", "", "1\\2", None])
        elif choice == 6:
            keyword = "Modality"
            value = rng.choice(["CT", "MR", "CR", "DX", "RG", "OT", "", None])
        elif choice == 7:
            keyword = rng.choice(["PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices"])
            value = rng.choice(["0\\0", "-1\\1", "nan\\1", "inf\\inf", "1", "abc", "", None])
        elif choice == 8:  # transfer syntax: the pixel bytes stay as they are
            ds.file_meta.TransferSyntaxUID = rng.choice([
                pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian,
                pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.RLELossless, pydicom.uid.JPEGBaseline8Bit,
                pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEGLSLossless, "1.2.3.4", "",
            ])
            done.append(f"dicom.TransferSyntaxUID={ds.file_meta.TransferSyntaxUID!r}")
            continue
        else:  # LUT descriptors and pixel data
            if "VOILUTSequence" in ds and rng.random() < 0.6:
                item = ds.VOILUTSequence[0]
                item.LUTDescriptor = [rng.choice([0, 1, 2, 65535]), rng.choice([0, 1, 4095, 65535]), rng.choice([0, 1, 8, 16, 17, 32])]
                done.append(f"dicom.LUTDescriptor={list(item.LUTDescriptor)}")
                continue
            keyword = "PixelData"
            pixels = ds.get("PixelData") or b""
            value = rng.choice([b"", pixels[: len(pixels) // 2], pixels[:1], pixels + pixels, None])
        try:
            _dicom_set(ds, keyword, value)
        except Exception as e:  # pydicom refuses the value: record and keep going
            done.append(f"dicom.{keyword}={value!r}:refused({type(e).__name__})")
            continue
        shown = f"<{len(value)} bytes>" if isinstance(value, bytes) else repr(value)
        done.append(f"dicom.{keyword}={shown}")
    try:  # what the final header declares (a later overwrite may undo a huge value)
        hostile = max(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0), int(ds.get("NumberOfFrames") or 1)) > MAX_SIDE
    except Exception:
        hostile = False
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buffer, enforce_file_format=False)
    except Exception as e:
        out, more = generic(rng, data, 1)
        return out, [*done, f"dicom.write_failed({type(e).__name__})", *more], False
    return buffer.getvalue(), done, hostile


# NIfTI-1 field -> (offset, struct code); NIfTI-2 has its own table.
NIFTI1_FIELDS = {
    "sizeof_hdr": (0, "i"), "dim": (40, "h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim": (76, "f"),
    "vox_offset": (108, "f"), "scl_slope": (112, "f"), "scl_inter": (116, "f"), "xyzt_units": (123, "B"),
    "qform_code": (252, "h"), "sform_code": (254, "h"), "quatern": (256, "f"), "srow": (280, "f"),
    "extension": (348, "B"), "esize": (352, "i"), "ecode": (356, "i"),
}
NIFTI2_FIELDS = {
    "sizeof_hdr": (0, "i"), "datatype": (12, "h"), "bitpix": (14, "h"), "dim": (16, "q"), "pixdim": (104, "d"),
    "vox_offset": (168, "q"), "scl_slope": (176, "d"), "scl_inter": (184, "d"), "qform_code": (344, "i"),
    "sform_code": (348, "i"), "quatern": (352, "d"), "srow": (400, "d"), "xyzt_units": (500, "i"),
    "extension": (540, "B"), "esize": (544, "i"), "ecode": (548, "i"),
}
NIFTI_DTYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 255, -1, 32767]
FLOATS = [0.0, -1.0, 1.0, 1e-38, 3.4e38, -3.4e38, float("nan"), float("inf"), float("-inf")]


def nifti_header(rng: random.Random, data: bytes) -> tuple[bytes, list[str], bool]:
    """Overwrite NIfTI header fields in the (decompressed) bytes; recompress when the seed was gzip."""
    gz = data[:2] == b"\x1f\x8b"
    raw = bytearray(gzip.decompress(data) if gz else data)
    size_le = struct.unpack("<i", raw[:4])[0]
    order = "<" if size_le in (348, 540) else ">"
    fields = NIFTI2_FIELDS if struct.unpack(f"{order}i", raw[:4])[0] == 540 else NIFTI1_FIELDS
    done = []

    def put(name: str, index: int, value: Any) -> None:
        offset, code = fields[name]
        width = struct.calcsize(code)
        start = offset + index * width
        if code in "hiq":
            value = int(value)
            bits = 8 * width
            value = (value + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1)  # wrap into range
        struct.pack_into(f"{order}{code}", raw, start, value)
        done.append(f"nifti.{name}[{index}]={value!r}")

    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(9)
        dim_code = fields["dim"][1]
        ndim = struct.unpack_from(f"{order}{dim_code}", raw, fields["dim"][0])[0]
        if choice == 0:  # hostile: a spatial dimension (within dim[0]) beyond MAX_SIDE
            axis = rng.randint(1, max(1, min(int(ndim), 4)) if 1 <= ndim <= 7 else 3)
            big = rng.choice(HUGE_SIDES if dim_code == "q" else [s for s in HUGE_SIDES if s <= 32767])
            put("dim", axis, big)
        elif choice == 1:
            put("dim", rng.randint(0, 7), rng.choice([-1, 0, 1, 2, 3, 4, 5, 7, 8, 64, MAX_SIDE, 32767, -32768]))
        elif choice == 2:
            put("datatype", 0, rng.choice(NIFTI_DTYPES))
            if rng.random() < 0.5:
                put("bitpix", 0, rng.choice([0, 1, 8, 16, 32, 64, 128, -8, 255]))
        elif choice == 3:
            put("vox_offset", 0, rng.choice([0, 1, 348, 352, 544, 2**20, 2**31 - 1, -1]
                                           if fields["vox_offset"][1] == "q" else [0.0, 1.0, 348.0, 352.0, 1e9, -1.0] + FLOATS))
        elif choice == 4:
            put(rng.choice(["scl_slope", "scl_inter"]), 0, rng.choice(FLOATS))
        elif choice == 5:
            put("pixdim", rng.randint(0, 7), rng.choice(FLOATS))
        elif choice == 6:
            name = rng.choice(["qform_code", "sform_code", "xyzt_units"])
            put(name, 0, rng.choice([0, 1, 2, 3, 4, 5, 255, -1, 32767]) if name != "xyzt_units" else rng.randrange(256))
        elif choice == 7:
            put(rng.choice(["quatern", "srow"]), rng.randint(0, 5), rng.choice(FLOATS))
        else:  # extension header: flag, size and code
            if len(raw) > fields["ecode"][0] + 4:
                put("extension", 0, rng.choice([0, 1, 255]))
                put(rng.choice(["esize", "ecode"]), 0, rng.choice([0, -8, 7, 8, 16, 2**20, 2**31 - 1, 6, 4, 40]))
    dim_offset, dim_code = fields["dim"]
    dims = struct.unpack_from(f"{order}8{dim_code}", raw, dim_offset)
    hostile = 1 <= dims[0] <= 7 and max(dims[1:dims[0] + 1]) > MAX_SIDE  # as the final header declares
    out = bytes(raw)
    if gz:
        out = gzip.compress(out, mtime=0)
        done.append("nifti.recompressed")
    return out, done, hostile


def png_chunks(data: bytes) -> list[list] | None:
    """[[type, body], ...] of a PNG, or None when it does not parse."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    chunks, position = [], 8
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if len(body) != length:
            return None
        chunks.append([kind, body])
        position += 12 + length
    return chunks


def png_join(chunks: list[list], fix_crc: bool = True, rng: random.Random | None = None) -> bytes:
    parts = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        if not fix_crc and rng is not None and rng.random() < 0.5:
            crc ^= 1 << rng.randrange(32)
        parts.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc))
    return b"".join(parts)


def png_structure(rng: random.Random, data: bytes) -> tuple[bytes, list[str], bool]:
    """IHDR fields, chunk bodies, IDAT streams and chunk order, with valid CRCs most of the time."""
    chunks = png_chunks(data)
    if not chunks or chunks[0][0] != b"IHDR":
        out, done = generic(rng, data, 1)
        return out, ["png.unparsable", *done], False
    done = []
    for _ in range(rng.randint(1, 2)):
        choice = rng.randrange(7)
        ihdr = bytearray(chunks[0][1]).ljust(13, b"\x00") if chunks and chunks[0][0] == b"IHDR" else bytearray(13)
        if choice == 0:  # hostile: width/height beyond MAX_SIDE
            field_name, offset = rng.choice([("width", 0), ("height", 4)])
            value = rng.choice(HUGE_SIDES)
            struct.pack_into(">I", ihdr, offset, value)
            done.append(f"png.IHDR.{field_name}={value}")
        elif choice == 1:  # within the limits but far more than the data holds
            width, height = rng.choice([(MAX_SIDE, MAX_SIDE), (MAX_SIDE, 1), (1, MAX_SIDE), (4096, 4096), (0, 16), (16, 0), (9000, 9000)])
            struct.pack_into(">II", ihdr, 0, width, height)
            done.append(f"png.IHDR.size={width}x{height}")
        elif choice == 2:
            offset = rng.randint(8, 12)
            value = rng.choice([0, 1, 2, 3, 4, 6, 8, 16, 255]) if offset in (8, 9) else rng.choice([0, 1, 2, 255])
            ihdr[offset] = value
            done.append(f"png.IHDR[{offset}]={value}")
        elif choice == 3:  # decompress IDAT, mutate the filtered scanlines, recompress (valid zlib)
            idat = b"".join(body for kind, body in chunks if kind == b"IDAT")
            try:
                plain = bytearray(zlib.decompress(idat))
            except zlib.error:
                plain = bytearray(idat)
            plain, more = generic(rng, bytes(plain), rng.randint(1, 3))
            first = next(i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT") if any(k == b"IDAT" for k, _ in chunks) else 1
            chunks = [c for c in chunks if c[0] != b"IDAT"]
            chunks.insert(min(first, len(chunks)), [b"IDAT", zlib.compress(plain)])
            done.append("png.IDAT.inner:" + ",".join(more))
        elif choice == 4:  # mutate the body of a random chunk
            index = rng.randrange(len(chunks))
            body, more = generic(rng, chunks[index][1], 1) if chunks[index][1] else (rng.randbytes(4), ["fill"])
            chunks[index][1] = body
            done.append(f"png.chunk[{index}]{chunks[index][0]!r}:" + ",".join(more))
        elif choice == 5:  # drop, duplicate or reorder chunks
            index = rng.randrange(len(chunks))
            action = rng.choice(["drop", "duplicate", "swap"])
            if action == "drop":
                chunks.pop(index)
            elif action == "duplicate":
                chunks.insert(rng.randrange(len(chunks) + 1), list(chunks[index]))
            else:
                other = rng.randrange(len(chunks))
                chunks[index], chunks[other] = chunks[other], chunks[index]
            done.append(f"png.{action}[{index}]")
        else:  # an extra chunk: oversized text, a compressed-text bomb, an unknown critical chunk, a palette
            kind, body = rng.choice([
                (b"tEXt", b"Comment\x00" + b"x" * 70_000),
                (b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * 8_000_000)),
                (b"iTXt", b"medm2g:provenance\x00\x01\x00\x00\x00" + zlib.compress(b"{" * 100_000)),
                (b"ABCD", rng.randbytes(16)),
                (b"PLTE", rng.randbytes(rng.choice([0, 3, 5, 768, 771]))),
                (b"tRNS", rng.randbytes(rng.choice([0, 2, 6, 300]))),
                (b"IDAT", b""),
            ])
            chunks.insert(rng.randint(1, len(chunks)), [kind, body])
            done.append(f"png.extra[{kind.decode()}:{len(body)}]")
        if chunks and chunks[0][0] == b"IHDR" and choice in (0, 1, 2):
            chunks[0][1] = bytes(ihdr)
    # Pillow takes the last IHDR it meets, so only a file with a single one declares a definite size.
    hostile = (bool(chunks) and chunks[0][0] == b"IHDR" and sum(kind == b"IHDR" for kind, _ in chunks) == 1
               and len(chunks[0][1]) >= 8 and max(struct.unpack(">II", chunks[0][1][:8])) > MAX_SIDE)
    fix_crc = rng.random() < 0.85
    if not fix_crc:
        done.append("png.crc_broken")
    return png_join(chunks, fix_crc, rng), done, hostile


def jpeg_structure(rng: random.Random, data: bytes) -> tuple[bytes, list[str], bool]:
    """Overwrite the SOF height/width (hostile when beyond MAX_SIDE) or a marker segment length."""
    buffer = bytearray(data)
    position = 2
    sof, segments = None, []
    while position + 4 <= len(buffer) and buffer[position] == 0xFF:
        marker = buffer[position + 1]
        length = struct.unpack(">H", buffer[position + 2:position + 4])[0]
        segments.append(position)
        if marker in (0xC0, 0xC1, 0xC2):
            sof = position
        if marker == 0xDA:
            break
        position += 2 + length
    if sof is None or rng.random() < 0.3:
        if segments:
            at = rng.choice(segments)
            value = rng.choice([0, 1, 2, 0xFFFF, 0x7FFF])
            struct.pack_into(">H", buffer, at + 2, value)
            return bytes(buffer), [f"jpeg.segment@{at}.length={value}"], False
        out, done = generic(rng, data, 1)
        return out, ["jpeg.unparsable", *done], False
    if rng.random() < 0.5:
        value = rng.choice([MAX_SIDE + 1, 20_000, 65_535])
        hostile = True
    else:
        value = rng.choice([0, 1, MAX_SIDE, 4096])
        hostile = False
    offset = sof + 5 + rng.choice([0, 2])  # height at +5, width at +7
    struct.pack_into(">H", buffer, offset, value)
    return bytes(buffer), [f"jpeg.SOF@{offset}={value}"], hostile


STRUCTURE = {"dicom": dicom_header, "nifti": nifti_header, "png": png_structure, "jpeg": jpeg_structure}


def junk(rng: random.Random) -> tuple[bytes, str, list[str]]:
    """Random bytes, sometimes behind a format's magic number, under a random name ending."""
    body = rng.randbytes(rng.choice([1, 3, 16, 131, 348, 540, 1000, 4096]))
    kind = rng.choice(["plain", "png", "jpeg", "dicom", "nifti1", "nifti2", "gzip", "gzip_nifti", "text"])
    if kind == "png":
        body = b"\x89PNG\r\n\x1a\n" + body
    elif kind == "jpeg":
        body = b"\xff\xd8\xff" + body
    elif kind == "dicom":
        body = bytes(128) + b"DICM" + body
    elif kind == "nifti1":
        header = bytearray(rng.randbytes(352))
        struct.pack_into("<i", header, 0, 348)
        header[344:348] = b"n+1\x00"
        body = bytes(header) + body
    elif kind == "nifti2":
        header = bytearray(rng.randbytes(544))
        struct.pack_into("<i", header, 0, 540)
        header[4:8] = b"n+2\x00"
        body = bytes(header) + body
    elif kind == "gzip":
        body = gzip.compress(body, mtime=0)
    elif kind == "gzip_nifti":
        header = bytearray(rng.randbytes(352))
        struct.pack_into("<i", header, 0, 348)
        header[344:348] = b"n+1\x00"
        body = gzip.compress(bytes(header) + body, mtime=0)[: rng.choice([10, 40, 10_000])]
    elif kind == "text":
        body = "".join(rng.choice("abc ,;\n\t\u00e9\u4e2d") for _ in range(200)).encode("utf-8")
    suffix = rng.choice([".dcm", ".dicom", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg", "", ".txt", ".csv"])
    return body, suffix, [f"junk:{kind}:{len(body)}"]


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    fmt: str
    seed_name: str
    suffix: str
    data: bytes
    mutations: list[str]
    operation: str
    hostile: bool


def make_case(index: int, master_seed: int, seeds: dict[str, list[Seed]]) -> Case:
    """Case `index` of `master_seed`: a pure function of both and the seed files."""
    rng = random.Random(f"fuzz-readers:{master_seed}:{index}")
    formats = [f for f in FORMAT_WEIGHTS if f == "junk" or seeds.get(f)]
    fmt = rng.choices(formats, [FORMAT_WEIGHTS[f] for f in formats])[0]
    if fmt == "junk":
        data, suffix, done = junk(rng)
        return Case(index, fmt, "junk", suffix, data, done, rng.choice(["read_image"] * 4 + ["read_volume", "read_provenance"]), False)
    seed = rng.choice(seeds[fmt])
    data, done, hostile = seed.data, [], False
    plan = rng.choices(["structure", "generic", "both", "inner"], [35, 35, 20, 10])[0]
    if plan in ("structure", "both"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, more, hostile = STRUCTURE[fmt](rng, data)
        done += more
    if plan in ("generic", "both"):
        data, more = generic(rng, data, rng.choice([1, 1, 2, 3, 5]))
        done += more
        if fmt == "png" and rng.random() < 0.5 and (chunks := png_chunks(data)):  # let Pillow look past the CRCs
            data = png_join(chunks)
            done.append("png.crc_fixed")
    if plan == "inner":  # gzip NIfTI: mutate the content and recompress; others: a single interesting integer
        if data[:2] == b"\x1f\x8b":
            inner, more = generic(rng, gzip.decompress(data), rng.randint(1, 3))
            data = gzip.compress(inner, mtime=0)
            done += [*more, "gzip.recompressed"]
        else:
            buffer = bytearray(data)
            done.append(m_integer(rng, buffer))
            data = bytes(buffer)
    suffix = seed.suffix if rng.random() < 0.9 else rng.choice(["", ".dcm", ".nii", ".png", ".jpg", ".bin"])
    if fmt in ("dicom", "nifti"):
        operation = rng.choices(["read_image", "read_volume", "read_provenance", "pixels_unchanged"], [55, 20, 15, 10])[0]
    else:
        operation = rng.choices(["read_image", "read_provenance", "pixels_unchanged"], [75, 15, 10])[0]
    # A huge declared size that no later byte mutation can have undone, read by a pixel reader (read_provenance
    # reads no pixels, nor does pixels_unchanged without a digest): it must be refused.
    hostile = hostile and plan == "structure" and operation not in ("read_provenance", "pixels_unchanged")
    return Case(index, fmt, seed.name, suffix, data, done, operation, hostile)


OPERATIONS: dict[str, Callable[[Path], Any]] = {"read_image": read_image, "read_volume": read_volume,
                                                 "read_provenance": read_provenance, "pixels_unchanged": pixels_unchanged}


def check_result(operation: str, result: Any) -> str | None:
    """Why a returned value breaks the readers' documented contract, or None when it is fine."""
    if operation == "read_image":
        if not isinstance(result, MedicalImage):
            return f"returned {type(result).__name__}, not MedicalImage"
        array = result.array
        if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype != np.float32 or 0 in array.shape:
            return f"array {getattr(array, 'shape', None)} {getattr(array, 'dtype', None)} is not a non-empty 2-D float32 array"
        if not np.isfinite(array).all():
            return "array holds NaN or infinite values"
        if result.units not in ("HU", "unit", "signal"):
            return f"units {result.units!r}"
        if result.units == "unit" and (array.min() < 0 or array.max() > 1):
            return f"'unit' array outside [0, 1]: [{array.min()}, {array.max()}]"
    elif operation == "read_volume":
        array, spacing, units = result
        if not isinstance(array, np.ndarray) or array.ndim not in (2, 3, 4) or array.dtype != np.float32 or array.size == 0:
            return f"volume {getattr(array, 'shape', None)} {getattr(array, 'dtype', None)} is not a non-empty float32 array"
        if not np.isfinite(array).all():
            return "volume holds NaN or infinite values"
        if spacing is not None and (len(spacing) != array.ndim or not all(np.isfinite(s) for s in spacing)):
            return f"spacing {spacing} does not match the volume {array.shape}"
    elif operation == "pixels_unchanged":
        if result not in (True, False, None):
            return f"pixels_unchanged returned {result!r}"
    elif result is not None and not isinstance(result, dict):
        return f"read_provenance returned {type(result).__name__}"
    return None


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case; a BaseException so that the readers' `except Exception` cannot eat it."""


def _on_alarm(signum, frame):
    raise CaseTimeout()


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


@dataclass
class Result:
    outcome: str  # array | medical_image_error | other_exception | hang | bad_return | error_without_path
    exception: str | None = None
    message: str | None = None
    seconds: float = 0.0
    peak_traced_mb: float = 0.0
    rss_growth_mb: float | None = None


def run_case(case: Case, path: Path, timeout: float, per_case_rss: bool) -> Result:
    path.write_bytes(case.data)
    operation = OPERATIONS[case.operation]
    tracemalloc.reset_peak()
    base_traced = tracemalloc.get_traced_memory()[0]
    rss_before = None
    if per_case_rss:
        _reset_peak_rss()
        rss_before = _rss_kib("VmRSS")
    use_alarm = hasattr(signal, "setitimer")
    start = time.perf_counter()
    result = Result("array")
    try:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = operation(path)
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        problem = check_result(case.operation, value)
        if problem:
            result = Result("bad_return", message=problem)
        del value
    except CaseTimeout:
        result = Result("hang", exception="CaseTimeout", message=f"no answer within {timeout} s")
    except MedicalImageError as e:
        named = str(path) in str(e)
        result = Result("medical_image_error" if named else "error_without_path", type(e).__name__, str(e)[:300])
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - every other exception is the finding
        result = Result("other_exception", type(e).__name__, str(e)[:300])
    result.seconds = time.perf_counter() - start
    if result.seconds > timeout and result.outcome != "hang":  # stuck in C code the alarm could not interrupt
        result = Result("hang", exception=result.exception, message=f"took {result.seconds:.2f} s (> {timeout} s)",
                        seconds=result.seconds)
    result.peak_traced_mb = max(0, tracemalloc.get_traced_memory()[1] - base_traced) / 2**20
    if per_case_rss and rss_before is not None:
        peak = _rss_kib("VmHWM")
        result.rss_growth_mb = None if peak is None else max(0, peak - rss_before) / 1024
    return result


def fuzz(
    cases: int = DEFAULT_CASES,
    seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_bound_mb: float = DEFAULT_MEMORY_BOUND_MB,
    real_data: Path | None = None,
    save_failures: Path | None = None,
    only_case: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the cases and return the JSON summary (see the module docstring)."""
    started = time.perf_counter()
    # nibabel logs its header fixes and pydicom its complaints: thousands of lines, and slow under pytest's capture.
    quiet = {name: logging.getLogger(name).level for name in ("nibabel", "pydicom")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="fuzz-readers-") as tmp:
        workdir = Path(tmp)
        seed_list = synthetic_seeds(workdir)
        if real_data is not None and real_data.is_dir():
            seed_list += real_seeds(real_data)
        by_format: dict[str, list[Seed]] = defaultdict(list)
        for s in seed_list:
            by_format[s.fmt].append(s)

        # Every unmutated seed must read: otherwise the fuzzer is testing nothing. This also warms imports.
        for s in seed_list:
            path = workdir / f"seed{s.suffix}"
            path.write_bytes(s.data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_image(path)
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        per_case_rss = _reset_peak_rss()
        old_handler = signal.getsignal(signal.SIGALRM) if hasattr(signal, "SIGALRM") else None
        old_timer = signal.getitimer(signal.ITIMER_REAL) if hasattr(signal, "setitimer") else None
        if old_handler is not None:
            signal.signal(signal.SIGALRM, _on_alarm)

        per_format: dict[str, Counter] = defaultdict(Counter)
        per_operation: dict[str, Counter] = defaultdict(Counter)
        hostile: Counter = Counter()
        hostile_peak = 0.0
        hostile_rss = 0.0
        findings: dict[str, dict[str, Any]] = {}
        slowest = Result("array")
        slowest_case = None
        max_traced = 0.0
        max_rss: float | None = 0.0 if per_case_rss else None
        max_rss_case = None
        indices = [only_case] if only_case is not None else range(cases)
        try:
            for n, index in enumerate(indices):
                case = make_case(index, seed, by_format)
                path = workdir / f"case{index:06d}{case.suffix}"
                result = run_case(case, path, timeout, per_case_rss)
                path.unlink(missing_ok=True)
                over = result.peak_traced_mb > memory_bound_mb or (result.rss_growth_mb or 0) > memory_bound_mb
                outcome = "over_memory" if over and result.outcome in ("array", "medical_image_error") else result.outcome
                per_format[case.fmt]["cases"] += 1
                per_format[case.fmt][outcome] += 1
                per_operation[case.operation][outcome] += 1
                if case.hostile:
                    hostile[outcome] += 1
                    hostile_peak = max(hostile_peak, result.peak_traced_mb)
                    hostile_rss = max(hostile_rss, result.rss_growth_mb or 0.0)
                if result.seconds > slowest.seconds:
                    slowest, slowest_case = result, case
                max_traced = max(max_traced, result.peak_traced_mb)
                if max_rss is not None and (result.rss_growth_mb or 0.0) > max_rss:
                    max_rss, max_rss_case = result.rss_growth_mb, case
                if outcome not in ("array", "medical_image_error"):
                    key = f"{outcome}:{result.exception or ''}"
                    entry = findings.setdefault(key, {"outcome": outcome, "exception": result.exception, "count": 0, "reproducers": []})
                    entry["count"] += 1
                    if len(entry["reproducers"]) < MAX_REPRODUCERS:
                        entry["reproducers"].append({
                            "case": index, "replay": f"--seed {seed} --only-case {index}", "format": case.fmt,
                            "seed_file": case.seed_name, "operation": case.operation, "suffix": case.suffix,
                            "mutations": case.mutations, "message": result.message,
                            "seconds": round(result.seconds, 3), "peak_traced_mb": round(result.peak_traced_mb, 2),
                            "rss_growth_mb": None if result.rss_growth_mb is None else round(result.rss_growth_mb, 2),
                        })
                    if save_failures is not None:
                        save_failures.mkdir(parents=True, exist_ok=True)
                        (save_failures / f"case{index:06d}{case.suffix or '.bin'}").write_bytes(case.data)
                if progress and (n + 1) % 1000 == 0:
                    print(f"{n + 1} cases, {time.perf_counter() - started:.0f} s, findings: {sum(f['count'] for f in findings.values())}",
                          file=sys.stderr, flush=True)
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGALRM, old_handler)
            if old_timer is not None and old_timer[0] > 0:
                signal.setitimer(signal.ITIMER_REAL, max(1e-3, old_timer[0] - (time.perf_counter() - started)), old_timer[1])
            if not was_tracing:
                tracemalloc.stop()
            for name, level in quiet.items():
                logging.getLogger(name).setLevel(level)

    outcomes = ("array", "medical_image_error", "other_exception", "hang", "over_memory", "bad_return", "error_without_path")
    totals = Counter()
    for counts in per_format.values():
        totals.update(counts)
    failures = sum(totals[o] for o in outcomes[2:])

    def describe(case: Case | None, result: Result | None = None) -> dict[str, Any] | None:
        if case is None:
            return None
        return {"case": case.index, "format": case.fmt, "seed_file": case.seed_name, "operation": case.operation,
                "mutations": case.mutations, **({"outcome": result.outcome} if result else {})}

    return {
        "tool": "scripts/reliability/fuzz_readers.py",
        "seed": seed,
        "cases": totals["cases"],
        "timeout_s_per_case": timeout,
        "memory_bound_mb": memory_bound_mb,
        "memory_measures": "peak tracemalloc bytes (Python objects and NumPy buffers) and, on Linux, growth of the "
                           "process's peak RSS (VmHWM after /proc/self/clear_refs) per case",
        "seed_files": {fmt: [s.name for s in items] for fmt, items in sorted(by_format.items())},
        "per_format": {fmt: {o: per_format[fmt][o] for o in ("cases", *outcomes)} for fmt in sorted(per_format)},
        "per_operation": {op: {o: per_operation[op][o] for o in outcomes} for op in sorted(per_operation)},
        "totals": {o: totals[o] for o in ("cases", *outcomes)},
        "hostile_huge_dimension_cases": {"cases": sum(hostile.values()), **{o: hostile[o] for o in outcomes},
                                         "max_peak_traced_mb": round(hostile_peak, 3),
                                         "max_rss_growth_mb": round(hostile_rss, 3) if per_case_rss else None},
        "failures": failures,
        "ok": failures == 0,
        "findings": sorted(findings.values(), key=lambda f: -f["count"]),
        "max_case_seconds": round(slowest.seconds, 4),
        "slowest_case": describe(slowest_case, slowest),
        "max_peak_traced_mb": round(max_traced, 3),
        "max_rss_growth_mb": None if max_rss is None else round(max_rss, 3),
        "max_rss_case": describe(max_rss_case),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES, help=f"number of cases (default {DEFAULT_CASES})")
    parser.add_argument("--seed", type=int, default=0, help="master seed; case i depends only on (seed, i)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per-case time bound in seconds (default 5)")
    parser.add_argument("--memory-bound-mb", type=float, default=DEFAULT_MEMORY_BOUND_MB, help="per-case peak memory bound (default 64)")
    parser.add_argument("--real-data", type=Path, default=DEFAULT_REAL_DATA if DEFAULT_REAL_DATA.is_dir() else None,
                        help="folder of real example files to add as seeds (default: ../shared/data when present)")
    parser.add_argument("--no-real-data", action="store_true", help="use synthetic seeds only")
    parser.add_argument("--only-case", type=int, help="replay this one case index")
    parser.add_argument("--save-failures", type=Path,
                        help="write the bytes of every failing case here (keep it outside the repository: cases may derive from real data)")
    parser.add_argument("--out", type=Path, help="write the JSON summary here (also printed)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.timeout <= 0 or args.memory_bound_mb <= 0:
        parser.error("--cases, --timeout and --memory-bound-mb must be positive")
    try:
        summary = fuzz(
            cases=args.cases, seed=args.seed, timeout=args.timeout, memory_bound_mb=args.memory_bound_mb,
            real_data=None if args.no_real_data else args.real_data, save_failures=args.save_failures,
            only_case=args.only_case, progress=not args.quiet,
        )
    except MedicalImageError as e:
        print(f"a seed file does not read: {e}", file=sys.stderr)
        return 2
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv)
    text = json.dumps(summary, indent=2, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
