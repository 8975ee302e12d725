"""echo_ray.data.dicom: the intensity pipeline, resizing, real files, PHI, and bad input.

Real radiographs come from the pydicom-data package (installed as `data_store`), found on
disk without network; pydicom's own bundled test files cover the transfer syntaxes.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers.images import ramp
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset

import echo_ray.data.dicom as dicom
from echo_ray.config.schema import RADIOGRAPH_MODALITIES
from echo_ray.data.dicom import DICOM_ERROR_REASONS, DicomError, decode_dicom, read_header
from echo_ray.synth.dicom_writer import TRANSFER_SYNTAXES, make_uid, write_dicom

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _pydicom_data_dir() -> Path | None:
    # pydicom-data installs a top-level `data_store` package; its files sit in data/.
    # (pydicom.data.get_testdata_file would try the network first.)
    spec = importlib.util.find_spec("data_store")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data"
    return path if (path / "RG1_UNCR.dcm").is_file() else None


PYDICOM_DATA = _pydicom_data_dir()
needs_pydicom_data = pytest.mark.skipif(
    PYDICOM_DATA is None, reason="pydicom-data (the `test` extra) is not installed"
)

PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN-4711", "PatientBirthDate": "19610203"}
PHI_STRINGS = ("Doe", "Jane", "MRN-4711", "19610203")


def _file(name: str) -> bytes:
    path = PYDICOM_FILES / name
    if not path.is_file():
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return path.read_bytes()


def _reason(data: bytes, **kwargs) -> str:
    with pytest.raises(DicomError) as info:
        decode_dicom(data, **kwargs)
    return info.value.reason


def _rewrite(data: bytes, edit) -> bytes:
    """Apply `edit(ds)` to a parsed file and serialise it again."""
    ds = pydicom.dcmread(io.BytesIO(data))
    edit(ds)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


# --------------------------------------------------------------------------- intensity pipeline


@pytest.mark.parametrize("syntax", ["explicit_le", "rle", "jpeg2000_lossless"])
def test_monochrome1_decodes_like_inverted_monochrome2(syntax: str):
    img = ramp()
    mono2 = decode_dicom(write_dicom(img, transfer_syntax=syntax), size=None).pixels
    mono1 = write_dicom(4095 - img, transfer_syntax=syntax, photometric="MONOCHROME1")
    np.testing.assert_allclose(decode_dicom(mono1, size=None).pixels, mono2, atol=1e-6)
    # Also through a window: MONOCHROME1 windows apply to stored values, before inversion.
    window = {"VOILUTFunction": "LINEAR_EXACT", "WindowWidth": 1000}
    a = write_dicom(img, attrs={**window, "WindowCenter": 1000})
    b = write_dicom(4095 - img, photometric="MONOCHROME1", attrs={**window, "WindowCenter": 3095})
    np.testing.assert_allclose(
        decode_dicom(a, size=None).pixels, decode_dicom(b, size=None).pixels, atol=1e-6
    )


def test_linear_window_clips_outside_and_is_monotonic():
    img = ramp()
    out = decode_dicom(write_dicom(img, attrs={"WindowCenter": 2000, "WindowWidth": 1000}))
    assert out.meta["voi"] == "window"
    native = decode_dicom(
        write_dicom(img, attrs={"WindowCenter": 2000, "WindowWidth": 1000}), size=None
    ).pixels
    assert np.all(native[img <= 1499] == 0.0) and np.all(native[img >= 2500] == 1.0)
    order = np.argsort(img, axis=None)
    assert np.all(np.diff(native.ravel()[order]) >= 0)


def test_linear_exact_window_matches_the_standard_formula():
    img = ramp()
    attrs = {"WindowCenter": 1500, "WindowWidth": 800, "VOILUTFunction": "LINEAR_EXACT"}
    out = decode_dicom(write_dicom(img, attrs=attrs), size=None).pixels
    expected = np.clip((img.astype(float) - 1500) / 800 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_sigmoid_window():
    img = ramp()
    attrs = {"WindowCenter": 2048, "WindowWidth": 512, "VOILUTFunction": "SIGMOID"}
    out = decode_dicom(write_dicom(img, attrs=attrs), size=None).pixels
    expected = 1 / (1 + np.exp(-4 * (img - 2048.0) / 512))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert 0 < out.min() and out.max() < 1  # a sigmoid never clips


def test_rescale_slope_intercept_is_applied_before_the_window():
    img = ramp()
    exact = {"VOILUTFunction": "LINEAR_EXACT"}
    # Window in rescaled units (2x - 1000) equals the window mapped back to stored values.
    rescaled = write_dicom(
        img,
        attrs={**exact, "RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 2000,
               "WindowWidth": 3000},
    )  # fmt: skip
    plain = write_dicom(img, attrs={**exact, "WindowCenter": 1500, "WindowWidth": 1500})
    np.testing.assert_allclose(
        decode_dicom(rescaled, size=None).pixels, decode_dicom(plain, size=None).pixels, atol=1e-6
    )


def test_first_of_several_window_values_is_used():
    img = ramp()
    multi = write_dicom(img, attrs={"WindowCenter": [1000, 3000], "WindowWidth": [500, 100]})
    single = write_dicom(img, attrs={"WindowCenter": 1000, "WindowWidth": 500})
    np.testing.assert_array_equal(decode_dicom(multi).pixels, decode_dicom(single).pixels)


def test_invalid_window_width_falls_back_to_min_max():
    out = decode_dicom(write_dicom(ramp(), attrs={"WindowCenter": 100, "WindowWidth": 0}))
    assert out.meta["voi"] == "min_max"
    assert out.pixels.max() == pytest.approx(1.0)


@pytest.mark.parametrize("bits", [8, 12])
def test_voi_lut_sequence_is_applied(bits: int):
    img = ramp(bits=bits)
    entries = 2**bits
    index = img.astype(np.int64)
    item = Dataset()
    item.LUTDescriptor = [entries, 0, 8]  # 8-bit output; 4096 entries used to wrap in pydicom
    item.add_new("LUTData", "US", [255 - i * 256 // entries for i in range(entries)])
    data = write_dicom(img, bits_stored=bits, attrs={"VOILUTSequence": [item]})
    out = decode_dicom(data, size=None)
    assert out.meta["voi"] == "voi_lut"
    np.testing.assert_allclose(out.pixels, (255 - index * 256 // entries) / 255.0, atol=1e-6)


@needs_pydicom_data
def test_voi_lut_of_a_real_file_matches_pydicom():
    data = (PYDICOM_DATA / "vlut_04.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    depth = ds.VOILUTSequence[0].LUTDescriptor[2]
    expected = pydicom.pixels.apply_voi(ds.pixel_array, ds) / (2**depth - 1)
    out = decode_dicom(data, size=None, modalities=None).pixels
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_signed_pixels():
    img = ramp().astype(np.int16) - 2048
    ds = pydicom.dcmread(io.BytesIO(write_dicom(img)))
    assert ds.PixelRepresentation == 1
    out = decode_dicom(write_dicom(img), size=None).pixels
    expected = (img - float(img.min())) / (float(img.max()) - img.min())
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_constant_image_decodes_to_finite_zeros():
    out = decode_dicom(write_dicom(np.full((20, 30), 700, np.uint16)))
    assert np.isfinite(out.pixels).all() and not out.pixels.any()


# --------------------------------------------------------------------------- resize


def test_letterbox_keeps_aspect_ratio_and_pads_with_black():
    img = np.full((100, 50), 4095, np.uint16)
    img[0, 0] = 0  # so min-max maps (almost) everything to white
    out = decode_dicom(write_dicom(img), size=64).pixels
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert not out[:, :16].any() and not out[:, 48:].any()  # 64 x 32 content, centred
    assert out[1:, 16:48].min() > 0.99


def test_downsampling_averages_areas():
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    out = decode_dicom(write_dicom(checker, bits_stored=8), size=32).pixels
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


def test_upsampling_and_native_size():
    img = ramp(12, 16)
    up = decode_dicom(write_dicom(img), size=64).pixels
    assert up.shape == (64, 64) and 0 <= up.min() and up.max() <= 1
    assert not up[:8].any() and not up[56:].any()  # 48 x 64 content
    assert decode_dicom(write_dicom(img), size=None).pixels.shape == (12, 16)


# --------------------------------------------------------------------------- multi-frame, colour


def test_multiframe_uses_first_frame_and_says_so(caplog):
    frames = np.stack([ramp(), 4095 - ramp(), np.zeros_like(ramp())])
    data = write_dicom(frames, transfer_syntax="rle", attrs=PHI)
    with caplog.at_level(logging.WARNING, logger="echo_ray.data.dicom"):
        out = decode_dicom(data, size=None)
    first = decode_dicom(write_dicom(frames[0]), size=None)
    np.testing.assert_array_equal(out.pixels, first.pixels)
    assert out.meta["num_frames"] == 3 and out.meta["first_frame_only"] is True
    assert first.meta["num_frames"] == 1 and first.meta["first_frame_only"] is False
    assert "first frame" in caplog.text and "3 frames" in caplog.text
    assert not any(s in caplog.text for s in PHI_STRINGS)


@pytest.mark.parametrize("name", ["SC_rgb_small_odd.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_colour_becomes_luminance(name: str):
    data = _file(name)
    rgb = pydicom.dcmread(io.BytesIO(data)).pixel_array.astype(float)  # YBR -> RGB too
    out = decode_dicom(data, size=None, modalities=None)
    assert out.meta["color_converted"] is True and out.pixels.shape == rgb.shape[:2]
    np.testing.assert_allclose(out.pixels, rgb @ [0.299, 0.587, 0.114] / 255, atol=1e-5)


def test_palette_colour_becomes_stretched_luminance():
    out = decode_dicom(_file("examples_palette.dcm"), modalities=None)
    assert out.meta["color_converted"] is True and out.meta["voi"] == "min_max"
    assert out.pixels.max() == pytest.approx(1.0, abs=0.05) and out.pixels.std() > 0.01


def test_rgb_rle_multiframe():
    out = decode_dicom(_file("SC_rgb_rle_2frame.dcm"), modalities=None, size=None)
    single = decode_dicom(_file("SC_rgb_rle.dcm"), modalities=None, size=None)
    np.testing.assert_array_equal(out.pixels, single.pixels)
    assert out.meta["first_frame_only"] and out.meta["color_converted"]


# --------------------------------------------------------------------------- pydicom's files

MR_SMALL_LOSSLESS = [
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", MR_SMALL_LOSSLESS)
def test_lossless_variants_of_mr_small_decode_identically(name: str):
    reference = decode_dicom(_file("MR_small.dcm"), modalities=None, size=None)
    out = decode_dicom(_file(name), modalities=None, size=None)
    np.testing.assert_array_equal(out.pixels, reference.pixels)
    assert out.meta["modality"] == "MR" and out.meta["transfer_syntax_name"]
    assert _reason(_file(name)) == "non_radiograph_modality"


@pytest.mark.parametrize(
    "name, syntax",
    [
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
        ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
        ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70"),
        ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81"),
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
        ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
    ],
)
def test_other_bundled_syntaxes_decode(name: str, syntax: str):
    data = _file(name)
    out = decode_dicom(data, modalities=None)
    assert out.meta["transfer_syntax"] == syntax
    assert out.pixels.shape == (256, 256) and out.pixels.dtype == np.float32
    assert 0 <= out.pixels.min() and out.pixels.max() <= 1 and out.pixels.std() > 0.01


def test_preamble_less_files():
    data = write_dicom(ramp(), attrs=PHI)
    reference = decode_dicom(data).pixels
    # File meta without the 128-byte preamble and "DICM".
    np.testing.assert_array_equal(decode_dicom(data[132:]).pixels, reference)
    # A bare dataset (no file meta at all): the transfer syntax is inferred.
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.file_meta
    raw = io.BytesIO()
    ds.save_as(raw, implicit_vr=True, little_endian=True)
    np.testing.assert_array_equal(decode_dicom(raw.getvalue()).pixels, reference)
    # pydicom's RT plan without meta parses, and has no pixels.
    assert _reason(_file("ExplVR_BigEndNoMeta.dcm"), modalities=None) == "no_pixel_data"


# --------------------------------------------------------------------------- real radiographs


@pytest.fixture(scope="module")
def rg1() -> dict[str, bytes]:
    if PYDICOM_DATA is None:
        pytest.skip("pydicom-data (the `test` extra) is not installed")
    return {k: (PYDICOM_DATA / f"RG1_{k}.dcm").read_bytes() for k in ("UNCR", "J2KR", "J2KI")}


@pytest.fixture(scope="module")
def rg1_native(rg1) -> np.ndarray:
    return decode_dicom(rg1["UNCR"], size=None).pixels


@needs_pydicom_data
def test_rg1_lossless_jpeg2000_is_identical(rg1, rg1_native):
    np.testing.assert_array_equal(decode_dicom(rg1["J2KR"], size=None).pixels, rg1_native)


@needs_pydicom_data
def test_rg1_lossy_jpeg2000_is_close(rg1, rg1_native):
    lossy = decode_dicom(rg1["J2KI"], size=None).pixels
    assert not np.array_equal(lossy, rg1_native)
    assert np.abs(lossy - rg1_native).mean() < 0.01


@needs_pydicom_data
def test_rg1_monochrome1_is_inverted_through_its_window(rg1, rg1_native):
    ds = pydicom.dcmread(io.BytesIO(rg1["UNCR"]))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    linear = np.clip((ds.pixel_array - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(rg1_native, 1 - linear, atol=1e-6)


@needs_pydicom_data
def test_rg1_looks_like_a_chest_radiograph(rg1):
    out = decode_dicom(rg1["UNCR"])
    img = out.pixels
    assert img.shape == (256, 256) and img.dtype == np.float32
    assert 0 <= img.min() and img.max() <= 1
    # 1955 x 1841 letterboxed: 7 black columns either side.
    assert not img[:, :7].any() and not img[:, -7:].any() and img[:, 7:-7].mean() > 0.5
    mediastinum, right_lung, left_lung = (
        img[60:140, 118:138],
        img[70:130, 55:95],
        img[70:130, 160:200],
    )
    assert mediastinum.mean() > right_lung.mean() + 0.15
    assert mediastinum.mean() > left_lung.mean() + 0.15
    meta = out.meta
    assert (meta["modality"], meta["view_position"], meta["rows"], meta["columns"]) == (
        "CR",
        "PA",
        1955,
        1841,
    )
    assert meta["modality"] in RADIOGRAPH_MODALITIES and meta["voi"] == "window"


@needs_pydicom_data
def test_rg1_header_phi_only_on_request(rg1):
    meta = read_header(rg1["J2KR"])
    assert meta["transfer_syntax_name"] == "JPEG 2000 Image Compression (Lossless Only)"
    assert "patient_name" not in meta and "RG1" not in repr(meta)
    with_phi = read_header(rg1["J2KR"], include_phi=True)
    assert with_phi["patient_name"] == "CompressedSamples^RG1"
    assert {"patient_id", "patient_birth_date"} <= with_phi.keys()


# --------------------------------------------------------------------------- metadata and PHI

SAFE_KEYS = {
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "modality",
    "view_position",
    "photometric_interpretation",
    "rows",
    "columns",
    "bits_allocated",
    "bits_stored",
    "transfer_syntax",
    "transfer_syntax_name",
    "num_frames",
    "first_frame_only",
    "accession_number",
    "study_date",
}


def test_header_keys_are_always_present():
    ds = Dataset()  # a minimal object: everything optional is absent
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = make_uid("bare")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    meta = read_header(buf.getvalue())
    assert set(meta) == SAFE_KEYS
    assert meta["sop_instance_uid"] == make_uid("bare") and meta["modality"] is None
    assert meta["num_frames"] == 1 and meta["first_frame_only"] is False

    data = write_dicom(ramp(), attrs={"ViewPosition": "PA", **PHI})
    assert set(decode_dicom(data).meta) == SAFE_KEYS | {"voi", "color_converted"}
    assert read_header(data)["rows"] == 48 and read_header(data)["view_position"] == "PA"


def test_phi_never_leaks_unless_asked(caplog, recwarn):
    frames = np.stack([ramp(), ramp()])
    data = write_dicom(frames, attrs=PHI)
    broken = [
        data[: len(data) - 100],  # truncated
        write_dicom(ramp(), attrs={**PHI, "Modality": "CT"}),
        _rewrite(data, lambda ds: setattr(ds, "Rows", 0)),
        _rewrite(data, lambda ds: delattr(ds, "PixelData")),
    ]
    with caplog.at_level(logging.DEBUG):
        texts = [repr(decode_dicom(data).meta), repr(read_header(data))]
        for bad in broken:
            with pytest.raises(DicomError) as info:
                decode_dicom(bad)
            texts.append(str(info.value))
    texts += [caplog.text, *(str(w.message) for w in recwarn)]
    for text in texts:
        assert not any(s in text for s in PHI_STRINGS), text
    meta = decode_dicom(data, include_phi=True).meta
    assert (meta["patient_name"], meta["patient_id"], meta["patient_birth_date"]) == (
        "Doe^Jane",
        "MRN-4711",
        "19610203",
    )


# --------------------------------------------------------------------------- bad input


def test_dicom_error_reasons_are_checked():
    assert DicomError("truncated", "x").reason == "truncated"
    assert isinstance(DicomError("truncated", "x"), ValueError)
    with pytest.raises(ValueError, match="unknown DicomError reason"):
        DicomError("oops", "x")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (300, 200), 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [b"", b"DICM", bytes(range(256)) * 4, np.random.default_rng(0).bytes(5000), _png()],
    ids=["empty", "magic-only", "counting", "random", "png"],
)
def test_not_dicom(data: bytes):
    assert _reason(data) == "not_dicom"
    with pytest.raises(DicomError) as info:
        read_header(data)
    assert info.value.reason == "not_dicom" and "not a DICOM file" in str(info.value)


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
def test_truncation_anywhere_is_reported(syntax: str):
    data = write_dicom(ramp(), transfer_syntax=syntax)
    cuts = [140, 300, len(data) // 2 + 500, len(data) - 50, len(data) - 1]
    if syntax != "deflated":  # around the Pixel Data element header
        pixel_tag = data.index(
            b"\x7f\xe0\x00\x10" if syntax == "explicit_be" else b"\xe0\x7f\x10\x00"
        )
        cuts += [pixel_tag - 3, pixel_tag + 5, pixel_tag + 40]
    for cut in cuts:
        assert _reason(data[:cut]) == "truncated", cut
    for cut in range(0, 132, 20):  # inside the preamble: nothing DICOM-like is left
        assert _reason(data[:cut]) == "not_dicom", cut


def test_truncated_pixel_data_message_is_actionable():
    data = write_dicom(ramp())
    with pytest.raises(DicomError) as info:
        decode_dicom(data[:-1000])
    assert "truncated" in str(info.value)
    # The header is intact, so read_header still works (it never reads pixels).
    assert read_header(data[:-1000])["rows"] == 48


def test_pydicom_truncated_sample():
    assert _reason(_file("MR_truncated.dcm"), modalities=None) == "truncated"


def test_no_pixel_data():
    data = _rewrite(write_dicom(ramp()), lambda ds: delattr(ds, "PixelData"))
    with pytest.raises(DicomError) as info:
        decode_dicom(data)
    assert info.value.reason == "no_pixel_data" and "Pixel Data" in str(info.value)


@pytest.mark.parametrize("syntax", ["explicit_le", "implicit_le", "explicit_be", "deflated"])
@pytest.mark.parametrize("rows", [49, 96, 4000])
def test_header_claiming_more_pixels_than_stored_is_truncated(syntax: str, rows: int):
    data = _rewrite(
        write_dicom(ramp(), transfer_syntax=syntax), lambda ds: setattr(ds, "Rows", rows)
    )
    with pytest.raises(DicomError) as info:
        decode_dicom(data)
    assert info.value.reason == "truncated"
    assert f"needs {rows * 64 * 2:,}" in str(info.value) and "6,144 bytes" in str(info.value)


@pytest.mark.parametrize("syntax", ["rle", "jpeg_ls", "jpeg2000_lossless"])
def test_header_disagreeing_with_compressed_data_fails_cleanly(syntax: str):
    data = _rewrite(
        write_dicom(ramp(), transfer_syntax=syntax), lambda ds: setattr(ds, "Rows", 96)
    )
    with pytest.raises(DicomError) as info:
        decode_dicom(data)
    assert info.value.reason == "decode_failed" and "96 x 64" in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda ds: setattr(ds, "Rows", 0),
        lambda ds: setattr(ds, "Columns", 0),
        lambda ds: setattr(ds, "Rows", 60000),
        lambda ds: setattr(ds, "Columns", 9000),
        lambda ds: delattr(ds, "Rows"),
    ],
    ids=["rows-0", "columns-0", "rows-huge", "columns-huge", "rows-missing"],
)
def test_absurd_dimensions(edit):
    assert _reason(_rewrite(write_dicom(ramp()), edit)) == "absurd_dimensions"


def test_max_dimension_is_configurable():
    data = write_dicom(ramp())
    assert _reason(data, max_dimension=32) == "absurd_dimensions"
    assert decode_dicom(data, max_dimension=64).pixels.shape == (256, 256)


def test_modality_filter():
    ct = write_dicom(ramp(), attrs={"Modality": "CT"})
    with pytest.raises(DicomError) as info:
        decode_dicom(ct)
    assert info.value.reason == "non_radiograph_modality" and "'CT'" in str(info.value)
    assert decode_dicom(ct, modalities=None).meta["modality"] == "CT"
    assert decode_dicom(ct, modalities=["ct"]).pixels.shape == (256, 256)
    no_modality = _rewrite(write_dicom(ramp()), lambda ds: delattr(ds, "Modality"))
    assert _reason(no_modality) == "non_radiograph_modality"
    for modality in RADIOGRAPH_MODALITIES:
        decode_dicom(write_dicom(ramp(), attrs={"Modality": modality}))


def test_unknown_transfer_syntax():
    def set_mpeg2(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML

    with pytest.raises(DicomError) as info:
        decode_dicom(_rewrite(write_dicom(ramp(), transfer_syntax="jpeg2000"), set_mpeg2))
    assert info.value.reason == "unsupported_transfer_syntax" and "MPEG2" in str(info.value)


def test_missing_decoder_plugin_is_named(monkeypatch):
    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr(dicom, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(DicomError) as info:
        decode_dicom(write_dicom(ramp(), transfer_syntax="jpeg2000_lossless"))
    assert info.value.reason == "unsupported_transfer_syntax"
    assert "JPEG 2000" in str(info.value) and "install pylibjpeg-openjpeg" in str(info.value)


@pytest.mark.parametrize("syntax", ["rle", "jpeg_ls", "jpeg2000_lossless", "jpeg2000"])
def test_corrupt_codestream_is_decode_failed(syntax: str):
    data = write_dicom(ramp(), transfer_syntax=syntax)
    # Overwrite the first fragment's payload (after the offset table item) in place.
    start = data.index(b"\xfe\xff\x00\xe0", data.index(b"\xfe\xff\x00\xe0") + 8) + 8
    corrupt = data[:start] + bytes(len(data) - start - 8) + data[-8:]
    assert _reason(corrupt) == "decode_failed"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damage it meets
def test_header_byte_flips_raise_only_dicom_errors():
    data = write_dicom(ramp(), attrs=PHI)
    pixel_tag = data.index(b"\xe0\x7f\x10\x00")
    rng = random.Random(1)
    for _ in range(100):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(132, pixel_tag + 12)] = rng.randrange(256)
        _decode_or_dicom_error(bytes(mutated))


def _decode_or_dicom_error(data: bytes) -> None:
    try:
        out = decode_dicom(data)
    except DicomError as err:
        assert err.reason in DICOM_ERROR_REASONS
        assert not any(s in str(err) for s in PHI_STRINGS)
    else:
        assert out.pixels.shape == (256, 256) and np.isfinite(out.pixels).all()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_files_raise_only_dicom_errors():
    """Random flips, cuts, deletions and insertions: decode or a DicomError, nothing else."""
    rng = random.Random(0)
    bases = [
        write_dicom(ramp(32, 40), transfer_syntax=syntax, attrs=PHI)
        for syntax in sorted(TRANSFER_SYNTAXES)
    ]
    for i in range(400):
        data = bytearray(bases[i % len(bases)])
        kind, pos = rng.random(), rng.randrange(len(data))
        if kind < 0.5:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind < 0.7:
            del data[pos:]
        elif kind < 0.85:
            del data[pos : pos + rng.randint(1, 16)]
        else:
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        _decode_or_dicom_error(bytes(data))


def test_accession_number_and_study_date_are_read_and_never_logged(caplog, recwarn):
    attrs = {**PHI, "AccessionNumber": "ACC2024053100042", "StudyDate": "20240531",
             "StudyTime": "142310.5"}
    data = write_dicom(ramp(), attrs=attrs)
    with caplog.at_level(logging.DEBUG):
        meta = decode_dicom(data).meta
        header = read_header(data)
        assert dicom.patient_id(data) == "MRN-4711"  # read only when asked for
    assert meta["accession_number"] == header["accession_number"] == "ACC2024053100042"
    assert meta["study_date"] == header["study_date"] == "2024-05-31T14:23:10"
    date_only = read_header(write_dicom(ramp(), attrs={**attrs, "StudyTime": ""}))
    assert date_only["study_date"] == "2024-05-31"
    # Values pydicom would reject with a warning that quotes them: read, never logged.
    odd = {"AccessionNumber": "ACC-0123456789-LONG", "StudyDate": "2024-05-31x",
           "StudyTime": "25"}
    odd_data = write_dicom(ramp(), attrs={**PHI, **odd})
    recwarn.clear()  # the writer's own warnings and log lines
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        header = read_header(odd_data)
        decode_dicom(odd_data)
    assert header["accession_number"] == "ACC-0123456789-LONG"
    assert header["study_date"] is None  # a malformed date is no date
    logged = [caplog.text, *(str(w.message) for w in recwarn)]
    assert not any(s in text for text in logged for s in (
        "ACC2024053100042", "ACC-0123456789-LONG", "MRN-4711", "2024-05-31x")), logged
    bare = read_header(write_dicom(ramp(), attrs={"AccessionNumber": ""}))
    assert bare["accession_number"] is None


@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_header_bytes_keep_every_attribute_but_the_pixels_in_explicit_little_endian(syntax):
    data = write_dicom(ramp(), transfer_syntax=syntax,
                       attrs={"PatientName": "Doe^Jane", "PatientID": "P123"})
    source = pydicom.dcmread(io.BytesIO(data))
    header = pydicom.dcmread(io.BytesIO(dicom.header_bytes(data)))
    assert str(header.file_meta.TransferSyntaxUID) == pydicom.uid.ExplicitVRLittleEndian
    assert "PixelData" not in header and "PixelData" in source
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                    "PatientName", "PatientID", "Rows", "Columns", "Modality"):
        assert header[keyword].value == source[keyword].value, keyword
    with pytest.raises(DicomError) as err:
        dicom.header_bytes(b"not a dicom file" * 20)
    assert err.value.reason == "not_dicom"
