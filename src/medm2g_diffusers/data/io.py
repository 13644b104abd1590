"""Read and write medical images: DICOM, NIfTI, PNG and JPEG.

Every reader returns a :class:`MedicalImage` whose ``units`` say what the numbers are, so no caller has
to guess whether an array is Hounsfield units, display values in [0, 1] or raw scanner signal:

========================  =========================================================================
source                    ``array`` (float32)
========================  =========================================================================
DICOM CT                  Hounsfield units (``"HU"``) through Rescale Slope/Intercept.
DICOM MR                  raw signal after any Rescale Slope/Intercept (``"signal"``).
DICOM CR/DX/DR/RG         display values in [0, 1] (``"unit"``): the file's VOI LUT, else its first
                          window (Window Center/Width), else the full Bits Stored range; MONOCHROME1
                          is inverted so that bone is bright. ``metadata["intensity_scaling"]``
                          records which one was used.
DICOM, other modalities   raw signal after the modality LUT (``"signal"``); colour images become
                          luma in [0, 1] (``"unit"``).
NIfTI                     the stored values after ``scl_slope``/``scl_inter`` (``"signal"``): HU for
                          CT volumes by convention, but the format does not say so.
PNG / JPEG                grey values in [0, 1] divided by the bit depth (``"unit"``).
========================  =========================================================================

Orientation is never changed silently: a NIfTI slice keeps the stored voxel order (rows are the first
remaining voxel axis, columns the second; ``metadata["axis_codes"]`` names their anatomical
directions), unless the caller asks for ``canonical=True`` (RAS+ through ``nibabel.as_closest_canonical``).

Writers are for synthetic images only. Each one marks its file as synthetic in the places a person or a
tool looks (PNG text chunks, DICOM Series Description / Image Comments / Image Type, NIfTI
description) and stores the full provenance as JSON, which :func:`read_provenance` returns. A writer
takes a pixel array and provenance and nothing else, so no identifier of a source file can leak into a
written one. Files are written atomically: to a temporary file in the target directory, then
``os.replace``.

Every problem with a file (missing, empty, truncated, corrupt, unsupported, compressed beyond the
installed decoders, implausibly large, non-finite) raises :class:`MedicalImageError` naming the file.
Headers are checked against :data:`MAX_SIDE` and :data:`MAX_VOXELS` before any pixel buffer is
allocated.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pydicom
import pydicom.uid
from PIL import Image, PngImagePlugin
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pixel_array
from pydicom.valuerep import format_number_as_ds


__all__ = [
    "MAX_SIDE",
    "MAX_VOXELS",
    "SUPPORTED_SUFFIXES",
    "MedicalImage",
    "MedicalImageError",
    "MedicalImageNotFoundError",
    "read_image",
    "read_provenance",
    "read_volume",
    "write_dicom",
    "write_nifti",
    "write_png",
]

PathLike = str | os.PathLike[str]
SourceFormat = Literal["dicom", "nifti", "png", "jpeg"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg")
"""File name endings the readers accept; files without a suffix are read when their content is DICOM."""

MAX_SIDE = 2**14
"""Largest accepted size of any image dimension, checked in the header before pixels are allocated."""

MAX_VOXELS = 2**28
"""Largest accepted number of values (pixels x frames x samples) in one file: 1 GiB as float32."""

PRIVATE_CREATOR = "MEDM2G_DIFFUSERS"
"""DICOM private creator of the block (group 0x0011) that holds the provenance JSON."""

_PRIVATE_GROUP = 0x0011
_PROVENANCE_KEY = "medm2g:provenance"
_DIGEST_KEY = "pixel_sha256"  # provenance entry: the stored pixels' digest (see pixel_digest)
_PROVENANCE_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_GZIP_SIGNATURE = b"\x1f\x8b"
_NIFTI_HEADER_BYTES = 540  # NIfTI-2 header size; NIfTI-1 needs 348

# DICOM Modality (0008,0060) defined terms -> our imaging families.
_DICOM_MODALITIES = {"CT": "ct", "MR": "mri", "CR": "xray", "DX": "xray", "DR": "xray", "RG": "xray"}
# Our families -> the Modality value a written file carries.
_WRITE_MODALITIES = {"ct": "CT", "mri": "MR", "xray": "DX"}
# CT is stored as int16 with this intercept, the scanner convention (stored value 0 = -1024 HU).
_CT_RESCALE_INTERCEPT = -1024
# ITU-R BT.601 luma, the weights Pillow's own RGB -> L conversion uses.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


class MedicalImageError(ValueError):
    """A file cannot be read as a medical image; the message names the file and the problem."""


class MedicalImageNotFoundError(MedicalImageError, FileNotFoundError):
    """The path does not exist (also a :class:`FileNotFoundError`)."""


@dataclass
class MedicalImage:
    """One 2-D image read from a medical or ordinary image file.

    Args:
        array (`np.ndarray` of shape `(height, width)`, float32):
            The pixel values, in `units`.
        units (`str`):
            `"HU"` (Hounsfield units), `"unit"` (display values in [0, 1]) or `"signal"` (raw stored
            values without a physical unit, e.g. MR signal or NIfTI voxels).
        modality (`str` or `None`):
            `"ct"`, `"mri"` or `"xray"` from a DICOM Modality tag; `None` when the file does not say (PNG,
            JPEG, NIfTI, other DICOM modalities).
        spacing (`tuple[float, float]` or `None`):
            Pixel size in mm along (rows, columns); `None` when the file does not state it.
        source_format (`str`):
            `"dicom"`, `"nifti"`, `"png"` or `"jpeg"`, detected from the content.
        metadata (`dict`):
            Non-identifying facts about how the array was obtained (chosen slice/frame, rescale,
            scaling, orientation). Never patient, study or institution identifiers.
    """

    array: np.ndarray
    units: str
    modality: str | None
    spacing: tuple[float, float] | None
    source_format: SourceFormat
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Public readers
# --------------------------------------------------------------------------------------------------


def read_image(
    path: PathLike,
    *,
    slice_index: int | None = None,
    axis: int = -1,
    frame: int | None = None,
    volume: int = 0,
    canonical: bool = False,
) -> MedicalImage:
    """Read one 2-D image from a DICOM, NIfTI, PNG or JPEG file.

    The format is detected from the content (DICM marker, PNG/JPEG signatures, NIfTI header, also inside
    gzip) and only then from the suffix, so a DICOM file without a suffix reads as DICOM.

    Args:
        path (`str` or `os.PathLike`):
            The file.
        slice_index (`int`, *optional*):
            NIfTI: index along `axis`; default the middle slice. Multi-frame DICOM: same as `frame`.
        axis (`int`, defaults to `-1`):
            NIfTI: the spatial axis to slice across, in `[-3, 2]`; `-1` is the last spatial axis (axial
            for RAS-like volumes), also for 4-D files.
        frame (`int`, *optional*):
            DICOM: the frame of a multi-frame file; default the middle frame.
        volume (`int`, defaults to `0`):
            NIfTI: the volume of a 4-D file.
        canonical (`bool`, defaults to `False`):
            NIfTI: reorient to the closest RAS+ voxel order before slicing. Off by default: the stored
            order is returned as is. Other formats are always returned as stored.

    Returns:
        `MedicalImage` with a float32 `(height, width)` array.

    Raises:
        MedicalImageNotFoundError: `path` does not exist.
        MedicalImageError: the file is empty, corrupt, truncated, unsupported, too large or non-finite.
        ValueError: an index argument is out of range for this file.
    """
    path, source_format = _open_path(path)
    if source_format != "nifti" and (axis != -1 or volume != 0):
        raise ValueError(f"axis and volume apply to NIfTI files only; {path} is {source_format.upper()}")
    if source_format == "dicom":
        if slice_index is not None and frame is not None and slice_index != frame:
            raise ValueError(f"slice_index and frame both select a DICOM frame; got {slice_index} and {frame}")
        return _read_dicom_image(path, frame if frame is not None else slice_index)
    if source_format == "nifti":
        return _read_nifti_image(path, slice_index=slice_index, axis=axis, volume=volume, canonical=canonical)
    for name, value in (("slice_index", slice_index), ("frame", frame)):
        if value not in (None, 0):
            raise ValueError(f"{path} is a single 2-D image, so {name} must be None or 0; got {value}")
    return _read_pillow_image(path, source_format)


def read_volume(path: PathLike, *, canonical: bool = False) -> tuple[np.ndarray, tuple[float, ...] | None, str]:
    """Read a whole volume from a NIfTI file or a (multi-frame) DICOM file.

    Args:
        path (`str` or `os.PathLike`):
            The file.
        canonical (`bool`, defaults to `False`):
            NIfTI: reorient to the closest RAS+ voxel order.

    Returns:
        `(array, spacing, units)`:
        - `array`: float32; NIfTI in stored voxel order `(i, j, k)` or `(i, j, k, t)`; DICOM
          `(frames, rows, columns)` with frames in file order (not sorted by position).
        - `spacing`: the voxel size along each array axis (mm; a 4-D NIfTI's last entry is in its
          time unit), or `None` when the file does not state all of them.
        - `units`: as in :class:`MedicalImage`.

    Raises:
        MedicalImageError: as for :func:`read_image`, and for PNG/JPEG files (use :func:`read_image`).
    """
    path, source_format = _open_path(path)
    if source_format == "dicom":
        return _read_dicom_volume(path)
    if source_format == "nifti":
        return _read_nifti_volume(path, canonical=canonical)
    raise MedicalImageError(f"{path} is a 2-D {source_format.upper()} image, not a volume; use read_image")


def read_provenance(path: PathLike) -> dict[str, Any] | None:
    """Return the provenance a writer of this module stored in a file, or `None` if there is none.

    Reads the JSON written by :func:`write_png`, :func:`write_dicom` or :func:`write_nifti`. When only the
    human-readable marks survive (de-identification tools strip DICOM private tags; other tools rewrite
    PNG text chunks), returns what they say, with `"synthetic": True`.

    Raises:
        MedicalImageError: the file cannot be read.
    """
    path, source_format = _open_path(path)
    if source_format == "png":
        return _png_provenance(path)
    if source_format == "dicom":
        return _dicom_provenance(path)
    if source_format == "nifti":
        return _nifti_provenance(path)
    return None  # this module never writes JPEG


def pixel_digest(array: np.ndarray) -> str:
    """``"sha256:<hex>"`` of an array's values as stored (dtype, shape and little-endian bytes): what the
    writers record as ``pixel_sha256`` so that :func:`pixels_unchanged` can tell an edited file."""
    array = np.asarray(array)
    canonical = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    digest = hashlib.sha256(f"{canonical.dtype.kind}{canonical.dtype.itemsize}:{canonical.shape}:".encode())
    digest.update(canonical.tobytes())
    return f"sha256:{digest.hexdigest()}"


def pixels_unchanged(path: PathLike) -> bool | None:
    """Whether a file's pixels are still those its writer recorded in the provenance (`None`: no record).

    Raises:
        MedicalImageError: the file cannot be read.
    """
    record = read_provenance(path)
    expected = (record or {}).get(_DIGEST_KEY)
    if not expected:
        return None
    path, source_format = _open_path(path)
    if source_format not in ("png", "dicom", "nifti"):
        return None
    read_image(path)  # the guarded reader first: sizes, truncation and decoding are checked before the raw read
    try:
        if source_format == "png":
            with Image.open(path) as image:
                stored = np.asarray(image)
        elif source_format == "dicom":
            stored = _load_dicom(path).pixel_array
        else:
            stored = np.asanyarray(_load_nifti(path, canonical=False).dataobj)
    except Exception as e:  # a decoder's own error on a file read_image accepted: still the file's fault
        raise MedicalImageError(f"{path}: cannot read its stored pixels to check them: {e}") from e
    return pixel_digest(stored) == expected


# --------------------------------------------------------------------------------------------------
# Public writers
# --------------------------------------------------------------------------------------------------


def write_png(path: PathLike, array: Any, *, provenance: dict[str, Any], bit_depth: int = 8) -> None:
    """Write a synthetic image as PNG with its provenance in text chunks.

    Chunks: `medm2g:synthetic` = `"true"`, `medm2g:generator` = `"medm2g-diffusers <version>"`, one
    `medm2g:<key>` per provenance entry (non-strings as JSON), `medm2g:provenance` with the whole dict as
    JSON, and the standard `Software` and `Comment` keywords for generic viewers.

    Args:
        path (`str` or `os.PathLike`):
            Target file ending in `.png`; its directory must exist.
        array (array-like of shape `(height, width)`, `(height, width, 1)` or `(height, width, 3)`):
            Values in [0, 1]; RGB is written as 8-bit colour.
        provenance (`dict`):
            JSON-serialisable facts about how the image was made (e.g. `model`, `prompt`, `seed`); keys
            match `[A-Za-z0-9_.-]{1,64}`. `synthetic` and `generator` are always set by the writer.
        bit_depth (`int`, defaults to `8`):
            8 or 16 (grey only).
    """
    path = _target_path(path, (".png",))
    values = _validate_array(array, "array", ndims=(2, 3))
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim == 3 and values.shape[-1] != 3:
        raise ValueError(f"array must have shape (H, W), (H, W, 1) or (H, W, 3); got {values.shape}")
    if values.min() < 0.0 or values.max() > 1.0:
        raise ValueError(f"array values must lie in [0, 1]; got [{values.min():.4g}, {values.max():.4g}]")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16; got {bit_depth}")
    if bit_depth == 16 and values.ndim == 3:
        raise ValueError("bit_depth=16 supports grey images only (Pillow writes RGB PNGs as 8-bit)")
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    quantised = np.rint(values * (2**bit_depth - 1)).astype(dtype)
    info = provenance_pnginfo({**provenance, _DIGEST_KEY: pixel_digest(quantised)})
    with _atomic_target(path) as tmp:
        Image.fromarray(quantised).save(tmp, format="PNG", pnginfo=info)


def provenance_pnginfo(provenance: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """The PNG text chunks :func:`write_png` stores (see there), for any PNG writer."""
    record = _provenance_record(provenance)
    info = PngImagePlugin.PngInfo()
    for key, value in record.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        # add_text stores tEXt, switching to UTF-8 iTXt for values outside Latin-1.
        info.add_text(f"medm2g:{key}", text)
    info.add_itxt(_PROVENANCE_KEY, json.dumps(record, ensure_ascii=False))
    info.add_text("Software", record["generator"])
    info.add_text("Comment", _synthetic_sentence(record))
    return info


def tag_synthetic(image: Image.Image, provenance: dict[str, Any]) -> Image.Image:
    """Marks an in-memory PIL image as synthetic: ``image.info`` holds the provenance record, and a plain
    ``image.save("x.png")`` writes it as text chunks (Pillow's default ``encoderinfo``), as :func:`write_png` does.

    Returns the same image, for chaining.
    """
    record = _provenance_record({**provenance, _DIGEST_KEY: pixel_digest(np.asarray(image))})
    image.info.update({_PROVENANCE_KEY: json.dumps(record, ensure_ascii=False), "Comment": _synthetic_sentence(record)})
    image.encoderinfo = {"pnginfo": provenance_pnginfo(record)}
    return image


def write_dicom(
    path: PathLike,
    array: Any,
    *,
    modality: str,
    provenance: dict[str, Any],
    spacing: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Write a synthetic 2-D image as a DICOM Secondary Capture file.

    The file is a Secondary Capture Image (Conversion Type `SYN`, "synthetic image") in explicit VR
    little endian with freshly generated UIDs, Image Type `DERIVED\\SECONDARY`, Burned In Annotation
    `NO`, Series Description `SYNTHETIC - medm2g-diffusers ...`, an Image Comments sentence saying it is
    synthetic, and the provenance JSON in private block `MEDM2G_DIFFUSERS` (0011,1001). Patient fields
    hold `ANONYMOUS^SYNTHETIC` / `SYNTHETIC`; nothing else identifies anyone, because nothing but the
    pixel array and provenance comes in.

    Pixel encoding (all 16-bit MONOCHROME2):
    - `ct`: signed int16 with Rescale Slope 1 and Intercept -1024, so HU round-trip within 0.5 HU; the
      array must be in HU within [-33792, 31743].
    - `mri` (also `mri_t1`, `mri_t2`, ...): uint16, `round(array * 65535)`, no rescale (the MR IOD has
      none); read back as `"signal"`.
    - `xray`: uint16, `round(array * 65535)`, Modality `DX`; read back in [0, 1].

    Args:
        path (`str` or `os.PathLike`):
            Target file; its directory must exist. `.dcm` is customary but not required.
        array (array-like of shape `(height, width)`):
            HU for `ct`, [0, 1] otherwise.
        modality (`str`):
            `"ct"`, `"xray"`, `"mri"` or an MRI contrast key such as `"mri_t1"`.
        provenance (`dict`):
            As for :func:`write_png`; `modality` is added when absent.
        spacing (`tuple[float, float]`, defaults to `(1.0, 1.0)`):
            Pixel Spacing in mm along (rows, columns).
    """
    path = _target_path(path, None)
    family = "mri" if isinstance(modality, str) and modality.startswith("mri_") else modality
    if family not in _WRITE_MODALITIES:
        raise ValueError(f"modality must be one of ['ct', 'mri', 'mri_<contrast>', 'xray']; got {modality!r}")
    values = _validate_array(array, "array", ndims=(2,))
    row_spacing, column_spacing = _validate_spacing(spacing, (2,))
    record = _provenance_record({"modality": modality, **provenance})

    if family == "ct":
        stored = np.rint(values) - _CT_RESCALE_INTERCEPT
        if stored.min() < np.iinfo(np.int16).min or stored.max() > np.iinfo(np.int16).max:
            raise ValueError(
                f"array (HU) must lie in [-33792, 31743] to fit int16 storage; "
                f"got [{values.min():.1f}, {values.max():.1f}]"
            )
        pixels = stored.astype(np.int16)
    else:
        if values.min() < 0.0 or values.max() > 1.0:
            raise ValueError(
                f"array values must lie in [0, 1] for modality {modality!r}; "
                f"got [{values.min():.4g}, {values.max():.4g}]"
            )
        pixels = np.rint(values * 65535).astype(np.uint16)

    sop_instance_uid = pydicom.uid.generate_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = file_meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: prompts in the provenance may be any language
    ds.SOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.ImageType = ["DERIVED", "SECONDARY"]
    now = _dicom_now()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now
    ds.ContentDate, ds.ContentTime = now
    # Patient and study: fixed placeholders or empty (type 2), never values from a source image.
    ds.PatientName = "ANONYMOUS^SYNTHETIC"
    ds.PatientID = "SYNTHETIC"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = _WRITE_MODALITIES[family]
    ds.SeriesDescription = _dicom_text(" ".join(["SYNTHETIC - medm2g-diffusers", *_describe(record)]), 64)
    ds.ConversionType = "SYN"
    ds.SecondaryCaptureDeviceManufacturer = "medm2g-diffusers"
    ds.SecondaryCaptureDeviceSoftwareVersions = _package_version()
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = _dicom_text(_synthetic_sentence(record), 10240)
    ds.PixelSpacing = [format_number_as_ds(row_spacing), format_number_as_ds(column_spacing)]
    ds.set_pixel_data(pixels, photometric_interpretation="MONOCHROME2", bits_stored=16, generate_instance_uid=False)
    if family == "ct":
        ds.RescaleIntercept = _CT_RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 0  # the model's default CT window, [-1000, 1000] HU
        ds.WindowWidth = 2000
    record[_DIGEST_KEY] = pixel_digest(pixels)
    block = ds.private_block(_PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "UT", json.dumps(record, ensure_ascii=False))

    with _atomic_target(path) as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)


def write_nifti(
    path: PathLike,
    array: Any,
    *,
    provenance: dict[str, Any],
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> None:
    """Write a synthetic image or volume as NIfTI-1 (float32) with its provenance.

    The affine is `diag(spacing, 1)`: voxel axes run along +x, +y, +z (RAS+), origin at 0. A 2-D array is
    written as one slice of shape `(height, width, 1)`, which :func:`read_image` returns unchanged. The
    header description reads `synthetic medm2g-diffusers <version> ...` (80 bytes at most) and the
    provenance JSON sits in a `comment` extension (ecode 6) as `{"medm2g:provenance": {...}}`.

    Args:
        path (`str` or `os.PathLike`):
            Target file ending in `.nii` or `.nii.gz`; its directory must exist.
        array (array-like of shape `(height, width)`, `(i, j, k)` or `(i, j, k, t)`):
            Finite values in any units (HU for CT).
        provenance (`dict`):
            As for :func:`write_png`.
        spacing (`tuple[float, ...]`, defaults to `(1.0, 1.0, 1.0)`):
            Voxel size in mm along the spatial axes (2 or 3 values; a 2-D array's slice thickness
            defaults to 1 mm).
    """
    path = _target_path(path, (".nii", ".nii.gz"))
    values = _validate_array(array, "array", ndims=(2, 3, 4))
    zooms = _validate_spacing(spacing, (2, 3) if values.ndim == 2 else (3,))
    zooms = zooms + (1.0,) * (3 - len(zooms))
    if values.ndim == 2:
        values = values[:, :, np.newaxis]
    values = values.astype(np.float32)
    record = _provenance_record({**provenance, _DIGEST_KEY: pixel_digest(values)})

    image = nib.Nifti1Image(values, np.diag([*zooms, 1.0]))
    image.header.set_xyzt_units("mm", "sec")
    description = " ".join(["synthetic", record["generator"], *_describe(record)])
    image.header["descrip"] = description.encode("ascii", "replace")[:79]
    payload = json.dumps({_PROVENANCE_KEY: record}, ensure_ascii=False).encode("utf-8")
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", payload))

    with _atomic_target(path) as tmp:
        nib.save(image, tmp)


# --------------------------------------------------------------------------------------------------
# Path checks and format detection
# --------------------------------------------------------------------------------------------------


def _open_path(path: PathLike) -> tuple[Path, SourceFormat]:
    """Check that `path` is a readable, non-empty file and detect its format."""
    path = Path(path)
    if not path.exists():
        raise MedicalImageNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise MedicalImageError(f"{path} is a directory; pass one image file (DICOM series folders are not read)")
    size = path.stat().st_size
    if size == 0:
        raise MedicalImageError(f"{path} is empty (0 bytes)")
    try:
        with path.open("rb") as f:
            head = f.read(_NIFTI_HEADER_BYTES)
    except OSError as e:
        raise MedicalImageError(f"{path} cannot be opened: {e}") from e

    sniffed = _sniff_format(path, head)
    if sniffed is not None:
        return path, sniffed
    expected = _format_from_suffix(path)
    if expected == "dicom":
        raise MedicalImageError(f"{path} is not a DICOM file (missing preamble/DICM marker at byte 128)")
    if expected == "png":
        raise MedicalImageError(f"{path} is not a PNG file (missing PNG signature)")
    if expected == "jpeg":
        raise MedicalImageError(f"{path} is not a JPEG file (missing JPEG SOI marker)")
    if expected == "nifti":
        raise MedicalImageError(f"{path} is not a NIfTI file (no NIfTI-1/NIfTI-2 header, or a corrupt gzip stream)")
    suffix = path.suffix
    if suffix:
        raise MedicalImageError(
            f"{path} has unsupported file type {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    raise MedicalImageError(f"{path} is not a recognised image: no DICM marker, PNG/JPEG signature or NIfTI header")


def _sniff_format(path: Path, head: bytes) -> SourceFormat | None:
    """Detect the format from the first bytes (and, for gzip, the first decompressed bytes)."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_JPEG_SIGNATURE):
        return "jpeg"
    if _is_nifti_header(head):
        return "nifti"
    if head.startswith(_GZIP_SIGNATURE):
        try:
            with gzip.open(path, "rb") as f:
                inner = f.read(_NIFTI_HEADER_BYTES)
        except (OSError, EOFError, zlib.error):
            return None
        if _is_nifti_header(inner):
            return "nifti"
    return None


def _is_nifti_header(head: bytes) -> bool:
    """NIfTI-1: sizeof_hdr 348 and magic at 344; NIfTI-2: sizeof_hdr 540 and magic at 4 (either endianness)."""
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order) if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
            return True
        if size == 540 and len(head) >= 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
            return True
    return False


def _format_from_suffix(path: Path) -> SourceFormat | None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".dcm", ".dicom")):
        return "dicom"
    if name.endswith(".png"):
        return "png"
    if name.endswith((".jpg", ".jpeg")):
        return "jpeg"
    return None


def _check_size(path: Path, shape: tuple[int, ...], what: str) -> None:
    """Reject zero-size and implausibly large images from their header, before any pixel allocation."""
    if any(int(n) <= 0 for n in shape):
        raise MedicalImageError(f"{path} has a zero-size dimension: {what} {tuple(shape)}")
    if any(int(n) > MAX_SIDE for n in shape):
        raise MedicalImageError(
            f"{path} declares {what} {tuple(shape)}; a dimension above {MAX_SIDE} is refused as implausible"
        )
    if int(np.prod([int(n) for n in shape], dtype=np.int64)) > MAX_VOXELS:
        raise MedicalImageError(
            f"{path} declares {what} {tuple(shape)}; more than {MAX_VOXELS} values is refused as implausible"
        )


def _check_finite(path: Path, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise MedicalImageError(f"{path} contains NaN or infinite values")


def _to_float32(path: Path, array: np.ndarray) -> np.ndarray:
    """Cast finite values to float32, refusing any that overflow it (e.g. after a Rescale Intercept of 1e308)."""
    with np.errstate(over="ignore"):
        cast = array.astype(np.float32)
    if not np.isfinite(cast).all():
        raise MedicalImageError(f"{path} has pixel values beyond the float32 range after its rescale or LUT")
    return cast


def _check_index(path: Path, name: str, value: int, size: int, what: str) -> int:
    if not 0 <= value < size:
        raise ValueError(f"{name} must be in [0, {size - 1}] for {what} of {path}; got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------


def _read_dicom_image(path: Path, frame: int | None) -> MedicalImage:
    ds = _load_dicom(path)
    n_frames = _check_dicom_header(path, ds)
    index = n_frames // 2 if frame is None else _check_index(path, "frame", frame, n_frames, "the frames")
    # Decode only the chosen frame of a multi-frame file.
    raw = _decode_dicom(path, ds, index if n_frames > 1 else None)
    with _corrupt_header_is_an_error(path):
        array, units, modality, metadata = _dicom_intensities(path, ds, raw, index)
        spacing = _dicom_pixel_spacing(ds, index, metadata)
    metadata.update(number_of_frames=n_frames, frame=index)
    array = _to_float32(path, array)
    return MedicalImage(
        array=array,
        units=units,
        modality=modality,
        spacing=spacing,
        source_format="dicom",
        metadata=metadata,
    )


def _read_dicom_volume(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None, str]:
    ds = _load_dicom(path)
    n_frames = _check_dicom_header(path, ds)
    raw = _decode_dicom(path, ds, None)
    if n_frames == 1:
        raw = raw[np.newaxis]
    frames = []
    units = "signal"
    with _corrupt_header_is_an_error(path):
        for index in range(n_frames):
            array, units, _, _ = _dicom_intensities(path, ds, raw[index], index)
            frames.append(_to_float32(path, array))
        pixel_spacing = _dicom_pixel_spacing(ds, 0, {})
        frame_spacing = _dicom_frame_spacing(ds)
    spacing = None if pixel_spacing is None or frame_spacing is None else (frame_spacing, *pixel_spacing)
    return np.stack(frames), spacing, units


@contextmanager
def _corrupt_header_is_an_error(path: Path) -> Iterator[None]:
    """pydicom parses elements lazily, so a corrupt one fails only when read: report it as the file's fault."""
    try:
        yield
    except MedicalImageError:
        raise
    except Exception as e:
        raise MedicalImageError(f"{path} has corrupt or invalid header attributes: {e}") from e


class _ClampedReader:
    """A binary file whose ``read(n)`` never asks for more than the bytes left in it.

    ``BufferedReader.read(n)`` allocates ``n`` bytes before reading, so a corrupt length field (a DICOM
    element length, a PNG chunk length that Pillow skips with ``read``; up to 4 GiB) would otherwise
    allocate that much before pydicom or Pillow notices the file is shorter.
    """

    def __init__(self, file: Any, size: int):
        self._file, self._size = file, size

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return self._file.read()
        return self._file.read(max(0, min(n, self._size - self._file.tell())))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _load_dicom(path: Path, stop_before_pixels: bool = False) -> Dataset:
    try:
        with path.open("rb") as f:
            return pydicom.dcmread(_ClampedReader(f, path.stat().st_size), stop_before_pixels=stop_before_pixels)
    except Exception as e:
        raise MedicalImageError(f"{path} is a corrupt or truncated DICOM file: {e}") from e


def _check_dicom_header(path: Path, ds: Dataset) -> int:
    """Validate pixel-related header fields and return the number of frames."""
    if not any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise MedicalImageError(f"{path} has no pixel data")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        photometric = ds.get("PhotometricInterpretation")
    except Exception as e:  # includes pydicom's errors for corrupt, lazily parsed elements
        raise MedicalImageError(f"{path} has missing or invalid Rows/Columns/NumberOfFrames: {e}") from e
    _check_size(path, (n_frames, rows, columns, samples), "(frames, rows, columns, samples)")
    if photometric == "PALETTE COLOR":
        raise MedicalImageError(f"{path} uses PALETTE COLOR pixel data, which this reader does not support")
    return n_frames


def _decode_dicom(path: Path, ds: Dataset, index: int | None) -> np.ndarray:
    """Decode all frames (`index=None`) or one frame; raw stored values, YBR converted to RGB."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if not syntax or not isinstance(syntax, str):
        raise MedicalImageError(f"{path} has no (or an invalid) Transfer Syntax UID in its file meta information")
    syntax = pydicom.uid.UID(syntax)
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError, TypeError) as e:
        raise MedicalImageError(f"{path} uses transfer syntax {syntax.name!r}, which pydicom cannot decode") from e
    if not decoder.is_available:
        raise MedicalImageError(
            f"{path} holds compressed pixel data ({syntax.name}) and no installed plugin can decode it; "
            f"install one of: {'; '.join(decoder.missing_dependencies)}"
        )
    try:
        decoded = pixel_array(ds, index=index)
    except Exception as e:
        raise MedicalImageError(
            f"{path}: pixel data ({syntax.name}) could not be decoded, file truncated or corrupt? {e}"
        ) from e
    # pydicom turns surplus pixel bytes into extra frames; the header is what the caller was promised.
    samples = int(ds.get("SamplesPerPixel") or 1)
    n_frames = int(ds.get("NumberOfFrames") or 1)
    expected = ((n_frames,) if index is None and n_frames > 1 else ()) + (int(ds.Rows), int(ds.Columns))
    expected += (samples,) if samples > 1 else ()
    if decoded.shape != expected:
        raise MedicalImageError(
            f"{path}: decoded pixel data has shape {decoded.shape}, but its header (Rows, Columns, "
            f"NumberOfFrames, SamplesPerPixel) declares {expected}; the file is corrupt"
        )
    return decoded


def _frame_value(ds: Dataset, index: int, sequence: str, keyword: str) -> Any:
    """An attribute from the frame's functional groups (enhanced multi-frame), else the top level."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)


def _first(value: Any) -> float | None:
    """First value of a possibly multi-valued DICOM number, or None when absent or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return float(value[0]) if len(value) else None
    return float(value)


def _dicom_intensities(
    path: Path, ds: Dataset, raw: np.ndarray, index: int
) -> tuple[np.ndarray, str, str | None, dict[str, Any]]:
    """Map one frame of stored values to (array, units, modality, metadata); see the module docstring."""
    modality_tag = str(ds.get("Modality", "")).upper()
    modality = _DICOM_MODALITIES.get(modality_tag)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    metadata: dict[str, Any] = {
        "modality_tag": modality_tag or None,
        "photometric_interpretation": photometric,
        "bits_stored": bits_stored,
        "transfer_syntax": ds.file_meta.TransferSyntaxUID.name,
        "image_type": [str(value).strip() for value in ds.get("ImageType", [])],
    }

    if raw.ndim == 3:  # colour: (rows, columns, samples), already RGB
        grey = raw[..., :3].astype(np.float64) @ _LUMA_WEIGHTS / (2**bits_stored - 1)
        metadata["intensity_scaling"] = f"RGB -> BT.601 luma / (2**{bits_stored} - 1)"
        _check_finite(path, grey)
        return grey, "unit", modality, metadata

    values, low, high = _dicom_modality_lut(ds, raw, index, bits_stored, metadata)
    _check_finite(path, values)
    window = (_first(_frame_value(ds, index, "FrameVOILUTSequence", "WindowCenter")),
              _first(_frame_value(ds, index, "FrameVOILUTSequence", "WindowWidth")))
    if window[0] is not None and window[1] is not None:
        metadata["window_center"], metadata["window_width"] = window
    if "PixelPaddingValue" in ds:
        metadata["pixel_padding_value"] = float(ds.PixelPaddingValue)  # stored value, before rescale

    if modality == "ct":
        if "rescale_slope" not in metadata and "modality_lut" not in metadata:
            warnings.warn(f"{path}: CT without Rescale Slope/Intercept; stored values are taken as HU", stacklevel=4)
        return values, "HU", modality, metadata
    if modality != "xray":
        return values, "signal", modality, metadata

    voi_function = str(_frame_value(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper()
    if ds.get("VOILUTSequence"):
        display, lut_bits = _apply_lut(ds, ds.VOILUTSequence[0], values)
        display /= 2**lut_bits - 1
        metadata["intensity_scaling"] = f"VOI LUT / (2**{lut_bits} - 1)"
    elif window[0] is not None and window[1] is not None and window[1] >= 1:
        display = _apply_window(values, *window, voi_function)
        metadata["intensity_scaling"] = f"window {voi_function} center {window[0]:g} width {window[1]:g}"
    else:
        display = (values - low) / max(high - low, 1e-12)
        metadata["intensity_scaling"] = f"stored range [{low:g}, {high:g}] (Bits Stored {bits_stored})"
    display = np.clip(display, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        display = 1.0 - display  # MONOCHROME1: low values are white; invert so that bone is bright
        metadata["intensity_scaling"] += ", MONOCHROME1 inverted"
    return display, "unit", modality, metadata


def _dicom_modality_lut(
    ds: Dataset, raw: np.ndarray, index: int, bits_stored: int, metadata: dict[str, Any]
) -> tuple[np.ndarray, float, float]:
    """Apply the modality LUT or rescale; return values and the transformed range of possible stored values."""
    if raw.dtype.kind == "f":  # Float/Double Float Pixel Data carry real values already
        return raw.astype(np.float64), float(raw.min()), float(raw.max())
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    if ds.get("ModalityLUTSequence"):
        values, lut_bits = _apply_lut(ds, ds.ModalityLUTSequence[0], raw)
        metadata["modality_lut"] = True
        return values, 0.0, float(2**lut_bits - 1)
    slope = _first(_frame_value(ds, index, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first(_frame_value(ds, index, "PixelValueTransformationSequence", "RescaleIntercept"))
    values = raw.astype(np.float64)
    if slope is None or intercept is None:
        return values, float(low), float(high)
    metadata["rescale_slope"], metadata["rescale_intercept"] = slope, intercept
    rescale_type = _frame_value(ds, index, "PixelValueTransformationSequence", "RescaleType")
    if rescale_type:
        metadata["rescale_type"] = str(rescale_type)
    bounds = sorted((low * slope + intercept, high * slope + intercept))
    return values * slope + intercept, bounds[0], bounds[1]


def _apply_lut(ds: Dataset, item: Dataset, values: np.ndarray) -> tuple[np.ndarray, int]:
    """Look `values` up in a Modality or VOI LUT item (PS3.3 C.11.1 / C.11.2); return outputs and their bits.

    Written out rather than taken from pydicom 3.0, whose VOI lookup indexes with the LUT's own dtype
    and so wraps around for an 8-bit LUT with more than 256 entries.
    """
    n_entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):  # VR OW: 16-bit words in the transfer syntax's byte order
        data = np.frombuffer(data, dtype="<u2" if ds.file_meta.TransferSyntaxUID.is_little_endian else ">u2")
    lut = np.asarray(data, dtype=np.float64).reshape(-1)[: n_entries or 2**16]
    # Inputs below the first mapped value take the first entry, above the last take the last.
    index = np.clip(np.rint(values).astype(np.int64) - first_mapped, 0, lut.size - 1)
    return lut[index], bits


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 VOI window, output in [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return (values - center) / width + 0.5
    return (values - (center - 0.5)) / (width - 1.0) + 0.5


def _dicom_pixel_spacing(ds: Dataset, index: int, metadata: dict[str, Any]) -> tuple[float, float] | None:
    """(row, column) spacing in mm from Pixel Spacing, else Imager Pixel Spacing (detector plane)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _frame_value(ds, index, "PixelMeasuresSequence", keyword)
        spacing = _positive_pair(value)
        if spacing is not None:
            metadata["spacing_source"] = keyword
            return spacing
    return None


def _dicom_frame_spacing(ds: Dataset) -> float | None:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _first(_frame_value(ds, 0, "PixelMeasuresSequence", keyword))
        if value is not None and np.isfinite(value) and value > 0:
            return value
    return None


def _positive_pair(value: Any) -> tuple[float, float] | None:
    try:
        pair = (float(value[0]), float(value[1]))
    except (TypeError, IndexError, ValueError):
        return None
    return pair if all(np.isfinite(v) and v > 0 for v in pair) else None  # some files hold "0\0"


def _dicom_provenance(path: Path) -> dict[str, Any] | None:
    ds = _load_dicom(path, stop_before_pixels=True)
    with _corrupt_header_is_an_error(path):
        try:
            block = ds.private_block(_PRIVATE_GROUP, PRIVATE_CREATOR)
            return json.loads(block[0x01].value)
        except (KeyError, ValueError):
            pass  # private tags stripped (e.g. by de-identification): fall back to the standard marks
        series = str(ds.get("SeriesDescription", ""))
        comments = str(ds.get("ImageComments", ""))
    if series.startswith("SYNTHETIC") or comments.startswith("SYNTHETIC"):
        return {"synthetic": True, "series_description": series, "image_comments": comments}
    return None


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------


def _load_nifti(path: Path, canonical: bool) -> nib.Nifti1Image:
    """Load the header (data stays on disk) and validate its shape and data type."""
    _check_nifti_extensions(path)
    try:
        image = nib.load(path)
    except Exception as e:
        raise MedicalImageError(f"{path} has a corrupt NIfTI header: {e}") from e
    if not 2 <= len(image.shape) <= 4:
        raise MedicalImageError(f"{path} has {len(image.shape)} dimensions {image.shape}; only 2-D to 4-D are read")
    _check_size(path, image.shape, "shape")
    dtype = image.get_data_dtype()
    if dtype.kind not in "biuf":
        raise MedicalImageError(f"{path} stores {dtype} voxels; only real scalars are read")
    _check_nifti_length(path, int(image.header.get_data_offset()) + int(np.prod(image.shape)) * dtype.itemsize)
    if canonical:
        try:
            image = nib.as_closest_canonical(image)
        except Exception as e:
            raise MedicalImageError(f"{path} cannot be reoriented to RAS+: {e}") from e
    return image


def _check_nifti_extensions(path: Path) -> None:
    """Refuse a header extension that claims more bytes than the file holds, before nibabel reads it.

    nibabel reads each extension with ``read(esize)``, which allocates `esize` bytes (up to 2 GiB) before
    finding out the file is shorter. The records are walked as nibabel does (from the end of the header to
    `vox_offset`), seeking over the contents, so nothing is held in memory.
    """
    gz = _is_gzip(path)
    try:
        with (gzip.open(path, "rb") if gz else path.open("rb")) as f:
            head = f.read(_NIFTI_HEADER_BYTES + 4)
            for order in ("little", "big"):
                header_size = int.from_bytes(head[:4], order) if len(head) >= 4 else 0
                if header_size in (348, 540):
                    break
            else:
                return  # not a NIfTI header: nibabel reports it
            if len(head) < header_size + 4 or head[header_size] == 0:
                return  # no extensions
            prefix = "<" if order == "little" else ">"
            vox_offset = (struct.unpack_from(f"{prefix}f", head, 108) if header_size == 348
                          else struct.unpack_from(f"{prefix}q", head, 168))[0]
            position = header_size + 4
            on_disk = None if gz else path.stat().st_size
            f.seek(position)
            # As nibabel: extensions up to vox_offset, or to the end of the file when vox_offset lies before them.
            while (remaining := vox_offset - position) >= 16 or remaining < 0:
                record = f.read(8)
                if len(record) < 8:
                    return  # end of file, or a short extension header that nibabel reports
                esize = int.from_bytes(record[:4], order, signed=True)
                if esize < 8:
                    return  # nibabel reads at most to the end of the file, then reports it
                target = position + esize
                # A gzip stream seeks by decompressing and stops at its end; a plain file says its size.
                reached = f.seek(target) if gz else min(target, on_disk)
                if reached < target:
                    raise MedicalImageError(
                        f"{path} has a NIfTI header extension of {esize} bytes at byte {position}, "
                        f"which runs past the end of the file"
                    )
                f.seek(target)
                position = target
    except (OSError, EOFError, zlib.error) as e:
        raise MedicalImageError(f"{path} is a truncated or corrupt NIfTI file: {e}") from e


def _check_nifti_length(path: Path, expected: int) -> None:
    """Refuse a file shorter than its header promises.

    A truncated `.nii.gz` still yields the slices before the cut, so the whole stream is decompressed
    (and its CRC checked by `gzip`) in 1 MiB chunks, never held in memory. A stream that goes on far past
    what the header declares (a decompression bomb: a small upload that inflates to many GB) is refused as
    soon as it does, instead of being read to the end.
    """
    if _is_gzip(path):
        available = 0
        limit = 2 * expected + 2**20  # generous: some writers pad; the header's size is already bounded
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(2**20):
                    available += len(chunk)
                    if available > limit:
                        raise MedicalImageError(
                            f"{path} decompresses to more than {limit} bytes while its header declares {expected}: "
                            "refused as a possible decompression bomb"
                        )
        except (OSError, EOFError, zlib.error) as e:
            raise MedicalImageError(f"{path} is a truncated or corrupt gzip stream: {e}") from e
    else:
        available = path.stat().st_size
    if available < expected:
        raise MedicalImageError(
            f"{path} is truncated: its header needs {expected} bytes, the file holds {available}"
        )


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == _GZIP_SIGNATURE


def _nifti_spatial_zooms(path: Path, image: nib.Nifti1Image) -> tuple[list[float] | None, str]:
    """Spatial voxel sizes in mm (None unless all are positive) and the unit the header declared."""
    try:
        unit = image.header.get_xyzt_units()[0]
    except KeyError as e:
        raise MedicalImageError(f"{path} has an invalid xyzt_units code in its NIfTI header: {e}") from e
    factor = {"meter": 1000.0, "micron": 0.001}.get(unit, 1.0)  # "mm" and "unknown" (assumed mm)
    zooms = [float(z) * factor for z in image.header.get_zooms()[: min(len(image.shape), 3)]]
    return (zooms if all(np.isfinite(z) and z > 0 for z in zooms) else None), unit


def _read_nifti_image(path: Path, *, slice_index: int | None, axis: int, volume: int, canonical: bool) -> MedicalImage:
    image = _load_nifti(path, canonical)
    shape = image.shape
    zooms, unit = _nifti_spatial_zooms(path, image)
    try:
        codes = nib.aff2axcodes(image.affine)
    except Exception as e:  # NaN/inf or degenerate qform/sform: the SVD of the affine fails
        raise MedicalImageError(f"{path} has an invalid orientation (qform/sform affine) in its NIfTI header: {e}") from e
    index: list[int | slice] = [slice(None)] * len(shape)
    metadata: dict[str, Any] = {"shape": tuple(shape), "canonical": canonical, "spatial_unit": unit}
    if len(shape) == 4:
        index[3] = _check_index(path, "volume", volume, shape[3], "the volumes")
        metadata["volume"] = volume
    elif volume != 0:
        raise ValueError(f"volume must be 0 for the {len(shape)}-D file {path}; got {volume}")

    if len(shape) == 2:
        if slice_index not in (None, 0):
            raise ValueError(f"{path} is a 2-D NIfTI image, so slice_index must be None or 0; got {slice_index}")
        kept = [0, 1]
    else:
        if not -3 <= axis <= 2:
            raise ValueError(f"axis must be a spatial axis in [-3, 2]; got {axis}")
        spatial_axis = axis % 3
        n_slices = shape[spatial_axis]
        k = n_slices // 2 if slice_index is None else _check_index(
            path, "slice_index", slice_index, n_slices, f"axis {spatial_axis}"
        )
        index[spatial_axis] = k
        kept = [a for a in range(3) if a != spatial_axis]
        metadata.update(axis=spatial_axis, slice_index=k)

    try:
        array = np.asarray(image.dataobj[tuple(index)], dtype=np.float32)
    except Exception as e:
        raise MedicalImageError(f"{path}: image data could not be read, file truncated or corrupt? {e}") from e
    _check_finite(path, array)
    metadata["axis_codes"] = tuple(codes[a] for a in kept)  # anatomical direction of (rows, columns)
    return MedicalImage(
        array=array,
        units="signal",
        modality=None,
        spacing=None if zooms is None else (zooms[kept[0]], zooms[kept[1]]),
        source_format="nifti",
        metadata=metadata,
    )


def _read_nifti_volume(path: Path, *, canonical: bool) -> tuple[np.ndarray, tuple[float, ...] | None, str]:
    image = _load_nifti(path, canonical)
    try:
        array = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as e:
        raise MedicalImageError(f"{path}: image data could not be read, file truncated or corrupt? {e}") from e
    _check_finite(path, array)
    zooms, _ = _nifti_spatial_zooms(path, image)
    if zooms is not None and array.ndim == 4:
        zooms.append(float(image.header.get_zooms()[3]))
    return array, None if zooms is None else tuple(zooms), "signal"


def _nifti_provenance(path: Path) -> dict[str, Any] | None:
    image = _load_nifti(path, canonical=False)
    for extension in image.header.extensions:
        if extension.get_code() != 6:  # "comment"
            continue
        try:
            content = json.loads(extension.get_content())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(content, dict) and isinstance(content.get(_PROVENANCE_KEY), dict):
            return content[_PROVENANCE_KEY]
    description = image.header["descrip"].item().decode("utf-8", "replace")
    if description.startswith("synthetic medm2g-diffusers"):
        return {"synthetic": True, "description": description}
    return None


# --------------------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------------------


def _read_pillow_image(path: Path, source_format: SourceFormat) -> MedicalImage:
    try:
        with path.open("rb") as f, Image.open(_ClampedReader(f, path.stat().st_size)) as image:
            # .size comes from the header; nothing is decoded before this check.
            _check_size(path, (image.size[1], image.size[0]), "(height, width)")
            image.load()
            array, bit_depth, conversion = _pillow_to_grey(path, image)
            mode = image.mode
    except MedicalImageError:
        raise
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, struct.error) as e:
        # Pillow raises OSError for truncated data, SyntaxError for some broken chunks and struct.error for
        # chunks too short for their fields (e.g. an empty tRNS).
        raise MedicalImageError(f"{path} is a corrupt or truncated {source_format.upper()} file: {e}") from e
    metadata: dict[str, Any] = {"mode": mode, "bit_depth": bit_depth}
    if conversion:
        metadata["grey_conversion"] = conversion
    return MedicalImage(
        array=array.astype(np.float32),
        units="unit",
        modality=None,
        spacing=None,
        source_format=source_format,
        metadata=metadata,
    )


def _pillow_to_grey(path: Path, image: Image.Image) -> tuple[np.ndarray, int, str | None]:
    """Grey values in [0, 1] from any Pillow mode, with the bit depth used and how colour was reduced."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=np.float64), 1, None
    if mode == "L":
        return np.asarray(image, dtype=np.float64) / 255.0, 8, None
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.float64) / 65535.0, 16, None
    if mode == "I":  # 32-bit container that some Pillow versions use for 16-bit grey PNGs
        values = np.asarray(image).astype(np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise MedicalImageError(f"{path} holds 32-bit integer pixels outside the 16-bit range")
        return values / 65535.0, 16, None
    if mode in ("LA", "La"):
        return np.asarray(image.getchannel(0), dtype=np.float64) / 255.0, 8, "alpha channel dropped"
    try:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    except ValueError as e:
        raise MedicalImageError(f"{path} has unsupported pixel mode {mode!r}") from e
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0] / 255.0, 8, f"{mode} with identical channels -> grey (exact)"
    return rgb @ _LUMA_WEIGHTS / 255.0, 8, f"{mode} -> BT.601 luma (0.299 R + 0.587 G + 0.114 B)"


def _png_provenance(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f, Image.open(_ClampedReader(f, path.stat().st_size)) as image:
            text = dict(getattr(image, "text", {}))  # reads the chunks after IDAT too
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, struct.error) as e:
        raise MedicalImageError(f"{path} is a corrupt or truncated PNG file: {e}") from e
    if _PROVENANCE_KEY in text:
        try:
            return json.loads(text[_PROVENANCE_KEY])
        except ValueError:
            pass  # edited by hand or by another tool: use the individual keys
    marks = {key.removeprefix("medm2g:"): value for key, value in text.items() if key.startswith("medm2g:")}
    if not marks:
        return None
    marks.pop("provenance", None)
    if marks.get("synthetic") == "true":
        marks["synthetic"] = True
    return marks


# --------------------------------------------------------------------------------------------------
# Writer helpers
# --------------------------------------------------------------------------------------------------


def _target_path(path: PathLike, suffixes: tuple[str, ...] | None) -> Path:
    path = Path(path)
    if suffixes is not None and not path.name.lower().endswith(suffixes):
        raise ValueError(f"path must end with one of {list(suffixes)}; got {path.name!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist (needed to write {path.name})")
    return path


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and move it over `path` atomically.

    The temporary name ends with the target's name so that suffix-driven writers (nibabel's `.nii.gz`)
    behave the same; a failed write leaves no partial file behind.
    """
    tmp = path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}")
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _validate_array(array: Any, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    try:
        values = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array; got {type(array).__name__}") from e
    if values.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions; got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"{name} is empty; got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return values


def _validate_spacing(spacing: Any, lengths: tuple[int, ...]) -> tuple[float, ...]:
    expected = f"{' or '.join(map(str, lengths))} positive numbers (mm)"
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spacing must be {expected}; got {spacing!r}") from e
    if len(values) not in lengths or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be {expected}; got {spacing!r}")
    return values


def _package_version() -> str:
    try:
        return importlib.metadata.version("medm2g-diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"  # running from a source tree that was never installed


def _provenance_record(provenance: dict[str, Any]) -> dict[str, Any]:
    """The stored provenance: `synthetic` and `generator` set by us, then the caller's entries."""
    if not isinstance(provenance, dict):
        raise ValueError(f"provenance must be a dict; got {type(provenance).__name__}")
    for key in provenance:
        if not isinstance(key, str) or not _PROVENANCE_KEY_PATTERN.fullmatch(key):
            raise ValueError(f"provenance keys must match [A-Za-z0-9_.-]{{1,64}}; got {key!r}")
    record = {"synthetic": True, "generator": f"medm2g-diffusers {_package_version()}"}
    record.update({k: v for k, v in provenance.items() if k not in record})
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"provenance must be JSON-serialisable: {e}") from e
    return record


def _describe(record: dict[str, Any]) -> list[str]:
    """Short words that identify what made the image: modality and model, when known."""
    return [str(record[key]) for key in ("modality", "model") if record.get(key)]


def _synthetic_sentence(record: dict[str, Any]) -> str:
    made_by = f"SYNTHETIC image generated by {record['generator']}"
    if record.get("model"):
        made_by += f" (model: {record['model']})"
    return made_by + ". Not a real patient; not for clinical use."


def _dicom_now() -> tuple[str, str]:
    now = datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _dicom_text(text: str, max_chars: int) -> str:
    """Truncate to a DICOM value length limit (LO: 64, LT: 10240 characters)."""
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."

