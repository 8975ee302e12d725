"""Pixel arrays -> DICOM bytes, for the synthetic archive and the tests.

`write_dicom` encodes one grayscale image as a complete DICOM Part 10 file in any of
`TRANSFER_SYNTAXES` (pinned encoder plugins, so the bytes do not depend on which optional
encoders are installed); `make_uid` derives stable UIDs. Decoding is `echo_ray.data.dicom`.
"""

from __future__ import annotations

import hashlib
import uuid
from io import BytesIO

import numpy as np
from pydicom.datadict import keyword_dict
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

# Short name -> transfer syntax UID that `write_dicom` can produce (all also decode).
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "explicit_be": ExplicitVRBigEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg_ls": JPEGLSLossless,
    "jpeg2000_lossless": JPEG2000Lossless,
    "jpeg2000": JPEG2000,
}
LOSSLESS_TRANSFER_SYNTAXES = frozenset(
    {"explicit_le", "implicit_le", "explicit_be", "deflated", "rle", "jpeg_ls", "jpeg2000_lossless"}
)

# Encoder plugin per compressed syntax: pinning it makes output independent of which
# optional encoders happen to be installed.
_ENCODING_PLUGINS: dict[str, str] = {
    "rle": "pydicom",
    "jpeg_ls": "pyjpegls",
    "jpeg2000_lossless": "pylibjpeg",
    "jpeg2000": "pylibjpeg",
}
# Lossy JPEG 2000 compression ratio: visually lossless for radiographs, still clearly lossy.
_J2K_LOSSY_RATIO = 10.0
# pylibjpeg-openjpeg always encodes 6 wavelet resolutions, which needs 2**5 pixels a side.
_J2K_MIN_SIDE = 32

_SOP_CLASSES = {
    "DX": UID("1.2.840.10008.5.1.4.1.1.1.1"),  # Digital X-Ray Image Storage - For Presentation
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),  # Computed Radiography Image Storage
}
_SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/echo-ray/echo-ray")


def make_uid(*entropy: object) -> str:
    """Deterministic DICOM UID from the given entropy values (same inputs -> same UID).

    The values' `str()` forms name a version-5 (SHA-1, name-based) UUID, written under the
    "2.25." root that turns a UUID into a UID without a registered organisation prefix.
    (pydicom's `generate_uid(prefix=None, ...)` ignores its entropy, hence this helper.)
    """
    name = "\x1f".join(map(str, entropy))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def write_dicom(
    pixels: np.ndarray,
    *,
    transfer_syntax: str = "explicit_le",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    attrs: dict[str, object] | None = None,
) -> bytes:
    """Encode one grayscale image as a complete DICOM Part 10 file and return its bytes.

    Args:
        pixels: (H, W) or (F, H, W) stored values, written as-is. uint8/uint16 (or
            int8/int16, written with PixelRepresentation 1); every value must fit in
            `bits_stored` bits.
        transfer_syntax: a key of `TRANSFER_SYNTAXES`. JPEG 2000 needs H, W >= 32.
        photometric: "MONOCHROME2" or "MONOCHROME1". Values are not inverted here: for
            MONOCHROME1 the caller passes already-inverted values.
        bits_stored: 8..16; BitsAllocated is 8 if bits_stored <= 8 else 16.
        attrs: DICOM keyword -> value, applied last so they override the defaults
            (Modality "DX" picks DX Image Storage, "CR" CR Image Storage). Missing UIDs
            are derived from the pixel content, so identical inputs give identical bytes.

    Raises:
        ValueError: bad arguments (unknown syntax or keyword, values out of range, ...).
    """
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(
            f"unknown transfer_syntax {transfer_syntax!r}; "
            f"choose one of {sorted(TRANSFER_SYNTAXES)}"
        )
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be in 8..16, got {bits_stored}")
    arr = np.asarray(pixels)
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise ValueError(f"pixels must be a non-empty (H, W) or (F, H, W) array, got {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16, np.int8, np.int16):
        raise ValueError(f"pixels must be uint8/uint16/int8/int16, got {arr.dtype}")
    bits_allocated = 8 if bits_stored <= 8 else 16
    if arr.dtype.itemsize * 8 > bits_allocated:
        raise ValueError(f"{arr.dtype} pixels need bits_stored > 8, got {bits_stored}")
    signed = arr.dtype.kind == "i"
    lo = -(2 ** (bits_stored - 1)) if signed else 0
    hi = lo + 2**bits_stored - 1
    if arr.min() < lo or arr.max() > hi:
        raise ValueError(
            f"pixel values span [{arr.min()}, {arr.max()}], outside [{lo}, {hi}] for "
            f"bits_stored={bits_stored}"
        )
    attrs = dict(attrs or {})
    unknown = sorted(k for k in attrs if k not in keyword_dict)
    if unknown:
        raise ValueError(f"unknown DICOM keywords in attrs: {unknown}")

    num_frames = arr.shape[0] if arr.ndim == 3 else 1
    rows, columns = arr.shape[-2:]
    if transfer_syntax.startswith("jpeg2000") and min(rows, columns) < _J2K_MIN_SIDE:
        raise ValueError(
            f"JPEG 2000 needs images at least {_J2K_MIN_SIDE} pixels on each side, got "
            f"{rows} x {columns}: use another transfer_syntax for tiny images"
        )
    # Native pixel data is always little endian in memory; big endian is handled below.
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    native = np.ascontiguousarray(arr.astype(dtype))
    digest = hashlib.sha256(native.tobytes()).hexdigest()
    modality = str(attrs.get("Modality", "DX"))
    study_uid = str(attrs.get("StudyInstanceUID") or make_uid("study", digest))
    series_uid = str(attrs.get("SeriesInstanceUID") or make_uid("series", study_uid))
    sop_uid = str(attrs.get("SOPInstanceUID") or make_uid("sop", series_uid, digest))
    sop_class = _SOP_CLASSES.get(modality, _SECONDARY_CAPTURE)

    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20000101"
    ds.StudyTime = "000000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "echo-ray"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "Anonymous"
    ds.PatientID = "0"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if num_frames > 1:
        ds.NumberOfFrames = num_frames
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = native.tobytes()

    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
    if ts_uid.is_compressed:
        kwargs: dict[str, object] = {}
        if transfer_syntax == "jpeg2000":
            kwargs["j2k_cr"] = [_J2K_LOSSY_RATIO]
            # Part 3 C.7.6.1.1.5: lossy files must say so (pydicom's compress() does not).
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = _J2K_LOSSY_RATIO
            ds.LossyImageCompressionMethod = "ISO_15444_1"
        ds.compress(
            ts_uid,
            native,
            encoding_plugin=_ENCODING_PLUGINS[transfer_syntax],
            generate_instance_uid=False,
            **kwargs,
        )
    elif ts_uid == ExplicitVRBigEndian and bits_allocated == 16:
        # pydicom writes OW bytes verbatim, so big-endian words must be swapped by us.
        ds.PixelData = native.astype(dtype.newbyteorder(">")).tobytes()

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts_uid
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
