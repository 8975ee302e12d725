"""DICOM bytes -> pixel arrays and safe metadata. The pipeline's only module that imports pydicom.

`decode_dicom` turns the bytes of one file (any transfer syntax pydicom and the installed
pylibjpeg / pyjpegls plugins decode) into a display-ready grayscale image in [0, 1] plus
metadata free of patient identifiers, and turns every kind of bad input into a
`DicomError` with a stable `reason`. (The synthetic archive's writer is
`echo_ray.synth.dicom_writer`.)
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    get_decoder,
    pixel_array,
)
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from echo_ray.config.schema import RADIOGRAPH_MODALITIES

logger = logging.getLogger(__name__)

DICOM_ERROR_REASONS = (
    "not_dicom",
    "truncated",
    "no_pixel_data",
    "unsupported_transfer_syntax",
    "absurd_dimensions",
    "non_radiograph_modality",
    "decode_failed",
)


class DicomError(ValueError):
    """The one error type for bad DICOM input.

    Attributes:
        reason: a stable short code, one of `DICOM_ERROR_REASONS`; str(err) is a sentence
            a user can act on. Neither ever contains patient identifiers.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in DICOM_ERROR_REASONS:
            raise ValueError(f"unknown DicomError reason {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DicomImage:
    """A decoded radiograph.

    Attributes:
        pixels: float32 (size, size) (or native (H, W) when size=None) in [0, 1], 0 = black
            (air) as a radiologist views it, whatever the file's photometric interpretation.
        meta: safe metadata; see `read_header` for the keys.
    """

    pixels: np.ndarray
    meta: dict


def read_header(data: bytes, *, include_phi: bool = False) -> dict:
    """Safe metadata of a DICOM file, without reading its pixel data.

    Keys (always present, None when absent): study_instance_uid, series_instance_uid,
    sop_instance_uid, modality, view_position, photometric_interpretation, rows, columns,
    bits_allocated, bits_stored, transfer_syntax (UID string), transfer_syntax_name,
    num_frames, first_frame_only (True when `decode_dicom` would use only the first of
    several frames), accession_number (the order's AccessionNumber: it identifies an
    examination, so it is never logged), study_date (StudyDate with StudyTime as ISO 8601
    "YYYY-MM-DD" or "YYYY-MM-DDTHH:MM:SS", local time of the acquiring site; None when
    StudyDate is absent or malformed). With include_phi=True also patient_name,
    patient_id, patient_birth_date.

    Raises:
        DicomError: not_dicom or truncated (the header ends early).
    """
    return _safe_meta(_parse(data, stop_before_pixels=True), include_phi)


def decode_dicom(
    data: bytes,
    *,
    size: int | None = 256,
    max_dimension: int = 8192,
    modalities: Collection[str] | None = RADIOGRAPH_MODALITIES,
    include_phi: bool = False,
) -> DicomImage:
    """Decode a DICOM file into a display-ready grayscale image in [0, 1].

    Pipeline: first frame only -> Modality LUT (or RescaleSlope/Intercept) -> VOI LUT, else
    the first WindowCenter/Width (LINEAR, LINEAR_EXACT or SIGMOID), else min-max -> [0, 1]
    -> MONOCHROME1 inversion -> aspect-preserving area-averaging resize, letterboxed with 0.
    Colour images become luminance (meta["color_converted"] = True) scaled by their bit
    depth (palette colour: min-max).

    Args:
        data: the file's bytes. Files without the 128-byte preamble are accepted when they
            start with a group 0002 or 0008 element (a raw dataset, as some PACS exports
            write); anything else without "DICM" at offset 128 is not DICOM.
        size: side of the square output; None keeps the native resolution.
        max_dimension: larger Rows or Columns are rejected before decoding (memory guard).
        modalities: accepted Modality values (case-insensitive); None accepts any.
        include_phi: also put patient name, ID and birth date in meta.

    Returns:
        The image and its safe metadata (`read_header`'s keys plus color_converted and
        voi, which names the intensity mapping used: "voi_lut", "window", "min_max", or
        "bit_depth" for colour images).

    Raises:
        DicomError: for any bad input, never another exception type.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive int or None, got {size}")
    ds = _parse(data, stop_before_pixels=False)
    try:
        meta = _safe_meta(ds, include_phi)
        if modalities is not None:
            _check_modality(meta["modality"], modalities)
        arr, voi, color = _decode_pixels(ds, meta, max_dimension)
        meta["voi"], meta["color_converted"] = voi, color
    except DicomError:
        raise
    except Exception as exc:  # any failure on bad bytes becomes a DicomError
        raise DicomError(
            "decode_failed", f"could not decode the image ({type(exc).__name__}: {exc})"
        ) from exc
    if meta["first_frame_only"]:
        logger.warning(
            "multi-frame image (%d frames): decoded the first frame only", meta["num_frames"]
        )
    if size is not None:
        arr = _letterbox(arr, size)
    return DicomImage(pixels=arr, meta=meta)


class _ReadTracker(BytesIO):
    """BytesIO that remembers whether a read came back short.

    pydicom stops silently at the end of a truncated file (returning a partial dataset or
    a shortened value), so short reads are the only reliable sign of truncation.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.short_read = False

    def read(self, n: int | None = -1, /) -> bytes:
        pos = self.tell()
        out = super().read(n)
        if n is not None and 0 <= len(out) < n:
            # The element loop ends by asking for the next 8-byte tag at EOF; that, or
            # trailing NUL padding some writers append, is a clean end of file.
            clean_end = n == 8 and not self.getbuffer()[pos:].tobytes().strip(b"\0")
            self.short_read |= not clean_end
        return out


def _parse(data: bytes, *, stop_before_pixels: bool) -> Dataset:
    """Parse the bytes into a Dataset, classifying failures as not_dicom or truncated."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if data[128:132] != b"DICM":
        if not _starts_like_raw_dataset(data):
            raise DicomError(
                "not_dicom",
                f"not a DICOM file ({len(data):,} bytes without the 'DICM' marker at offset "
                "128): check that the input is a .dcm file and not an image export or archive",
            )
        data = bytes(128) + b"DICM" + data  # pydicom wants a preamble; the meta is optional
    fp = _ReadTracker(data)
    try:
        ds = dcmread(fp, stop_before_pixels=stop_before_pixels)
    except zlib.error as exc:
        raise DicomError(
            "truncated",
            f"the deflated dataset cannot be inflated ({exc}): the file is truncated or corrupt",
        ) from exc
    except Exception as exc:  # pydicom raises many types on garbage
        if fp.short_read:
            raise _truncated_error() from exc
        raise DicomError(
            "not_dicom",
            f"the DICOM header cannot be parsed ({type(exc).__name__}: {exc}): the file is "
            "corrupt or not DICOM",
        ) from exc
    if fp.short_read:
        raise _truncated_error()
    if not _get(ds.file_meta, "TransferSyntaxUID"):
        # No file meta: the decoders need the transfer syntax pydicom inferred when parsing.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return ds


def _starts_like_raw_dataset(data: bytes) -> bool:
    """Whether preamble-less bytes open with a file meta (0002) or identifying (0008)
    group element, in either byte order: the only raw datasets worth trying to parse."""
    if len(data) < 8:
        return False
    return int.from_bytes(data[:2], "little") in (2, 8) or data[:2] == b"\x00\x08"


def _truncated_error() -> DicomError:
    return DicomError(
        "truncated",
        "the file ends before its last DICOM element does: it is truncated (an interrupted "
        "copy or download?) or its header is corrupt; fetch it again",
    )


def _get(ds: Dataset, keyword: str) -> Any:
    """The element's value, or None when absent, empty or unreadable (corrupt bytes)."""
    try:
        value = ds.get(keyword)
    except Exception:  # a corrupt optional element must not stop decoding
        return None
    return None if value is None or value == "" else value


def _as_int(value: Any) -> int | None:
    try:
        return int(value[0] if isinstance(value, MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _as_float(value: Any) -> float | None:
    try:
        out = float(value[0] if isinstance(value, MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return out if np.isfinite(out) else None


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value).strip() or None


def header_bytes(data: bytes) -> bytes:
    """The file's dataset less its pixel data, as DICOM Part 10 bytes (explicit VR little
    endian): what a Structured Report about the image needs (patient, study, series and
    instance attributes), at a few KB instead of the whole image. Holds patient identifiers:
    never logged, never written to the job outputs.

    Raises:
        DicomError: not_dicom or truncated.
    """
    import io

    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _parse(data, stop_before_pixels=True)
    for tag in [t for t in ds.keys() if t.group == 0x7FE0 or t.group >> 8 == 0x60]:
        del ds[tag]  # pixel data (float, double) and overlays: stop_before_pixels keeps none
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    # the encoding named: save_as refuses to turn a big endian file (explicit VR big endian,
    # retired but still written) into little endian
    dcmwrite(buffer, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


def patient_id(data: bytes) -> str | None:
    """The PatientID of a DICOM file (None when absent), for an output an operator asked
    to carry it (the bulk job's FHIR `subject` reference); never logged.

    Raises:
        DicomError: not_dicom or truncated (the header ends early).
    """
    return _raw_text(_parse(data, stop_before_pixels=True), "PatientID")


def _raw_text(ds: Dataset, keyword: str) -> str | None:
    """A text element's value decoded from its raw bytes, or None when absent or empty.

    pydicom's value conversion validates the value and its warning quotes it; identifiers
    (AccessionNumber, PatientID) must never reach a log, so they are decoded here with
    the dataset's character set instead.
    """
    try:
        elem = ds.get_item(keyword)
        value = None if elem is None else elem.value
        if isinstance(value, bytes | bytearray):
            encodings = convert_encodings(_get(ds, "SpecificCharacterSet"))
            value = decode_bytes(bytes(value), encodings, set())
    except Exception:  # a corrupt optional element must not stop decoding
        return None
    if value is None:
        return None
    text = str(value[0] if isinstance(value, MultiValue) else value).strip(" \0")
    return text or None


def _study_date(date: str | None, time: str | None) -> str | None:
    """StudyDate (DA: YYYYMMDD) and StudyTime (TM: HH[MM[SS[.F]]]) as ISO 8601; the date
    alone when the time is absent or malformed; None without a valid date."""
    digits = (date or "").replace(".", "")  # YYYY.MM.DD: an ACR-NEMA form still seen
    try:
        day = datetime.strptime(digits, "%Y%m%d").date()
    except ValueError:
        return None
    clock = (time or "").replace(":", "").split(".")[0]
    if len(clock) not in (2, 4, 6) or not clock.isdigit():
        return day.isoformat()
    hh, mm, ss = int(clock[:2]), int(clock[2:4] or 0), int(clock[4:6] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        return day.isoformat()
    return f"{day.isoformat()}T{hh:02d}:{mm:02d}:{min(ss, 59):02d}"


def _safe_meta(ds: Dataset, include_phi: bool) -> dict:
    ts = _get(ds.file_meta, "TransferSyntaxUID")
    num_frames = _as_int(_get(ds, "NumberOfFrames")) or 1
    meta = {
        "study_instance_uid": _as_str(_get(ds, "StudyInstanceUID")),
        "series_instance_uid": _as_str(_get(ds, "SeriesInstanceUID")),
        "sop_instance_uid": _as_str(_get(ds, "SOPInstanceUID")),
        "modality": _as_str(_get(ds, "Modality")),
        "view_position": _as_str(_get(ds, "ViewPosition")),
        "photometric_interpretation": _as_str(_get(ds, "PhotometricInterpretation")),
        "rows": _as_int(_get(ds, "Rows")),
        "columns": _as_int(_get(ds, "Columns")),
        "bits_allocated": _as_int(_get(ds, "BitsAllocated")),
        "bits_stored": _as_int(_get(ds, "BitsStored")),
        "transfer_syntax": None if ts is None else str(ts),
        "transfer_syntax_name": None if ts is None else UID(ts).name,
        "num_frames": num_frames,
        "first_frame_only": num_frames > 1,
        "accession_number": _raw_text(ds, "AccessionNumber"),
        "study_date": _study_date(_raw_text(ds, "StudyDate"), _raw_text(ds, "StudyTime")),
    }
    # pydicom converts (and validates, which can log the value) an element only when it is
    # accessed, so without include_phi patient identifiers are never even decoded.
    if include_phi:
        meta["patient_name"] = _as_str(_get(ds, "PatientName"))
        meta["patient_id"] = _as_str(_get(ds, "PatientID"))
        meta["patient_birth_date"] = _as_str(_get(ds, "PatientBirthDate"))
    return meta


def _check_modality(modality: str | None, modalities: Collection[str]) -> None:
    accepted = {m.upper() for m in modalities}
    if modality is None or modality.upper() not in accepted:
        found = "no Modality" if modality is None else f"Modality {modality!r}"
        raise DicomError(
            "non_radiograph_modality",
            f"the file has {found}, not one of {sorted(accepted)}: it is not a radiograph; "
            "pass modalities=None to decode it anyway",
        )


def _decode_pixels(ds: Dataset, meta: dict, max_dimension: int) -> tuple[np.ndarray, str, bool]:
    """Validate the image header, decode the first frame and map it to [0, 1].

    Returns:
        (H, W) float32 image in [0, 1] (bright = dense), the VOI mapping used, and whether
        the image was converted from colour.
    """
    if "PixelData" not in ds:
        other = "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
        raise DicomError(
            "no_pixel_data",
            "the file has only float pixel data, which radiographs never use"
            if other
            else "the file has no Pixel Data element (a report, presentation state or other "
            "non-image object, or an image file cut short before its pixels)",
        )
    rows, columns, frames = meta["rows"], meta["columns"], meta["num_frames"]
    if not rows or not columns or rows < 0 or columns < 0 or frames < 1:
        raise DicomError(
            "absurd_dimensions",
            f"the header gives Rows={rows}, Columns={columns}, NumberOfFrames={frames}: "
            "an image needs positive values; the file is corrupt",
        )
    if max(rows, columns) > max_dimension:
        raise DicomError(
            "absurd_dimensions",
            f"the image is {rows:,} x {columns:,} pixels, larger than max_dimension="
            f"{max_dimension:,}: the header is corrupt, or raise max_dimension",
        )
    bits_allocated = meta["bits_allocated"]
    samples = _as_int(_get(ds, "SamplesPerPixel")) or 1
    photometric = (meta["photometric_interpretation"] or "MONOCHROME2").upper()
    if bits_allocated not in (1, 8, 16, 32) or samples not in (1, 3):
        raise DicomError(
            "decode_failed",
            f"unsupported pixel layout (BitsAllocated={bits_allocated}, "
            f"SamplesPerPixel={samples}): expected 8-32 bit grayscale or RGB",
        )
    ts = UID(meta["transfer_syntax"])
    _check_decoder(ts)
    if not ts.is_encapsulated:
        # YBR_FULL_422 stores 2 samples per pixel (Y Y Cb Cr for each pixel pair).
        per_pixel = 2 if photometric == "YBR_FULL_422" else samples
        needed = -(-rows * columns * frames * per_pixel * bits_allocated // 8)  # ceil
        have = len(ds.PixelData)
        if have < needed:
            raise DicomError(
                "truncated",
                f"pixel data has {have:,} bytes but Rows x Columns x frames needs {needed:,}: "
                "the file is truncated or its header is wrong",
            )
    try:
        arr = pixel_array(ds, index=0)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # codecs raise anything; Rust ones (RLE) even panic
        # (pyo3's PanicException is a BaseException, so `except Exception` misses it).
        detail = " ".join(str(exc).split())[:300]  # plugin errors span several lines
        raise DicomError(
            "decode_failed",
            f"the {ts.name} pixel data cannot be decoded ({type(exc).__name__}: {detail}): "
            f"the file is corrupt, or its header ({rows} x {columns} pixels, "
            f"{bits_allocated}-bit, {samples} sample(s)) does not match the encoded image",
        ) from exc

    if photometric == "PALETTE COLOR":
        # Min-max, not the LUT's nominal depth: 16-bit LUTs often hold 8-bit values, and
        # pydicom 3.0.2 reads pydicom-data's OBXXXX1A.dcm and its big-endian copy into
        # LUT outputs that differ by a byte swap, so the depth is unreliable.
        luma = _min_max(_luminance(apply_color_lut(arr, ds), 1.0))
        return luma.astype(np.float32), "min_max", True
    if samples == 3:
        # pydicom returns RGB for YBR_* input (its default colour conversion).
        max_value = float(2 ** (meta["bits_stored"] or bits_allocated) - 1)
        luma = np.clip(_luminance(arr, max_value), 0.0, 1.0)
        return luma.astype(np.float32), "bit_depth", True
    values = apply_modality_lut(arr, ds).astype(np.float64)
    image, voi = _apply_voi(values, ds)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32), voi, False


def _check_decoder(ts: UID) -> None:
    label = f"{ts.name} ({ts})" if ts.name != ts else str(ts)  # unknown UIDs name themselves
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DicomError(
            "unsupported_transfer_syntax",
            f"transfer syntax {label} has no pixel decoder in pydicom: convert the file "
            "(e.g. `dcmconv +te` or `gdcmconv --raw`) to an uncompressed syntax",
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DicomError(
            "unsupported_transfer_syntax",
            f"transfer syntax {label} needs a decoder that is not installed: install {missing}",
        )


def _luminance(rgb: np.ndarray, max_value: float) -> np.ndarray:
    """ITU-R BT.601 luma of an (H, W, 3) RGB array, divided by `max_value`."""
    return (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / max_value


def _apply_voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """Map modality-LUT output to [0, 1] by the VOI LUT, the first window, or min-max."""
    lut = _get(ds, "VOILUTSequence")
    if lut:
        little_endian = ds.original_encoding[1] is not False
        return _voi_lut(values, lut[0], little_endian), "voi_lut"
    center = _as_float(_get(ds, "WindowCenter"))
    width = _as_float(_get(ds, "WindowWidth"))
    function = (_as_str(_get(ds, "VOILUTFunction")) or "LINEAR").upper()
    if center is not None and width is not None:
        windowed = _window(values, center, width, function)
        if windowed is not None:
            return windowed, "window"
    return _min_max(values), "min_max"


def _voi_lut(values: np.ndarray, item: Dataset, little_endian: bool) -> np.ndarray:
    """Apply the first VOI LUT (PS3.3 C.11.2.1.1), output scaled by its nominal depth.

    Not pydicom's `apply_voi`: it indexes through an array of the LUT's output dtype, so an
    8-bit LUT with more than 256 entries wraps around.
    """
    nr_entries, first_map, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):  # VR OW: 16-bit words in the dataset's byte order
        table = np.frombuffer(data, dtype="<u2" if little_endian else ">u2")
    else:
        table = np.atleast_1d(np.asarray(data))
    table = table[: nr_entries or 2**16].astype(np.float64)  # 0 entries means 65536
    index = np.clip(np.rint(values) - first_map, 0, len(table) - 1).astype(np.int64)
    return np.clip(table[index] / (2**bits - 1), 0.0, 1.0)


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi > lo:
        return (values - lo) / (hi - lo)
    return np.zeros_like(values)  # a constant image has no contrast to stretch


def _window(x: np.ndarray, c: float, w: float, function: str) -> np.ndarray | None:
    """PS3.3 C.11.2.1.2 windowing onto [0, 1]; None when the width is invalid for it."""
    if function == "SIGMOID":
        if w <= 0:
            return None
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700.0, 700.0)))
    if function == "LINEAR_EXACT":
        if w <= 0:
            return None
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    # LINEAR (also the fallback for unknown functions, as viewers do).
    if w < 1:
        return None
    if w == 1:  # a threshold at c - 0.5
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def _letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio and pad with 0 (black) to (size, size)."""
    h, w = image.shape  # (H, W)
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        # BOX is exact area averaging when shrinking; it would be blocky when enlarging.
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
        image = np.asarray(pil.resize((new_w, new_h), resample), dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = np.clip(image, 0.0, 1.0)
    return out
