"""echo_ray.synth.dicom_writer: deterministic UIDs, round trips of every transfer syntax through
pydicom and our decoder, required attributes, SOP class by modality, bad arguments."""

from __future__ import annotations

import io
import re

import numpy as np
import pydicom
import pytest
from helpers.images import ramp
from pydicom.uid import UID

from echo_ray.data.dicom import decode_dicom
from echo_ray.synth.dicom_writer import (
    LOSSLESS_TRANSFER_SYNTAXES,
    TRANSFER_SYNTAXES,
    make_uid,
    write_dicom,
)

PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN-4711", "PatientBirthDate": "19610203"}


def test_make_uid_is_deterministic_and_valid():
    uid = make_uid("study", 7)
    assert uid == make_uid("study", 7)
    assert uid != make_uid("study", 8)
    assert uid != make_uid("study7")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and len(uid) <= 64


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_write_round_trips_through_pydicom(syntax: str, bits: int):
    img = ramp(bits=bits)
    data = write_dicom(img, transfer_syntax=syntax, bits_stored=bits)
    assert data[128:132] == b"DICM"
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    assert (ds.BitsAllocated, ds.BitsStored) == (8 if bits == 8 else 16, bits)
    stored = ds.pixel_array
    if syntax in LOSSLESS_TRANSFER_SYNTAXES:
        np.testing.assert_array_equal(stored, img)
    else:
        assert ds.LossyImageCompression == "01"
        assert np.abs(stored.astype(float) - img).mean() < 0.02 * 2**bits

    # Our decoder agrees with pydicom's stored values (min-max, as no window is set).
    out = decode_dicom(data, size=None)
    expected = (stored - stored.min()) / float(stored.max() - stored.min())
    np.testing.assert_allclose(out.pixels, expected, atol=1e-6)
    assert out.meta["transfer_syntax"] == TRANSFER_SYNTAXES[syntax]


def test_write_is_deterministic_and_fills_required_attributes():
    img = ramp()
    data = write_dicom(img, transfer_syntax="jpeg2000")
    assert data == write_dicom(img, transfer_syntax="jpeg2000")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID.name == "Digital X-Ray Image Storage - For Presentation"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert UID(ds[keyword].value).is_valid
    assert ds.Modality == "DX" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert write_dicom(img // 2) != write_dicom(img)  # content-derived UIDs differ


def test_write_applies_attrs_and_picks_sop_class_by_modality():
    attrs = {"Modality": "CR", "ViewPosition": "AP", "SOPInstanceUID": make_uid("x"), **PHI}
    ds = pydicom.dcmread(io.BytesIO(write_dicom(ramp(), attrs=attrs)))
    assert ds.SOPClassUID.name == "Computed Radiography Image Storage"
    assert (ds.ViewPosition, ds.SOPInstanceUID, str(ds.PatientName)) == (
        "AP",
        make_uid("x"),
        "Doe^Jane",
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"transfer_syntax": "mpeg"}, "transfer_syntax"),
        ({"photometric": "RGB"}, "photometric"),
        ({"bits_stored": 17}, "bits_stored"),
        ({"bits_stored": 10}, "outside"),  # ramp(bits=12) needs 12 bits
        ({"attrs": {"PatientNmae": "x"}}, "unknown DICOM keywords"),
        ({"transfer_syntax": "jpeg2000_lossless", "pixels": ramp(16, 64)}, "at least 32"),
    ],
)
def test_write_rejects_bad_arguments(kwargs, match):
    pixels = kwargs.pop("pixels", ramp())
    with pytest.raises(ValueError, match=match):
        write_dicom(pixels, **kwargs)
