"""`interop.dimse`: C-STORE to a real Orthanc, refusals as one-line `DimseError`s."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from helpers.orthanc import AE_TITLE, free_port, start_orthanc

from echo_ray.interop.dimse import DimseError, parse_dimse, send_instances
from echo_ray.synth.dicom_writer import write_dicom

STUDY = "1.2.826.0.1.3680043.8.498.2101"


def _dicom(seed: int, syntax: str = "explicit_le", **attrs) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4096, (64, 64), dtype=np.uint16)
    return write_dicom(pixels, transfer_syntax=syntax,
                       attrs={"Modality": "DX", "StudyInstanceUID": STUDY,
                              "PatientName": "Doe^Jane", "PatientID": "PHI-2101", **attrs})


def test_parse_dimse():
    assert parse_dimse("dimse://ORTHANC@127.0.0.1:4242") == ("ORTHANC", "127.0.0.1", 4242)
    assert parse_dimse("dimse://PACS@pacs.example.org:104/") == ("PACS", "pacs.example.org", 104)
    for bad in ("dimse://127.0.0.1:4242", "dimse://ORTHANC@127.0.0.1",
                "dimse://A_TITLE_LONGER_THAN_16@h:1", "dicomweb://h:1/x",
                "dimse://ORTHANC@h:70000"):
        with pytest.raises(DimseError, match="dimse://AE_TITLE@HOST:PORT"):
            parse_dimse(bad)


def test_send_instances_stores_every_instance_in_orthanc(tmp_path):
    """Two transfer syntaxes (one compressed, sent as it is) in one call: both arrive
    with their SOP instance UIDs; storing the same instance again is no error."""
    blobs = [_dicom(1), _dicom(2, "rle", ViewPosition="LL")]
    uids = {pydicom.dcmread(pydicom.filebase.DicomBytesIO(b)).SOPInstanceUID for b in blobs}
    orthanc = start_orthanc(tmp_path / "orthanc")
    try:
        uri = f"dimse://{AE_TITLE}@127.0.0.1:{orthanc.dicom_port}"
        send_instances(uri, blobs, calling_ae="ECHO")
        send_instances(uri, blobs[:1])
        stored = orthanc.instances_of_modality("DX")
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in stored} == uids
        syntaxes = {pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.file(i["ID"])))
                    .file_meta.TransferSyntaxUID for i in stored}
        assert pydicom.uid.RLELossless in syntaxes
    finally:
        orthanc.stop()


def test_unknown_caller_and_unreachable_node_are_one_line_errors():
    """A node that accepts only known calling AE titles refuses ours: DimseError naming
    the peer; a closed port too. Neither message carries patient data."""
    from pynetdicom import AE, AllStoragePresentationContexts

    scp = AE(ae_title="STRICT")
    scp.supported_contexts = AllStoragePresentationContexts
    scp.require_calling_aet = ["KNOWN"]
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        with pytest.raises(DimseError) as refused:
            send_instances(f"dimse://STRICT@127.0.0.1:{port}", [_dicom(3)], calling_ae="ECHO")
    finally:
        server.shutdown()
    message = str(refused.value)
    assert "refused the association" in message and "'ECHO'" in message
    assert "STRICT@127.0.0.1" in message and "\n" not in message
    assert "Doe" not in message and "PHI-2101" not in message
    with pytest.raises(DimseError, match="no association"):
        send_instances(f"dimse://NOBODY@127.0.0.1:{free_port()}", [_dicom(4)], timeout=5)
    with pytest.raises(DimseError, match="not a DICOM Part 10 file"):
        send_instances(f"dimse://NOBODY@127.0.0.1:{free_port()}", [b"not dicom"])
