"""`echo-ray report` over a real PACS (Orthanc): studies stored with dcmtk's storescu, found
with QIDO-RS, read with WADO-RS, reported exactly once, each report's DICOM SR written to sr/
and stored back with STOW-RS; credentials in the environment only."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import highdicom as hd
import pyarrow.parquet as pq
import pydicom
import pytest
import torch
from helpers.orthanc import PASSWORD, free_port, start_orthanc
from helpers.tiny_dvlm import make_model
from pydicom.uid import generate_uid

from echo_ray.batch.actor import SR_DIR, ArchiveActor, sr_file_name
from echo_ray.batch.decoder import decode_units
from echo_ray.batch.job import report_archive
from echo_ray.batch.ledger import PARTS_DIR
from echo_ray.batch.sources import archive_source
from echo_ray.cli import main as cli_main
from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import DecodingConfig, EchoConfig, PoolConfig, ReportConfig
from echo_ray.data.storage import resolve
from echo_ray.interop.dicomweb import DicomwebClient
from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.model.folder import model_image_size
from echo_ray.synth.archive import synthesize_archive

REPO = Path(__file__).resolve().parents[2]
_SMALL = ["--batch-size", "2", "--unit-size", "3", "--cpus-per-actor", "0.25", "--threads", "1"]
OPTIONS = apply_overrides(EchoConfig(), [
    "report.batch_size=2", "report.unit_size=3", "pool.cpus_per_actor=0.25", "pool.threads=1",
    "report.sr=true", "report.store_sr=true"])
BROKEN_STUDY = "1.2.826.0.1.3680043.8.498.4242"
_ENV = ("ECHO_RAY_DICOMWEB_USER", "ECHO_RAY_DICOMWEB_PASSWORD", "ECHO_RAY_DICOMWEB_TOKEN",
        "ECHO_RAY_DICOMWEB_CREDENTIALS")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model (its reports are gibberish of full length: fine for plumbing)."""
    torch.manual_seed(0)
    return save_checkpoint(make_model(max_response_len=16), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding a synthetic archive (storescu, mixed transfer syntaxes, lateral-only
    studies) and one frontal study whose pixel data is cut short (uploaded over REST).
    Yields (server, {StudyInstanceUID: [source headers]}, archive folder)."""
    root = tmp_path_factory.mktemp("archive")
    synthesize_archive(root, num_studies=5, seed=16, image_size=64, lateral_fraction=0.3,
                       lateral_only_fraction=0.3)
    files = sorted(root.rglob("*.dcm"))
    studies: dict[str, list[pydicom.Dataset]] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        studies.setdefault(ds.StudyInstanceUID, []).append(ds)
    broken = next(ds for headers in studies.values() for ds in headers
                  if ds.file_meta.TransferSyntaxUID in (pydicom.uid.ExplicitVRLittleEndian,
                                                        pydicom.uid.ImplicitVRLittleEndian)
                  and ds.ViewPosition in ("PA", "AP"))
    broken = pydicom.dcmread(io.BytesIO(_to_bytes(broken)))
    broken.StudyInstanceUID = BROKEN_STUDY
    broken.SeriesInstanceUID, broken.SOPInstanceUID = generate_uid(), generate_uid()
    broken.file_meta.MediaStorageSOPInstanceUID = broken.SOPInstanceUID
    broken.PixelData = broken.PixelData[:len(broken.PixelData) // 3 * 2 // 2 * 2]
    (root / "broken.dcm").write_bytes(_to_bytes(broken))
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        sent = server.storescu(*files)
        assert sent.returncode == 0, sent.stderr
        server.upload(root / "broken.dcm")
        studies[BROKEN_STUDY] = [broken]
        yield server, studies, root
    finally:
        server.stop()


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _frontal(headers: list[pydicom.Dataset]) -> bool:
    return any(ds.ViewPosition not in ("LL", "RL", "LATERAL") for ds in headers)


def _srs(server) -> Counter:
    """StudyInstanceUID -> how many SR instances Orthanc holds for it."""
    return Counter(
        pydicom.dcmread(io.BytesIO(server.file(item["ID"])), stop_before_pixels=True)
        .StudyInstanceUID for item in server.instances_of_modality("SR"))


@pytest.fixture(scope="module")
def first_run(ray_cluster, checkpoint, pacs, tmp_path_factory):
    """`echo-ray report --archive dicomweb://... --sr --store-sr` as a user runs it, in a
    subprocess (joining the session's Ray cluster: its workers lack the credentials, which
    travel with the job), credentials in the environment only."""
    server, _, _ = pacs
    out = tmp_path_factory.mktemp("night") / "out"
    env = {k: v for k, v in os.environ.items() if k not in _ENV}
    env.update(server.env(), PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "echo_ray.cli", "report", "--checkpoint", str(checkpoint),
         "--archive", server.dicomweb, "--out", str(out), "--sr", "--store-sr", *_SMALL,
         "--ray-address", ray_cluster.get_runtime_context().gcs_address],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout + done.stderr


@pytest.mark.ray
def test_each_frontal_study_gets_one_report_and_one_sr_in_the_pacs(pacs, first_run, tmp_path):
    server, studies, _ = pacs
    out, _ = first_run
    reports = {r["study_id"]: r for r in pq.read_table(out / "reports.parquet").to_pylist()}
    errors = {e["study_id"]: e for e in pq.read_table(out / "errors.parquet").to_pylist()}
    frontal = {k for k, headers in studies.items() if _frontal(headers)} - {BROKEN_STUDY}
    laterals = {k for k, headers in studies.items() if not _frontal(headers)}
    assert frontal and laterals  # the archive has both kinds
    assert set(reports) == frontal
    assert {k: e["reason"] for k, e in errors.items() if k in laterals} == dict.fromkeys(
        laterals, "no_frontal_view")
    assert set(errors) == laterals | {BROKEN_STUDY}
    assert errors[BROKEN_STUDY]["reason"] not in (None, "read_failed", "unexpected_error")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layout"] == "dicomweb" and summary["studies"] == len(studies)
    run = summary["this_run"]
    assert run["srs_written"] == run["srs_stored"] == len(frontal) and run["sr_errors"] == 0
    assert (summary["srs"], summary["srs_stored"], summary["sr_errors"]) == (
        len(frontal), len(frontal), 0)
    # Exactly one SR per reported study in Orthanc, reading back as the study's SR.
    assert _srs(server) == Counter(dict.fromkeys(frontal, 1))
    for item in server.instances_of_modality("SR"):
        blob = server.file(item["ID"])
        sr = hd.sr.srread(io.BytesIO(blob))
        report = reports[sr.StudyInstanceUID]
        source = next(ds for ds in studies[sr.StudyInstanceUID]
                      if ds.SOPInstanceUID == report["sop_instance_uid"])
        assert sr.SOPInstanceUID == report["sr_sop_instance_uid"] and report["sr_stored"]
        assert (sr.PatientID, sr.PatientName) == (source.PatientID, source.PatientName)
        assert sr.Modality == "SR" and sr.PreliminaryFlag == "PRELIMINARY"
        assert report["sr_error"] is None
        path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
        path.write_bytes(blob)
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        written = pydicom.dcmread(out / SR_DIR / sr_file_name(sr.StudyInstanceUID))
        assert written.SOPInstanceUID == sr.SOPInstanceUID
    assert len(list((out / SR_DIR).iterdir())) == len(frontal)


@pytest.mark.ray
def test_no_password_and_no_patient_identifiers_in_outputs_or_logs(pacs, first_run):
    _, studies, _ = pacs
    out, printed = first_run
    secrets = {PASSWORD}
    for headers in studies.values():
        for ds in headers:
            secrets |= {str(ds.PatientName), str(ds.PatientID)}
    assert "[echo-ray report]" in printed  # the job's log lines are here
    for value in secrets:
        assert value not in printed, value
    # Every output but the SRs (which carry the patient, as the PACS's copy does).
    for path in out.rglob("*"):
        if path.is_file() and SR_DIR not in path.relative_to(out).parts:
            blob = path.read_bytes()
            for value in secrets:
                assert value.encode() not in blob, (path, value)


@pytest.mark.ray
def test_rerun_reports_nothing_and_stores_no_second_sr(
        ray_cluster, checkpoint, pacs, first_run, monkeypatch, tmp_path):
    import shutil

    server, studies, root = pacs
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    before = _srs(server)
    again = report_archive(str(checkpoint), server.dicomweb, str(out), OPTIONS)
    assert again["this_run"]["studies"] == 0 and again["late_files"] == 0
    assert _srs(server) == before
    # A PA arrives for a lateral-only study (reopened: reported now, with both images) and
    # a late lateral for a reported study (left alone: it keeps its one report and SR).
    lateral_key = sorted(k for k, h in studies.items() if not _frontal(h))[0]
    reported_key = sorted(k for k, h in studies.items() if _frontal(h) and k != BROKEN_STUDY)[0]
    pa = pydicom.dcmread(io.BytesIO(_to_bytes(studies[lateral_key][0])))
    late = pydicom.dcmread(io.BytesIO(_to_bytes(studies[reported_key][0])))
    for ds, view in ((pa, "PA"), (late, "LL")):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ViewPosition = view
        (root / f"{view}.dcm").write_bytes(_to_bytes(ds))
        server.upload(root / f"{view}.dcm")
    night = report_archive(str(checkpoint), server.dicomweb, str(out), OPTIONS)
    run = night["this_run"]
    assert (run["studies"], run["reports"], night["changed_studies"], night["late_files"]) == (
        1, 1, 1, 1)
    assert run["srs_stored"] == 1 and night["duplicates_dropped"] == 1
    assert _srs(server) == before + Counter({lateral_key: 1})
    reports = {r["study_id"]: r for r in pq.read_table(out / "reports.parquet").to_pylist()}
    assert reports[lateral_key]["num_files"] == 2 and reports[lateral_key]["sr_stored"]
    final = report_archive(str(checkpoint), server.dicomweb, str(out), OPTIONS)
    assert final["this_run"]["studies"] == 0 and _srs(server) == before + Counter(
        {lateral_key: 1})
    assert len(list((out / PARTS_DIR).glob("*.parquet"))) == night["this_run"]["units"] + len(
        list((first_run[0] / PARTS_DIR).glob("*.parquet")))


def test_since_is_a_study_date_filter_of_the_search(pacs, monkeypatch):
    server, studies, _ = pacs
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    dates = {k: h[0].StudyDate for k, h in studies.items()}
    cut = sorted(dates.values())[len(dates) // 2]
    since = f"{cut[:4]}-{cut[4:6]}-{cut[6:]}"
    source = archive_source(server.dicomweb)
    from echo_ray.batch.ledger import Ledger

    found = source.discover(Ledger(), ReportConfig(since=since))
    assert [s.key for s in found.studies] == sorted(k for k, d in dates.items() if d >= cut)
    assert 0 < len(found.studies) < len(studies)
    everything = source.discover(Ledger(), ReportConfig())
    assert [s.key for s in everything.studies] == sorted(studies)
    # Files: the WADO-RS path in the archive, `series/instance.dcm` in the outputs.
    study = everything.studies[0]
    assert all(p.startswith(f"studies/{study.key}/series/") for p in study.paths)
    assert all(n.count("/") == 1 and n.endswith(".dcm") for n in study.names)
    assert study.sizes == [None] * len(study.paths)


def test_an_sr_that_cannot_be_stored_leaves_the_report_and_says_why(
        checkpoint, pacs, monkeypatch, tmp_path):
    """The model actor in this process: the destination refuses connections."""
    import pyarrow as pa

    server, studies, _ = pacs
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    source = archive_source(server.dicomweb)
    from echo_ray.batch.ledger import Ledger

    key = next(k for k, h in sorted(studies.items()) if _frontal(h) and k != BROKEN_STUDY)
    (study,) = [s for s in source.discover(Ledger(), ReportConfig()).studies if s.key == key]
    entry = {"key": key, "paths": study.paths, "names": study.names, "sizes": study.sizes,
             "mtimes_ns": study.mtimes_ns}
    options = ReportConfig(batch_size=1, unit_size=1, sr=True, store_sr=True)
    size = model_image_size(resolve(str(checkpoint)))
    (row,) = decode_units(pa.Table.from_pylist([{"unit": "part-x", "studies": json.dumps(
        [entry])}]), src=source, size=size, options=options, modalities=None).to_pylist()
    import pickle

    prepared = pickle.loads(row["prepared"])
    assert prepared[0].prepared.source_header is not None  # kept for the SR
    dead = DicomwebClient.from_uri(f"dicomweb://127.0.0.1:{free_port()}/dicom-web")
    threads = torch.get_num_threads()
    try:
        actor = ArchiveActor(model=resolve(str(checkpoint)), src=source,
                             parts=resolve(str(tmp_path / PARTS_DIR)), run_id="r1",
                             options=options, decoding=DecodingConfig(),
                             pool=PoolConfig(threads=1), modalities=(), sr_store=dead)
        result = actor.report_unit("part-x", [entry], prepared)
    finally:
        torch.set_num_threads(threads)
    assert (result["reports"], result["srs_written"], result["srs_stored"],
            result["sr_errors"]) == (1, 1, 0, 1)
    (part,) = pq.read_table(tmp_path / PARTS_DIR / "part-x.parquet").to_pylist()
    assert part["error"] is None and part["report"] and part["sr_stored"] is False
    assert part["sr_error"].startswith("the SR could not be stored: ")
    assert "connection refused" in part["sr_error"] and PASSWORD not in part["sr_error"]
    assert (tmp_path / SR_DIR / sr_file_name(key)).exists()  # beside parts/, as the job's
    assert part["sr_sop_instance_uid"] == pydicom.dcmread(
        tmp_path / SR_DIR / sr_file_name(key)).SOPInstanceUID
    # A later run with --store-sr stores it (built again from the PACS's copy of the
    # source image when sr/ no longer has it: the same UID), and records that in a part
    # file of its own; the run after that has nothing to store. (Studies dated from 2999
    # only: nothing else is reported, no Ray.)
    for item in server.instances_of_modality("SR"):  # an earlier test's store of it
        if pydicom.dcmread(io.BytesIO(server.file(item["ID"]))).StudyInstanceUID == key:
            server.rest("DELETE", f"/instances/{item['ID']}")
    (tmp_path / SR_DIR / sr_file_name(key)).unlink()
    later = apply_overrides(OPTIONS, ["report.since=2999-01-01", "report.sr=false"])
    summary = report_archive(str(checkpoint), server.dicomweb, str(tmp_path), later)
    assert summary["this_run"]["studies"] == 0
    assert (summary["this_run"]["earlier_srs_stored"], summary["srs_stored"],
            summary["sr_errors"], summary["duplicates_dropped"]) == (1, 1, 0, 1)
    assert _srs(server)[key] == 1
    stored = [pydicom.dcmread(io.BytesIO(server.file(item["ID"])))
              for item in server.instances_of_modality("SR")]
    assert part["sr_sop_instance_uid"] in {ds.SOPInstanceUID for ds in stored}
    (report,) = pq.read_table(tmp_path / "reports.parquet").to_pylist()
    assert (report["sr_stored"], report["sr_error"], report["report"]) == (
        True, None, part["report"])
    again = report_archive(str(checkpoint), server.dicomweb, str(tmp_path), later)
    assert again["this_run"]["earlier_srs_stored"] == 0 and _srs(server)[key] == 1


def test_wrong_credentials_exit_2_with_one_line(checkpoint, pacs, monkeypatch, capsys,
                                                 tmp_path):
    server, _, _ = pacs
    monkeypatch.setenv("ECHO_RAY_DICOMWEB_USER", "echo")
    monkeypatch.setenv("ECHO_RAY_DICOMWEB_PASSWORD", "not-the-Pa55word")
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", "--checkpoint", str(checkpoint), "--archive", server.dicomweb,
                  "--out", str(tmp_path / "out"), "--sr", "--store-sr"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "rejected" in err and len(err.splitlines()) == 1
    assert "not-the-Pa55word" not in err
    assert not (tmp_path / "out").exists()
