"""`echo-ray report`: the bulk archive job (Ray Data actor pool, part files as the ledger)."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import pickle
import posixpath
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from helpers.tiny_dvlm import make_model

import echo_ray.batch.decoder as decoder_module
import echo_ray.batch.discovery as discovery_module
from echo_ray.batch.actor import ArchiveActor
from echo_ray.batch.decoder import decode_units
from echo_ray.batch.discovery import discover_studies, file_key, plan_units
from echo_ray.batch.job import format_summary, report_archive
from echo_ray.batch.ledger import (
    ERRORS_CSV,
    PART_SCHEMA,
    PARTS_DIR,
    REPORT_COLUMNS,
    FileStamp,
    consolidate,
    read_ledger,
)
from echo_ray.cli import main as cli_main
from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import (
    ConfigError,
    DecodingConfig,
    EchoConfig,
    PoolConfig,
    ReportConfig,
)
from echo_ray.data.dicom import read_header
from echo_ray.data.storage import resolve
from echo_ray.decode.predictor import ReportGenerator
from echo_ray.decode.studies import report_studies
from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.model.folder import model_image_size
from echo_ray.synth.archive import synthesize_archive
from echo_ray.synth.dicom_writer import write_dicom

REPO = Path(__file__).resolve().parents[2]
# Small work for the tiny model on a 2-core machine: a quarter CPU and one thread per actor.
OPTIONS = apply_overrides(EchoConfig(), ["report.batch_size=2", "report.unit_size=3",
                                          "pool.cpus_per_actor=0.25", "pool.threads=1"])


def _options(*overrides: str) -> EchoConfig:
    return apply_overrides(OPTIONS, overrides)
UID_A, UID_B, UID_C = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102", \
    "1.2.826.0.1.3680043.8.498.103"
UID_LAT = "1.2.826.0.1.3680043.8.498.999"
PATIENT = "Doe^Jane"


def _dicom(seed: int, view: str, study: str, **attrs) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4096, (96, 80), dtype=np.uint16)
    return write_dicom(pixels, attrs={"Modality": "DX", "StudyInstanceUID": study,
                                      "ViewPosition": view, "PatientName": PATIENT,
                                      "PatientID": "PHI-123456", **attrs})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model (its reports are gibberish of full length: fine for plumbing)."""
    torch.manual_seed(0)
    return save_checkpoint(make_model(max_response_len=16), tmp_path_factory.mktemp("ckpt"))


def _metadata(root: Path) -> dict[str, list[dict]]:
    """Study key -> its images' rows of the synthetic metadata.csv."""
    studies: dict[str, list[dict]] = {}
    with open(root / "metadata.csv") as f:
        for row in csv.DictReader(f):
            studies.setdefault(f"s{row['study_id']}", []).append(row)
    return studies


def _views(root: Path) -> dict[str, list[str]]:
    return {k: [r["ViewPosition"] for r in rows] for k, rows in _metadata(root).items()}


def _side_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file() and p.suffix != ".dcm"
               and p.name != UID_LAT)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A synthetic MIMIC tree (some studies with only a lateral view) plus a flat folder,
    with broken files planted in both. Returns (root, expected outcome per study key)."""
    root = tmp_path_factory.mktemp("archive")
    synthesize_archive(root, num_studies=9, seed=5, image_size=64, lateral_fraction=0.3,
                       lateral_only_fraction=0.25)
    views = _views(root)
    expected = {k: "no_frontal_view" if all(v == "LATERAL" for v in vs) else None
                for k, vs in views.items()}
    assert "no_frontal_view" in expected.values() and None in expected.values()
    # A single-image frontal study, uncompressed, its pixel data cut short: `truncated`.
    truncated = next(
        k for k, rows in sorted(_metadata(root).items()) if len(rows) == 1
        and rows[0]["ViewPosition"] in ("PA", "AP")
        and rows[0]["TransferSyntax"] in ("explicit_le", "implicit_le", "explicit_be"))
    (dcm,) = (root / "files").rglob(f"{truncated}/*.dcm")
    dcm.write_bytes(dcm.read_bytes()[:-3000])
    expected[truncated] = "truncated"
    flat = root / "extra"
    flat.mkdir()
    (flat / "a_pa.dcm").write_bytes(_dicom(1, "PA", UID_A))
    (flat / "a_lat.dcm").write_bytes(_dicom(2, "LL", UID_A))
    (flat / "b1.dcm").write_bytes(_dicom(3, "PA", UID_B)[:-4000])  # broken, but B has an AP
    (flat / "b2.dcm").write_bytes(_dicom(4, "AP", UID_B))
    (flat / UID_LAT).write_bytes(_dicom(7, "LL", UID_B))  # named by its UID, as PACS do
    (flat / "junk.dcm").write_bytes(b"this is not a DICOM file\n" * 40)
    (flat / "notes.txt").write_text("side file")
    (flat / "README").write_text("an extension-less side file")
    expected.update({UID_A: None, UID_B: None, "file:extra/junk.dcm": "not_dicom"})
    return root, expected


@pytest.fixture(scope="module")
def reported(ray_cluster, checkpoint, archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("reported")
    options = _options("report.fhir=true")
    return out, report_archive(str(checkpoint), str(archive[0]), str(out), options)


def _outcomes(out: Path) -> tuple[list[dict], list[dict]]:
    return (pq.read_table(out / "reports.parquet").to_pylist(),
            pq.read_table(out / "errors.parquet").to_pylist())


def _assert_exactly_once(out: Path, expected: dict[str, str | None]) -> None:
    reports, errors = _outcomes(out)
    keys = [r["study_id"] for r in reports] + [e["study_id"] for e in errors]
    assert sorted(keys) == sorted(expected)  # every study, none twice
    assert {e["study_id"]: e["reason"] for e in errors} == {
        k: v for k, v in expected.items() if v is not None}


def _parts(out: Path) -> dict[str, tuple[int, int, str]]:
    """Part file name -> (inode, mtime_ns, sha256 of the bytes)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns,
                     hashlib.sha256(p.read_bytes()).hexdigest())
            for p in (out / PARTS_DIR).glob("*.parquet")}


# --- discovery (no Ray) ------------------------------------------------------------------------


def test_discovery_groups_studies_with_stable_keys_and_no_patient_paths(archive):
    root, expected = archive
    found = discover_studies(resolve(str(root)))
    assert [s.key for s in found.studies] == sorted(expected)
    assert found.layout == "mixed"
    assert found.side_files == _side_files(root)  # reports, CSV, JSON, our .txt and README
    assert found.dicom_files == sum(len(s.paths) for s in found.studies)
    by_key = {s.key: s for s in found.studies}
    assert by_key[UID_A].names == ["extra/a_lat.dcm", "extra/a_pa.dcm"]
    assert by_key["file:extra/junk.dcm"].paths == ["extra/junk.dcm"]
    mimic = next(s for s in found.studies if s.key.startswith("s"))
    assert mimic.names[0].startswith(f"{mimic.key}/") and mimic.paths[0].startswith("files/p")
    # Same archive, same keys, same order; with include_phi the full paths are the names.
    again = discover_studies(resolve(str(root)), include_phi=True)
    assert [(s.key, s.paths) for s in again.studies] == [(s.key, s.paths) for s in found.studies]
    assert all(s.names == s.paths for s in again.studies)


def test_flat_headers_read_past_a_short_prefix(archive, monkeypatch):
    root, _ = archive
    monkeypatch.setattr(discovery_module, "HEADER_PREFIX", 300)  # cuts every header short
    found = discover_studies(resolve(str(root / "extra")))
    assert [s.key for s in found.studies] == sorted([UID_A, UID_B, "file:junk.dcm"])
    assert found.layout == "flat" and found.side_files == 2


def test_since_done_and_output_folder_are_left_out(archive, tmp_path):
    root, expected = archive
    src = tmp_path / "archive"
    shutil.copytree(root, src)
    old = time.time() - 10 * 86400
    for path in src.rglob("*"):
        if path.is_file():
            os.utime(path, (old, old))
    fresh = sorted(k for k in expected if k.startswith("s"))[0]
    for path in src.rglob(f"{fresh}/*.dcm"):
        os.utime(path, None)
    os.utime(src / "extra" / "b2.dcm", None)
    since = time.time() - 86400
    found = discover_studies(resolve(str(src)), since=since)
    assert [s.key for s in found.studies] == sorted([fresh, UID_B])
    assert [s.paths for s in found.studies if s.key == UID_B] == [["extra/b2.dcm"]]
    # Done studies (and their files, by key) are left out; a new file of one is late.
    done = {fresh, UID_A}
    known = {file_key(p) for s in discover_studies(resolve(str(src))).studies if s.key in done
             for p in s.paths}
    shutil.copy(src / "extra" / "a_pa.dcm", src / "extra" / "a_copy.dcm")
    found = discover_studies(resolve(str(src)), done=done, known_files=known)
    assert [s.key for s in found.studies] == sorted(set(expected) - done)
    assert found.late_files == 1
    (src / "extra" / "a_copy.dcm").unlink()
    # An output folder inside the archive is not read as part of it.
    (src / "out" / "parts").mkdir(parents=True)
    shutil.copy(src / "extra" / "b2.dcm", src / "out" / "parts" / "x.dcm")
    found = discover_studies(resolve(str(src)), exclude=str(src / "out"))
    assert [s.key for s in found.studies] == sorted(expected)


def _stamps(root: Path, keys: dict[str, str]) -> dict[str, FileStamp]:
    """file_key -> stamp of the current bytes, for the files of `keys` (path -> study)."""
    out = {}
    for rel, study in keys.items():
        stat = (root / rel).stat()
        out[file_key(rel)] = FileStamp(study, stat.st_size, stat.st_mtime_ns, None)
    return out


def test_error_studies_whose_files_changed_or_grew_are_found_again(archive, tmp_path):
    root, expected = archive
    src = tmp_path / "archive"
    shutil.copytree(root, src, copy_function=shutil.copy2)
    everything = discover_studies(resolve(str(src))).studies
    done = {s.key for s in everything}
    known = {file_key(p) for s in everything for p in s.paths}
    paths = {s.key: s.paths for s in everything}
    cut = next(k for k, v in expected.items() if v == "truncated")
    lateral = next(k for k, v in sorted(expected.items()) if v == "no_frontal_view")
    errors = _stamps(src, {p: k for k in (cut, lateral, UID_A, "file:extra/junk.dcm")
                           for p in paths[k]})

    def rediscover():
        return discover_studies(resolve(str(src)), done=done, known_files=known,
                                error_files=errors)

    found = rediscover()
    assert (found.studies, found.late_files, found.changed_studies) == ([], 0, 0)
    # The cut file completed by the next export; the lateral-only study gets its PA late;
    # the flat error study A a new image; the reported study B a late one (left alone).
    (dcm,) = [src / p for p in paths[cut]]
    dcm.write_bytes(dcm.read_bytes() + bytes(3000))
    late_pa = posixpath.join(posixpath.dirname(paths[lateral][0]), "late_pa.dcm")
    (src / late_pa).write_bytes(_dicom(8, "PA", UID_LAT))
    (src / "extra" / "a_new.dcm").write_bytes(_dicom(9, "AP", UID_A))
    (src / "extra" / "b_late.dcm").write_bytes(_dicom(10, "PA", UID_B))
    found = rediscover()
    by_key = {s.key: s for s in found.studies}
    assert sorted(by_key) == sorted([cut, lateral, UID_A])
    assert found.changed_studies == 3 and found.late_files == 1  # b_late.dcm
    assert by_key[cut].paths == paths[cut] and by_key[cut].sizes == [dcm.stat().st_size]
    assert by_key[lateral].paths == sorted([*paths[lateral], late_pa])
    assert by_key[UID_A].paths == ["extra/a_lat.dcm", "extra/a_new.dcm", "extra/a_pa.dcm"]
    assert all(len(s.mtimes_ns) == len(s.paths) and None not in s.mtimes_ns
               for s in found.studies)
    # A touched file with the same size is a change too (a rewrite in place).
    (src / "extra" / "junk.dcm").touch()
    os.utime(src / "extra" / "junk.dcm", ns=(1, time.time_ns() + 10**9))
    assert "file:extra/junk.dcm" in {s.key for s in rediscover().studies}
    # A stamp from an older ledger (no size, no mtime): changed only if modified after the
    # row was written.
    junk = file_key("extra/junk.dcm")
    errors = {junk: FileStamp("file:extra/junk.dcm", None, None, time.time_ns() + 10**10)}
    assert rediscover().studies == []
    errors = {junk: FileStamp("file:extra/junk.dcm", None, None, 10**9)}
    assert [s.key for s in rediscover().studies] == ["file:extra/junk.dcm"]


def _part_row(study_id: str, **fields) -> dict:
    return {**dict.fromkeys(PART_SCHEMA.names), "study_id": study_id, "num_files": 1,
            "file_errors": [], "unit": "part-x", "run_id": "r1",
            "reported_at": "2024-05-31T01:00:00+00:00", **fields}


def test_ledger_reads_stamps_and_parts_written_before_them(tmp_path):
    parts = tmp_path / "out" / PARTS_DIR
    parts.mkdir(parents=True)
    new = [_part_row("s1", error="truncated", file_keys=["k1", "k2"], file_sizes=[10, 20],
                     file_mtimes_ns=[5, 6]),
           _part_row("s2", report="x", file_keys=["k3"], file_sizes=[1], file_mtimes_ns=[1]),
           _part_row("s3", error="read_failed", file_keys=["k4"], file_sizes=[7],
                     file_mtimes_ns=[8])]
    pq.write_table(pa.Table.from_pylist(new, schema=PART_SCHEMA), parts / "part-a.parquet")
    # A part of an older version: no stamps, no accession_number / study_date / sentences.
    old_names = [n for n in PART_SCHEMA.names if n not in (
        "file_sizes", "file_mtimes_ns", "accession_number", "study_date", "sentences")]
    old_schema = pa.schema([PART_SCHEMA.field(n) for n in old_names])
    old = [_part_row("s4", error="truncated", file_keys=["k5"]),
           _part_row("s5", error="no_frontal_view", file_keys=["k6"])]
    pq.write_table(pa.Table.from_pylist(old, schema=old_schema), parts / "part-b.parquet")
    ledger = read_ledger(resolve(str(parts)))
    assert ledger.done == {"s1", "s2", "s3", "s4", "s5"}
    assert ledger.known_files == {"k1", "k2", "k3", "k4", "k5", "k6"}
    at = int(datetime.fromisoformat("2024-05-31T01:00:00+00:00").timestamp() * 1e9)
    assert ledger.error_files == {
        "k1": FileStamp("s1", 10, 5, at), "k2": FileStamp("s1", 20, 6, at),
        "k4": FileStamp("s3", 7, 8, at), "k5": FileStamp("s4", None, None, at),
        "k6": FileStamp("s5", None, None, at)}
    # A later report row supersedes an error row: its files are no longer error files.
    later = _part_row("s1", report="y", file_keys=["k1", "k2"], file_sizes=[11, 20],
                      file_mtimes_ns=[9, 6], reported_at="2024-06-01T01:00:00+00:00")
    pq.write_table(pa.Table.from_pylist([later], schema=PART_SCHEMA), parts / "part-c.parquet")
    retry = read_ledger(resolve(str(parts)), retry_errors=True)
    assert "k1" not in retry.error_files and "k5" in retry.error_files
    assert "s3" not in retry.done and "k4" not in retry.known_files  # read_failed: again


def test_consolidation_writes_errors_csv_and_drops_rows_of_files_fixed_into_a_study(
        tmp_path):
    out = tmp_path / "out"
    (out / PARTS_DIR).mkdir(parents=True)
    night1 = [
        _part_row("file:extra/c.dcm", error="truncated", message="the file ends early",
                  files=["extra/c.dcm"], file_keys=["kc"],
                  file_errors=[{"file": "extra/c.dcm", "error": "truncated",
                                "message": "the file ends early"}]),
        _part_row("s7", error="no_usable_image", message="none of the 2 files", num_files=2,
                  files=["s7/a.dcm", "s7/b.dcm"], file_keys=["ka", "kb"],
                  file_errors=[{"file": "s7/a.dcm", "error": "not_dicom", "message": "x"},
                               {"file": "s7/b.dcm", "error": "truncated", "message": "y"}]),
    ]
    night2 = [_part_row(UID_C, report="r", files=["extra/c.dcm"], file_keys=["kc"],
                        reported_at="2024-06-01T01:00:00+00:00")]
    for name, rows in (("part-1", night1), ("part-2", night2)):
        pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA),
                       out / PARTS_DIR / f"{name}.parquet")
    summary = consolidate(resolve(str(out)), include_phi=False, fhir=False)
    assert (summary["reports"], summary["errors"], summary["duplicates_dropped"]) == (1, 1, 1)
    assert ERRORS_CSV in summary["files"]
    with open(out / ERRORS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{
        "study_id": "s7", "study_instance_uid": "", "file": "", "reason": "no_usable_image",
        "message": "none of the 2 files", "num_files": "2", "files": "s7/a.dcm; s7/b.dcm",
        "file_errors": "s7/a.dcm: not_dicom (x); s7/b.dcm: truncated (y)", "run_id": "r1",
        "reported_at": "2024-05-31T01:00:00+00:00"}]
    assert [r["study_id"] for r in pq.read_table(out / "errors.parquet").to_pylist()] == ["s7"]


def test_part_schema_holds_every_field_of_report_studies(checkpoint):
    generator = ReportGenerator.from_checkpoint(checkpoint, include_phi=True)
    results = report_studies(generator, [[("a.dcm", _dicom(1, "PA", UID_A))],
                                         [("b.dcm", b"junk" * 100)]], study_ids=["a", "b"])
    assert set(results[0]) <= set(PART_SCHEMA.names)  # nothing of a report is dropped
    assert set(results[1]) <= set(PART_SCHEMA.names)
    assert set(results[0]) - {"patient_name", "patient_id", "patient_birth_date"} <= set(
        REPORT_COLUMNS)


def test_options_and_the_command_reject_bad_values(tmp_path, capsys):
    with pytest.raises(ConfigError, match="decoding.mode"):
        _options("decoding.mode=fast")
    with pytest.raises(ConfigError, match="report.since"):
        _options("report.since=yesterday")
    with pytest.raises(ConfigError, match="report.unit_size"):
        _options("report.batch_size=16", "report.unit_size=8")
    assert _options("report.since=2024-05-31").report.since_timestamp() == 1717113600.0
    with pytest.raises(SystemExit) as exc:
        cli_main(["report", "--checkpoint", "x", "--archive", str(tmp_path), "--out",
                  str(tmp_path / "o"), "--unit-size", "0"])
    assert exc.value.code == 2 and "unit_size must be >= 1" in capsys.readouterr().err


def test_empty_archive_gives_empty_outputs(checkpoint, tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "notes.txt").write_text("no images tonight")
    summary = report_archive(str(checkpoint), str(src), str(tmp_path / "out"), OPTIONS)
    assert (summary["studies"], summary["reports"], summary["errors"]) == (0, 0, 0)
    assert summary["layout"] == "empty" and summary["side_files"] == 1
    assert summary["this_run"]["units"] == 0 and summary["studies_per_s"] is None
    reports = pq.read_table(tmp_path / "out" / "reports.parquet")
    assert reports.num_rows == 0 and "report" in reports.schema.names
    assert pq.read_table(tmp_path / "out" / "errors.parquet").num_rows == 0
    assert (tmp_path / "out" / "reports.jsonl").read_text() == ""
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["studies"] == 0
    assert "0 studies" in format_summary(summary)


def _decode_unit(root: Path, studies: list[dict], size: int = 16,
                 options: ReportConfig | None = None) -> list:
    """`decode_units` on one unit of `studies` (discovery's entries), in this process."""
    table = pa.Table.from_pylist([{"unit": "part-x", "studies": json.dumps(studies)}])
    (row,) = decode_units(table, src=resolve(str(root)), size=size,
                          options=options or ReportConfig(), modalities=None).to_pylist()
    assert row["unit"] == "part-x" and row["decode_s"] > 0 and row["decode_rss_kib"] > 0
    # No DICOM file's bytes: the magic and the first File Meta tag (0002,xxxx) of each.
    assert b"DICM\x02\x00" not in row["prepared"]
    return pickle.loads(row["prepared"])


def _entries(root: Path) -> list[dict]:
    return json.loads(plan_units(discover_studies(resolve(str(root))).studies, 1000)[0][
        "studies"])


def test_decode_stage_ships_prepared_images_and_keeps_every_bad_input_rule(archive,
                                                                            monkeypatch):
    root, expected = archive
    entries = _entries(root)
    prepared = _decode_unit(root, entries)
    assert [s.prepared.study_id for s in prepared] == [e["key"] for e in entries]
    for study, entry in zip(prepared, entries, strict=True):
        p = study.prepared
        assert p.error == expected[entry["key"]], entry["key"]
        assert p.source_data is None and p.num_files == len(entry["paths"])
        if p.error is None:
            assert p.image.dtype == np.float32 and p.image.shape == (16, 16)
    # Files that cannot be read: a file error of a study that has another, an error row of
    # a study that has none; a study whose preparing raises: one `unexpected_error` row.
    a = next(e for e in entries if e["key"] == UID_A)
    gone = {"key": "s-gone", "paths": ["extra/gone.dcm"], "names": ["extra/gone.dcm"]}
    half = {**a, "paths": [*a["paths"], "extra/gone.dcm"],
            "names": [*a["names"], "extra/gone.dcm"]}
    real = decoder_module.prepare_study

    def prepare(files, **kw):
        if kw["study_id"] == "s-boom":
            raise RuntimeError("a library's surprise")
        return real(files, **kw)

    monkeypatch.setattr(decoder_module, "prepare_study", prepare)
    gone_row, half_row, boom_row = (s.prepared for s in _decode_unit(
        root, [gone, half, {**a, "key": "s-boom"}]))
    assert (gone_row.error, gone_row.num_files) == ("read_failed", 1)
    assert gone_row.error_row()["file_errors"] == [{
        "file": "extra/gone.dcm", "error": "read_failed",
        "message": "could not read the file: FileNotFoundError"}]
    assert half_row.error is None and half_row.source_file == "extra/a_pa.dcm"
    assert half_row.num_files == 3 and [e["error"] for e in half_row.file_errors] == [
        "read_failed"]
    assert (boom_row.error, boom_row.message) == ("unexpected_error",
                                                  "reporting raised RuntimeError")


def test_decode_stage_reads_the_fhir_subject_and_no_other_identifier(archive):
    root, _ = archive
    a = next(e for e in _entries(root) if e["key"] == UID_A)
    options = ReportConfig(fhir=True, fhir_patient_ref="Patient/{patient_id}")
    (study,) = _decode_unit(root, [a], options=options)
    assert study.subject == "Patient/PHI-123456"
    assert "PHI-123456" not in json.dumps(study.prepared.meta)
    (study,) = _decode_unit(root, [a])
    assert study.subject is None


def test_a_batch_that_raises_in_the_model_is_reported_study_by_study(archive, checkpoint,
                                                                     tmp_path):
    root, _ = archive
    entries = [e for e in _entries(root) if e["key"] in (UID_A, UID_B)]
    prepared = _decode_unit(root, entries, size=model_image_size(resolve(str(checkpoint))))
    prepared[1].prepared.image = prepared[1].prepared.image[:-1]  # not the model's grid
    parts = tmp_path / PARTS_DIR
    threads = torch.get_num_threads()
    try:
        actor = ArchiveActor(model=resolve(str(checkpoint)), src=resolve(str(root)),
                             parts=resolve(str(parts)), run_id="r1",
                             options=ReportConfig(batch_size=2, unit_size=2),
                             decoding=DecodingConfig(), pool=PoolConfig(threads=1),
                             modalities=())
        out = actor.report_unit("part-x", entries, prepared)
    finally:
        torch.set_num_threads(threads)
    assert (out["studies"], out["reports"], out["errors"]) == (2, 1, 1)
    rows = pq.read_table(parts / "part-x.parquet").to_pylist()
    assert [(r["study_id"], r["error"]) for r in rows] == [
        (UID_A, None), (UID_B, "unexpected_error")]
    assert rows[1]["message"] == "reporting raised ValueError" and rows[1]["num_files"] == 3
    assert [e["file"] for e in rows[1]["file_errors"]] == ["extra/b1.dcm"]


# --- the job (Ray) -----------------------------------------------------------------------------


@pytest.mark.ray
def test_every_study_is_one_report_or_one_error_row(archive, reported):
    root, expected = archive
    out, summary = reported
    _assert_exactly_once(out, expected)
    reports, errors = _outcomes(out)
    assert summary["studies"] == len(expected) == summary["this_run"]["studies"]
    assert summary["reports"] == len(reports) and summary["errors"] == len(errors)
    assert summary["images"] == summary["dicom_files"] == sum(
        len(s.paths) for s in discover_studies(resolve(str(root))).studies)
    assert summary["errors_by_reason"]["no_frontal_view"] >= 1
    # Files that could not be used, in reported studies (b1) or not (junk, the cut MIMIC file).
    assert summary["file_errors_by_reason"] == {"truncated": 2, "not_dicom": 1}
    by_id = {r["study_id"]: r for r in reports}
    # The flat study A: PA chosen over the lateral; B: its broken PA noted, its AP reported.
    assert by_id[UID_A]["source_file"] == "extra/a_pa.dcm" and by_id[UID_A]["num_files"] == 2
    assert by_id[UID_B]["source_file"] == "extra/b2.dcm" and by_id[UID_B]["num_files"] == 3
    assert by_id[UID_B]["view_position"] == "AP"
    assert [(e["file"], e["error"]) for e in by_id[UID_B]["file_errors"]] == [
        ("extra/b1.dcm", "truncated")]
    junk = next(e for e in errors if e["study_id"] == "file:extra/junk.dcm")
    assert junk["file"] == "extra/junk.dcm" and junk["reason"] == "not_dicom"
    assert summary["this_run"]["units"] == -(-len(expected) // OPTIONS.report.unit_size)
    assert len(list((out / PARTS_DIR).glob("*.parquet"))) == summary["this_run"]["units"]
    # Every report carries the API's fields; the JSON lines are the same rows.
    assert set(REPORT_COLUMNS) - {"patient_name", "patient_id", "patient_birth_date"} == set(
        pq.read_schema(out / "reports.parquet").names)
    lines = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(reports))
    assert all(r["report"] and r["decoding"] == "one-step-fused" for r in reports)


@pytest.mark.ray
def test_a_study_with_only_a_lateral_view_is_a_no_frontal_view_error(archive, reported):
    root, expected = archive
    laterals = [k for k, vs in _views(root).items() if all(v == "LATERAL" for v in vs)]
    errors = {e["study_id"]: e for e in _outcomes(reported[0])[1]}
    for key in laterals:
        assert errors[key]["reason"] == "no_frontal_view"
        assert errors[key]["file"].startswith(f"{key}/")  # its only file, named
        assert "lateral" in errors[key]["message"]


@pytest.mark.ray
def test_fhir_and_no_patient_identifiers(archive, reported):
    root, _ = archive
    out, summary = reported
    reports, _ = _outcomes(out)
    resources = [json.loads(line) for line in (out / "fhir.ndjson").read_text().splitlines()]
    assert len(resources) == len(reports) == summary["reports"]
    for resource, report in zip(resources, reports, strict=True):
        DiagnosticReport.model_validate(resource)
        assert base64.b64decode(resource["presentedForm"][0]["data"]).decode() == report["report"]
        assert resource["imagingStudy"][0]["identifier"]["value"] == (
            f"urn:oid:{report['study_instance_uid']}")
    # No patient name / ID from any header, no subject folder, in any output or part file.
    phi = {PATIENT, "PHI-123456"}
    for path in root.rglob("*.dcm"):
        try:
            header = read_header(path.read_bytes(), include_phi=True)
        except Exception:  # noqa: BLE001 - the planted junk
            continue
        phi |= {header["patient_name"], header["patient_id"]} - {None}
    phi |= {f"/{p.name}/" for p in (root / "files").glob("p*/p*")}
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    for value in phi:
        assert not any(value.encode() in b for b in blobs), value


_VARYING = ("run_id", "reported_at", "latency_ms")  # of the run or the clock, not the study


def _part_rows(out: Path) -> list[dict]:
    rows = []
    for part in sorted((out / PARTS_DIR).glob("*.parquet")):
        for row in pq.read_table(part).to_pylist():
            for name in _VARYING:
                row.pop(name)
            if row["fhir"]:
                fhir = json.loads(row["fhir"])
                del fhir["id"], fhir["issued"]  # the run's id, the time
                row["fhir"] = fhir
            rows.append(row)
    return sorted(rows, key=lambda r: r["study_id"])


@pytest.mark.ray
def test_decode_stage_gives_the_rows_of_decoding_in_the_actors(
        ray_cluster, checkpoint, archive, reported, tmp_path):
    root, expected = archive
    out, summary = reported
    in_actor = report_archive(str(checkpoint), str(root), str(tmp_path / "in-actor"),
                              _options("report.fhir=true", "pool.decode_in_actors=true"))
    _assert_exactly_once(tmp_path / "in-actor", expected)
    assert _part_rows(tmp_path / "in-actor") == _part_rows(out)  # reports and error rows
    assert sorted(p.name for p in (tmp_path / "in-actor" / PARTS_DIR).iterdir()) == sorted(
        p.name for p in (out / PARTS_DIR).iterdir())  # the same units
    # The figures: decode tasks (one per CPU of the session's 4-CPU cluster, at most one
    # per unit), the actors' busy fraction, peak memory of every process kind.
    run, old = summary["this_run"], in_actor["this_run"]
    assert run["decode_cpus"] == min(4, run["units"]) and old["decode_cpus"] == 0
    assert summary["options"]["decode_in_actors"] is False
    assert in_actor["options"]["decode_in_actors"] is True
    for this in (run, old):
        assert 0 < this["actor_busy_fraction"] <= 1
        assert this["peak_rss_mb"]["driver"] > 0 and this["peak_rss_mb"]["actor"] > 0
        assert this["warm_studies_per_s"] > 0
    assert run["peak_rss_mb"]["decode"] > 0 and old["peak_rss_mb"]["decode"] is None
    # both figures are rounded to 0.01: the rate within what that rounding allows
    task_s, rate = run["decode_task_s"], run["decode_images_per_s"]
    assert task_s > 0
    assert run["images"] / (task_s + 0.005) - 0.005 <= rate <= (
        run["images"] / max(task_s - 0.005, 1e-9) + 0.005)
    assert old["decode_images_per_s"] is None


@pytest.mark.ray
def test_nightly_rerun_reports_only_the_new_studies(ray_cluster, checkpoint, archive, reported,
                                                    tmp_path):
    root, expected = archive
    src, out = tmp_path / "archive", tmp_path / "out"
    shutil.copytree(root, src)
    shutil.copytree(reported[0], out, copy_function=shutil.copy2)
    before = _parts(out)
    (src / "extra" / "c.dcm").write_bytes(_dicom(5, "PA", UID_C))  # a new study
    (src / "extra" / "a_ap.dcm").write_bytes(_dicom(6, "AP", UID_A))  # late image of study A
    summary = report_archive(str(checkpoint), str(src), str(out), OPTIONS)
    assert summary["previously_done"] == len(expected)
    assert summary["this_run"]["studies"] == 1 and summary["late_files"] == 1
    _assert_exactly_once(out, {**expected, UID_C: None})
    after = _parts(out)
    assert all(after[name] == stat for name, stat in before.items())  # never rewritten
    assert len(after) == len(before) + 1
    reports, _ = _outcomes(out)
    assert {r["run_id"] for r in reports if r["study_id"] == UID_C} == {summary["run_id"]}
    # Nothing new: nothing reported, outputs the same.
    again = report_archive(str(checkpoint), str(src), str(out), OPTIONS)
    assert again["this_run"]["studies"] == 0 and again["studies"] == summary["studies"]


@pytest.mark.ray
def test_retry_errors_reports_transient_failures_again_and_only_those(
        ray_cluster, checkpoint, archive, reported, tmp_path):
    root, expected = archive
    out = tmp_path / "out"
    shutil.copytree(reported[0], out, copy_function=shutil.copy2)
    # As if one study's files could not be read last night: its ledger row says read_failed.
    victim = next(k for k, v in sorted(expected.items()) if v is None)
    for part in (out / PARTS_DIR).glob("*.parquet"):
        rows = pq.read_table(part).to_pylist()
        if any(r["study_id"] == victim for r in rows):
            for r in rows:
                if r["study_id"] == victim:
                    r.update(error="read_failed", message="could not read the file: OSError",
                             report=None, findings=None, impression=None, labels=None)
            pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA), part)
    plain = report_archive(str(checkpoint), str(root), str(out), OPTIONS)
    assert plain["this_run"]["studies"] == 0  # without the flag an error row is final
    _assert_exactly_once(out, {**expected, victim: "read_failed"})

    retry = _options("report.retry_errors=true")
    summary = report_archive(str(checkpoint), str(root), str(out), retry)
    assert summary["this_run"]["studies"] == 1  # that study only; lasting errors stay final
    assert summary["duplicates_dropped"] == 1  # the old error row, superseded
    _assert_exactly_once(out, expected)
    reports, _ = _outcomes(out)
    assert [r["run_id"] for r in reports if r["study_id"] == victim] == [summary["run_id"]]
    again = report_archive(str(checkpoint), str(root), str(out), retry)
    assert again["this_run"]["studies"] == 0


@pytest.mark.ray
def test_a_file_fixed_by_the_next_export_is_reported_and_its_error_superseded(
        ray_cluster, checkpoint, archive, reported, tmp_path, capfd):
    root, expected = archive
    src, out = tmp_path / "archive", tmp_path / "out"
    shutil.copytree(root, src, copy_function=shutil.copy2)
    shutil.copytree(reported[0], out, copy_function=shutil.copy2)
    options = _options("report.fhir=true", "report.fhir_patient_ref=Patient/{patient_id}")
    # The MIMIC study cut mid-copy (a `truncated` error last night) and, tonight, a flat
    # file cut inside its header: a study of its own, `file:extra/c.dcm`.
    cut = next(k for k, v in expected.items() if v == "truncated")
    (dcm,) = src.rglob(f"{cut}/*.dcm")
    c_dcm = _dicom(5, "PA", UID_C)
    (src / "extra" / "c.dcm").write_bytes(c_dcm[:300])
    night = report_archive(str(checkpoint), str(src), str(out), options)
    assert night["this_run"]["studies"] == 1 and night["changed_studies"] == 0
    _, errors = _outcomes(out)
    assert {e["study_id"] for e in errors} >= {cut, "file:extra/c.dcm"}

    # The next export completes the MIMIC file: --retry-errors reports it (with the rest
    # unchanged, nothing else is redone).
    synthesize_archive(tmp_path / "again", num_studies=9, seed=5, image_size=64,
                       lateral_fraction=0.3, lateral_only_fraction=0.25)  # same bytes
    shutil.copyfile(tmp_path / "again" / dcm.relative_to(src), dcm)
    retry = report_archive(str(checkpoint), str(src), str(out),
                           apply_overrides(options, ["report.retry_errors=true"]))
    assert retry["this_run"]["studies"] == 1 and retry["changed_studies"] == 1
    assert retry["duplicates_dropped"] == 1  # the truncated row, superseded
    assert "files of 1 error row(s) changed: reported again" in format_summary(retry)
    _assert_exactly_once(out, {**expected, cut: None, "file:extra/c.dcm": "truncated"})
    reports, _ = _outcomes(out)
    (fixed,) = [r for r in reports if r["study_id"] == cut]
    assert fixed["run_id"] == retry["run_id"] and fixed["file_errors"] == []
    header = read_header(dcm.read_bytes(), include_phi=True)
    assert fixed["accession_number"] == header["accession_number"] is not None
    assert fixed["study_date"] == header["study_date"] is not None

    # The flat file, completed: reported under the study its header names, without the
    # flag; its `file:` error row goes; the other studies are not redone.
    (src / "extra" / "c.dcm").write_bytes(c_dcm)
    plain = report_archive(str(checkpoint), str(src), str(out), options)
    assert plain["this_run"]["studies"] == 1 and plain["duplicates_dropped"] == 2
    _assert_exactly_once(out, {**expected, cut: None, UID_C: None})
    errors_csv = (out / ERRORS_CSV).read_text()
    assert cut not in errors_csv and "extra/c.dcm" not in errors_csv
    assert len(list(csv.DictReader(errors_csv.splitlines()))) == sum(
        v is not None for v in expected.values()) - 1
    again = report_archive(str(checkpoint), str(src), str(out), options)
    assert again["this_run"]["studies"] == 0

    # FHIR: the accession number as identifier, the study date, and a subject from the
    # template for the studies reported with it, the PatientID in fhir.ndjson only.
    resources = {r["imagingStudy"][0]["identifier"]["value"][len("urn:oid:"):]: r
                 for r in map(json.loads, (out / "fhir.ndjson").read_text().splitlines())}
    c_resource = resources[UID_C]
    assert c_resource["subject"] == {"reference": "Patient/PHI-123456"}
    assert c_resource["effectiveDateTime"] == "2000-01-01"  # the test files' StudyDate
    fixed_resource = resources[fixed["study_instance_uid"]]
    assert fixed_resource["identifier"][0]["value"] == header["accession_number"]
    assert fixed_resource["subject"]["reference"] == f"Patient/{header['patient_id']}"
    assert "subject" not in resources[UID_A]  # reported before the template was set
    for name in ("reports.parquet", "reports.jsonl", "errors.parquet", ERRORS_CSV):
        blob = (out / name).read_bytes()
        assert b"PHI-123456" not in blob and header["patient_id"].encode() not in blob
    # Accession numbers never reach the job's output.
    printed = capfd.readouterr()
    accessions = [r["accession_number"] for r in reports if r["accession_number"]]
    assert accessions and not any(a in printed.out + printed.err for a in accessions)


@pytest.mark.ray
def test_killed_job_rerun_reports_every_study_exactly_once(ray_cluster, checkpoint, tmp_path):
    src, out = tmp_path / "archive", tmp_path / "out"
    synthesize_archive(src, num_studies=16, seed=9, image_size=64, lateral_fraction=0.0)
    expected = dict.fromkeys(_views(src))
    # The ray-job entry point in its own process, one study per unit, slow (AR) decoding.
    cmd = [sys.executable, str(REPO / "jobs" / "report_archive.py"), "--checkpoint",
           str(checkpoint), "--archive", str(src), "--out", str(out), "--unit-size", "1",
           "--batch-size", "1", "--decoding", "ar", "--cpus-per-actor", "0.25", "--threads", "1",
           "--ray-address", ray_cluster.get_runtime_context().gcs_address]
    log = open(tmp_path / "job.log", "wb")
    job = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
                           stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not list((out / PARTS_DIR).glob("*.parquet")) and job.poll() is None:
        assert time.monotonic() < deadline, (tmp_path / "job.log").read_text()
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)  # a real kill: no cleanup, no atexit, no finally
    job.wait(timeout=30)
    log.close()
    assert job.returncode == -signal.SIGKILL, (tmp_path / "job.log").read_text()
    written = _parts(out)
    assert 1 <= len(written) < len(expected)  # died part way
    assert not (out / "summary.json").exists()  # a dead job never looks complete

    summary = report_archive(str(checkpoint), str(src), str(out),
                             _options("report.unit_size=1", "report.batch_size=1"))
    assert summary["previously_done"] >= len(written)
    assert summary["previously_done"] + summary["this_run"]["studies"] == len(expected)
    _assert_exactly_once(out, expected)
    after = _parts(out)
    assert all(after[name] == stat for name, stat in written.items())  # not redone
    assert not [p for p in (out / PARTS_DIR).iterdir() if not p.name.endswith(".parquet")]


@pytest.mark.ray
def test_s3_archive_and_output(ray_cluster, checkpoint, archive, s3_endpoint, tmp_path):
    import boto3

    root, expected = archive
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="pacs")
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), "pacs", f"archive/{path.relative_to(root).as_posix()}")
    summary = report_archive(str(checkpoint), "s3://pacs/archive", "s3://pacs/night",
                             _options("report.unit_size=8"),
                             s3_endpoint=s3_endpoint)
    assert summary["studies"] == len(expected) and summary["source"] == "s3://pacs/archive"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="pacs", Prefix="night/")["Contents"]}
    assert {"night/reports.parquet", "night/reports.jsonl", "night/errors.parquet",
            "night/summary.json"} <= keys
    parts = [k for k in keys if k.startswith("night/parts/") and k.endswith(".parquet")]
    assert len(parts) == summary["this_run"]["units"]
    local = tmp_path / "s3-copy"
    for key in keys:
        if key.endswith("/"):  # a folder marker pyarrow writes
            continue
        target = local / key
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("pacs", key, str(target))
    _assert_exactly_once(local / "night", expected)
    again = report_archive(str(checkpoint), "s3://pacs/archive", "s3://pacs/night", OPTIONS,
                           s3_endpoint=s3_endpoint)
    assert again["this_run"]["studies"] == 0 and again["studies"] == len(expected)
