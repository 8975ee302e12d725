"""`echo-ray listen`: the DICOM node as a process, fed by dcmtk against a real Orthanc that
receives its Structured Reports (C-STORE), killed and restarted on the same spool."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from helpers.orthanc import AE_TITLE, free_port, start_orthanc, storescu
from helpers.processes import stop_process_group
from helpers.tiny_dvlm import make_model

from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.synth.archive import synthesize_archive
from echo_ray.synth.dicom_writer import write_dicom

REPO = Path(__file__).resolve().parents[2]
CALLER = "STORESCU"
PATIENT_NAME, PATIENT_ID = "Doe^Listener", "PHI-LISTEN-77"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model (gibberish reports of full length: fine for plumbing)."""
    torch.manual_seed(0)
    return save_checkpoint(make_model(max_response_len=16), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def node_port():
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, node_port):
    """The PACS the node sends SRs to; it knows the node as modality ECHO (its routing)."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"),
                           modalities={"ECHO": ("127.0.0.1", node_port)})
    try:
        yield server
    finally:
        server.stop()


def _studies(root: Path) -> dict[str, list[tuple[str, Path]]]:
    """StudyInstanceUID -> [(ViewPosition, path)] of a synthetic archive."""
    out: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.setdefault(str(ds.StudyInstanceUID), []).append((str(ds.ViewPosition), path))
    return out


class Node:
    """One `echo-ray listen` process (its own session: killed as a group)."""

    def __init__(self, checkpoint: Path, spool: Path, port: int, destination: str,
                 log: Path, quiet_s: float) -> None:
        self.log_path = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "echo_ray.cli", "listen", "--checkpoint",
                 str(checkpoint), "--spool", str(spool), "--host", "127.0.0.1",
                 "--port", str(port), "--ae-title", "ECHO",
                 "--allowed-callers", f"{CALLER},{AE_TITLE}", "--quiet-s", str(quiet_s),
                 "--destination", destination, "--threads", "1", "--batch-size", "2"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for("listening on", timeout=90)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, *, timeout: float = 30, count: int = 1) -> None:
        deadline = time.time() + timeout
        while self.log().count(text) < count:
            assert self.proc.poll() is None, f"the node exited:\n{self.log()}"
            assert time.time() < deadline, f"no {text!r} within {timeout} s:\n{self.log()}"
            time.sleep(0.2)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=30)


def _ledger(spool: Path) -> dict[str, dict]:
    with sqlite3.connect(spool / "ledger.sqlite") as db:
        db.row_factory = sqlite3.Row
        return {r["study_uid"]: dict(r) for r in db.execute("SELECT * FROM studies")}


def _srs(orthanc, study_uid: str | None = None) -> list[pydicom.Dataset]:
    found = [pydicom.dcmread(io.BytesIO(orthanc.file(i["ID"])))
             for i in orthanc.instances_of_modality("SR")]
    return [ds for ds in found if study_uid is None or ds.StudyInstanceUID == study_uid]


def _wait_srs(orthanc, study_uids: set[str], timeout: float = 60) -> list[pydicom.Dataset]:
    deadline = time.time() + timeout
    while True:
        srs = [ds for ds in _srs(orthanc) if ds.StudyInstanceUID in study_uids]
        if {ds.StudyInstanceUID for ds in srs} == study_uids or time.time() > deadline:
            return srs
        time.sleep(0.3)


def _echoscu(port: int, calling: str) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", "ECHO", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def _garbage_file(path: Path) -> Path:
    """A Part 10 file meta header (DX) followed by a dataset that ends mid-element."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    buffer = io.BytesIO(b"\0" * 128 + b"DICM")
    buffer.seek(0, 2)
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + b"\x08\x00\x16\x00UI\xff\x001.2")
    return path


def _send_with_pynetdicom(port: int, path: Path) -> pydicom.Dataset:
    """C-STORE a file as it is on disk (pynetdicom's chunked mode sends its bytes without
    decoding them); the status the node answered."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True

    ae = AE(ae_title=CALLER)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHO")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = False


def test_node_reports_each_frontal_study_once_and_refuses_what_it_cannot_use(
        tmp_path, checkpoint, orthanc, node_port):
    """C-ECHO; an unknown caller refused; a 3-study archive in mixed transfer syntaxes ->
    one SR per frontal study in Orthanc, the lateral-only study an error row; a CT and a
    broken file answered with a failure status and a logged reason, the node running on."""
    archive = tmp_path / "archive"
    synthesize_archive(archive, num_studies=3, seed=0, image_size=64, lateral_fraction=0.6,
                       lateral_only_fraction=0.3)
    studies = _studies(archive)
    frontal = {uid for uid, views in studies.items() if {"PA", "AP"} & {v for v, _ in views}}
    lateral_only = set(studies) - frontal
    assert len(frontal) == 2 and len(lateral_only) == 1  # the seed's archive
    spool = tmp_path / "spool"
    node = Node(checkpoint, spool, node_port,
                f"dimse://{AE_TITLE}@127.0.0.1:{orthanc.dicom_port}", tmp_path / "node.log",
                quiet_s=1.5)
    try:
        assert _echoscu(node_port, CALLER).returncode == 0
        node.wait_for(f"C-ECHO from {CALLER}")
        intruder = _echoscu(node_port, "INTRUDER")
        assert intruder.returncode != 0
        node.wait_for("refused an association from calling AE title 'INTRUDER'")

        sent = storescu("127.0.0.1", node_port, "ECHO",
                        *[p for views in studies.values() for _, p in views], calling=CALLER)
        assert sent.returncode == 0, sent.stderr
        srs = _wait_srs(orthanc, frontal)
        assert sorted(ds.StudyInstanceUID for ds in srs) == sorted(frontal)
        for ds in srs:
            assert ds.Modality == "SR" and ds.PreliminaryFlag == "PRELIMINARY"
            source = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                      for v, p in studies[ds.StudyInstanceUID] if v in ("PA", "AP")}
            evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
            referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            assert referenced.ReferencedSOPInstanceUID in source
        (bad,) = lateral_only
        node.wait_for(f"study {bad}: not reported: no_frontal_view")
        for uid in frontal:
            node.wait_for(f"study {uid}: SR sent")
        ledger = _ledger(spool)
        assert {uid: row["state"] for uid, row in ledger.items()} == \
            {**dict.fromkeys(frontal, "sent"), bad: "error"}
        assert ledger[bad]["reason"] == "no_frontal_view"
        assert all(ledger[uid]["sr_sop_instance_uid"] in {ds.SOPInstanceUID for ds in srs}
                   for uid in frontal)
        assert sorted(p.name for p in (spool / "sr").iterdir()) == \
            sorted(f"{uid}.dcm" for uid in frontal)

        # a CT: refused with 0xA900 and the reason; nothing spooled
        ct = tmp_path / "ct.dcm"
        ct.write_bytes(write_dicom(
            np.zeros((64, 64), np.uint16),
            attrs={"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                   "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.55",
                   "PatientName": PATIENT_NAME, "PatientID": PATIENT_ID}))
        refused = storescu("127.0.0.1", node_port, "ECHO", ct, calling=CALLER)
        assert refused.returncode != 0  # dcmtk: the status's error class, 0xA9
        node.wait_for("refused an instance from STORESCU: Modality CT, not a radiograph")
        # a broken dataset: refused with 0xC000 and the reason
        status = _send_with_pynetdicom(node_port, _garbage_file(tmp_path / "broken.dcm"))
        assert (status.Status, status.ErrorComment) == (0xC000,
                                                        "cannot read the dataset: truncated")
        node.wait_for("refused an instance from STORESCU: truncated (status 0xC000)")
        assert "1.2.826.0.1.3680043.8.498.55" not in _ledger(spool)
        assert not (spool / "studies" / "1.2.826.0.1.3680043.8.498.55").exists()
        assert _echoscu(node_port, CALLER).returncode == 0  # still serving
        assert node.proc.poll() is None
    finally:
        node.stop()
    log = node.log()
    assert node.proc.returncode == 0 and "stopped" in log
    assert PATIENT_NAME not in log and PATIENT_ID not in log
    assert all(line.startswith("[echo-ray listen]") for line in log.splitlines()
               if "listen" in line or "study" in line)


def test_kill_mid_study_and_restarts_report_the_study_exactly_once(
        tmp_path, checkpoint, orthanc, node_port):
    """Half a study sent, the node SIGKILLed inside the quiet period, restarted on the same
    spool, the rest sent: one report of the whole study, one SR in Orthanc. Restarted once
    more after the send: nothing is reported again, and a late copy of a file is kept, not
    reported."""
    archive = tmp_path / "archive"
    synthesize_archive(archive, num_studies=3, seed=3, image_size=64, lateral_fraction=0.6,
                       lateral_only_fraction=0.3)
    ((uid, views),) = [(u, v) for u, v in _studies(archive).items() if len(v) == 2]
    (lateral,) = [p for v, p in views if v not in ("PA", "AP")]
    (front,) = [p for v, p in views if v in ("PA", "AP")]
    spool = tmp_path / "spool"
    destination = f"dimse://{AE_TITLE}@127.0.0.1:{orthanc.dicom_port}"

    node = Node(checkpoint, spool, node_port, destination, tmp_path / "node1.log", quiet_s=3)
    try:
        assert storescu("127.0.0.1", node_port, "ECHO", lateral, calling=CALLER).returncode == 0
        node.kill()  # acknowledged, inside the quiet period
    finally:
        node.stop()
    assert "reported" not in node.log().split("received file 1")[-1]
    assert _ledger(spool)[uid]["state"] == "receiving"

    node = Node(checkpoint, spool, node_port, destination, tmp_path / "node2.log", quiet_s=3)
    try:
        assert "1 receiving" in node.log()
        time.sleep(1)  # the quiet period counts from the restart, not from the last file
        assert "not reported" not in node.log()
        assert storescu("127.0.0.1", node_port, "ECHO", front, calling=CALLER).returncode == 0
        node.wait_for(f"study {uid}: SR sent")
    finally:
        node.stop()
    assert node.log().count(f"study {uid}: reported (2 files") == 1
    (sr,) = _srs(orthanc, uid)
    row = _ledger(spool)[uid]
    assert (row["state"], row["num_files"], row["late_files"]) == ("sent", 2, 0)
    assert row["sr_sop_instance_uid"] == sr.SOPInstanceUID

    node = Node(checkpoint, spool, node_port, destination, tmp_path / "node3.log", quiet_s=1)
    try:
        assert "0 receiving, 0 reported, 1 sent" in node.log()
        assert storescu("127.0.0.1", node_port, "ECHO", front, calling=CALLER).returncode == 0
        node.wait_for(f"study {uid}: late file")
        time.sleep(2.5)  # more than the quiet period and a few reporting ticks
    finally:
        node.stop()
    assert "reported (" not in node.log() and "SR sent" not in node.log()
    assert len(_srs(orthanc, uid)) == 1
    row = _ledger(spool)[uid]
    assert (row["state"], row["late_files"]) == ("sent", 1)
