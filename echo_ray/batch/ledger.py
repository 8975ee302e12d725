"""The ledger: the part files' schema, which studies they hold, and their consolidation into
the job's outputs (each study once, the latest row winning). Steps 2 and 4 of
`echo_ray.batch.job`."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from echo_ray.data.storage import Location
from echo_ray.text.labels import CHEXPERT_LABELS

PARTS_DIR = "parts"
REPORTS_FILE, REPORTS_JSONL, FHIR_FILE = "reports.parquet", "reports.jsonl", "fhir.ndjson"
ERRORS_FILE, ERRORS_CSV = "errors.parquet", "errors.csv"
# Error reasons of this job, beside `studies.STUDY_ERROR_REASONS`.
ARCHIVE_ERROR_REASONS = (
    "read_failed",  # the file could not be read from storage (after retries)
    "unexpected_error",  # the study made the reporting code raise (see the actor's log)
)
# Errors that say nothing about the study itself: `--retry-errors` reports those again.
RETRYABLE_ERRORS = ARCHIVE_ERROR_REASONS
_PHI_KEYS = ("patient_name", "patient_id", "patient_birth_date")
_FHIR_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/echo-ray/echo-ray/fhir")

_FILE_ERROR = pa.struct([("file", pa.string()), ("error", pa.string()),
                         ("message", pa.string())])
_SENTENCE = pa.struct([("section", pa.string()), ("text", pa.string()),
                       ("confidence", pa.float64()), ("low_confidence", pa.bool_())])
# One row per study in a part file: the report fields of `studies.report_studies` (the HTTP
# API's), its error fields, and the ledger's own columns (last block).
PART_SCHEMA = pa.schema([
    ("study_id", pa.string()),
    ("study_instance_uid", pa.string()),
    ("series_instance_uid", pa.string()),
    ("sop_instance_uid", pa.string()),
    ("accession_number", pa.string()),  # never logged
    ("study_date", pa.string()),  # ISO 8601, the site's local time
    ("patient_name", pa.string()),  # only with include_phi
    ("patient_id", pa.string()),
    ("patient_birth_date", pa.string()),
    ("report", pa.string()),
    ("findings", pa.string()),
    ("impression", pa.string()),
    ("labels", pa.struct([(name, pa.float64()) for name in CHEXPERT_LABELS])),
    ("sentences", pa.list_(_SENTENCE)),
    ("model_id", pa.string()),
    ("model_version", pa.string()),
    ("decoding", pa.string()),
    ("num_tokens", pa.int32()),
    ("num_forwards", pa.int32()),
    ("tokens_per_forward", pa.float64()),
    ("latency_ms", pa.float64()),
    ("view_position", pa.string()),
    ("source_file", pa.string()),
    ("num_files", pa.int32()),
    ("file_errors", pa.list_(_FILE_ERROR)),
    ("error", pa.string()),
    ("message", pa.string()),
    # ledger
    ("files", pa.list_(pa.string())),  # the study's files as the outputs name them
    ("file_keys", pa.list_(pa.string())),  # hashes of their archive paths
    # Each file's size and modification time as the listing gave them before the file was
    # read: a later run tells from them that a file of an error row changed.
    ("file_sizes", pa.list_(pa.int64())),
    ("file_mtimes_ns", pa.list_(pa.int64())),
    ("fhir", pa.string()),  # the DiagnosticReport JSON (with fhir)
    # The report's DICOM Structured Report (with sr or store_sr): its SOP Instance UID
    # (deterministic: `interop.sr.sr_uids`), whether it was stored to the destination, and
    # why it could not be built or stored (the report row stands either way).
    ("sr_sop_instance_uid", pa.string()),
    ("sr_stored", pa.bool_()),
    ("sr_error", pa.string()),
    ("unit", pa.string()),
    ("run_id", pa.string()),
    ("reported_at", pa.string()),  # ISO 8601, UTC
])
_LEDGER_ONLY = ("error", "message", "files", "file_keys", "file_sizes", "file_mtimes_ns",
                "fhir", "unit")
REPORT_COLUMNS = tuple(n for n in PART_SCHEMA.names if n not in _LEDGER_ONLY)
# One row per study without a report; `file` names the file when the error is about one.
ERROR_SCHEMA = pa.schema([
    PART_SCHEMA.field("study_id"),
    PART_SCHEMA.field("study_instance_uid"),
    ("file", pa.string()),
    ("reason", pa.string()),
    PART_SCHEMA.field("message"),
    PART_SCHEMA.field("num_files"),
    PART_SCHEMA.field("files"),
    PART_SCHEMA.field("file_errors"),
    PART_SCHEMA.field("run_id"),
    PART_SCHEMA.field("reported_at"),
])


@dataclass(frozen=True)
class FileStamp:
    """What an error row recorded of one of its files: enough to tell a changed file."""

    study: str  # the error row's study key
    size: int | None  # bytes; None in parts written before stamps were recorded
    mtime_ns: int | None
    reported_at_ns: int | None  # when the row was written

    def changed(self, size: int | None, mtime_ns: int | None) -> bool:
        """Whether the file, now `size` bytes modified at `mtime_ns`, differs from what the
        row saw. A row without stamps (an older part) can only tell a file modified after
        the row was written."""
        if self.size is None and self.mtime_ns is None:
            return (mtime_ns is not None and self.reported_at_ns is not None
                    and mtime_ns > self.reported_at_ns)
        return ((size is not None and self.size is not None and size != self.size)
                or (mtime_ns is not None and self.mtime_ns is not None
                    and mtime_ns != self.mtime_ns))


@dataclass
class Ledger:
    """What the part files hold (`read_ledger`)."""

    done: set[str] = field(default_factory=set)  # study keys with a row
    known_files: set[str] = field(default_factory=set)  # file keys of those rows
    # file key -> its stamp, for every file of a study whose current row is an error
    error_files: dict[str, FileStamp] = field(default_factory=dict)


def read_ledger(parts: Location, *, retry_errors: bool = False) -> Ledger:
    """The study keys and file keys already in the part files, and the files of the
    studies whose current row is an error (to report again those whose files changed).

    With `retry_errors`, a study whose current row is a `RETRYABLE_ERRORS` error is not
    done: it is reported again, and its new row supersedes the old one.
    """
    if not parts.exists():
        return Ledger()
    table = _read_parts(parts, ["study_id", "file_keys", "file_sizes", "file_mtimes_ns",
                                "error", "unit", "reported_at"])
    errors = _current_errors(table)
    if retry_errors:
        retry = pc.fill_null(pc.is_in(errors.column("error"), pa.array(RETRYABLE_ERRORS)), False)
        again = pa.array(errors.filter(retry).column("study_id").to_pylist(), pa.string())
        table = table.filter(pc.invert(pc.is_in(table.column("study_id"), value_set=again)))
        errors = errors.filter(pc.invert(retry))
    keys = set(table.column("study_id").to_pylist())
    files = {k for ks in table.column("file_keys").to_pylist() for k in ks or ()}
    stamps = {}
    for row in errors.to_pylist():
        at = row["reported_at"]
        at_ns = int(datetime.fromisoformat(at).timestamp() * 1e9) if at else None
        sizes, mtimes = row["file_sizes"] or [], row["file_mtimes_ns"] or []
        for i, key in enumerate(row["file_keys"] or ()):
            stamps[key] = FileStamp(row["study_id"], sizes[i] if i < len(sizes) else None,
                                    mtimes[i] if i < len(mtimes) else None, at_ns)
    return Ledger(keys, files, stamps)


def unstored_sr_rows(parts: Location) -> list[dict]:
    """The current report rows whose SR was built but could not be stored (`sr_stored`
    false): what a run with `report.store_sr` stores again. Rows reported without
    `store_sr` (null) are not."""
    if not parts.exists():
        return []
    table = _read_parts(parts, ["study_id", "unit", "reported_at", "error", "sr_stored"])
    current, _ = _current_rows(table)
    table = table.take(current)
    wanted = pc.fill_null(pc.and_(table.column("error").is_null(),
                                  pc.invert(table.column("sr_stored"))), False)
    keys = table.filter(wanted).column("study_id")
    if not len(keys):
        return []
    full = _read_parts(parts)
    rows = full.take(_current_rows(full)[0])
    return rows.filter(pc.is_in(rows.column("study_id"), value_set=keys)).to_pylist()


def _current_errors(table: pa.Table) -> pa.Table:
    """The current rows (`_current_rows`) that are errors: only the studies with an error
    row are sorted, so a ledger of reports costs a filter."""
    with_error = table.filter(table.column("error").is_valid()).column("study_id")
    sub = table.filter(pc.is_in(table.column("study_id"), value_set=pc.unique(with_error)))
    sub = sub.take(_current_rows(sub)[0])
    return sub.filter(sub.column("error").is_valid())


_READ_GROUP = 512


def _read_parts(parts: Location, columns: list[str] | None = None) -> pa.Table:
    names = [n for n in parts.list_files(".parquet") if "/" not in n] if parts.exists() else []
    if not names:
        return PART_SCHEMA.empty_table().select(columns or PART_SCHEMA.names)
    # A scan keeps every file's Parquet metadata until it ends, and each file's rows as their
    # own chunks: reading the 15,625 parts of a million studies in one scan held 3.9 GB for
    # 0.9 GB of data. Scanned _READ_GROUP files at a time, each group's rows joined into one
    # chunk: 1.3 GB, in 16 s instead of 14.
    tables = []
    for start in range(0, len(names), _READ_GROUP):
        # An explicit schema: parts of an older version get its new columns as nulls.
        dataset = pads.dataset([parts.join(n).path for n in names[start:start + _READ_GROUP]],
                               filesystem=parts.fs, format="parquet", schema=PART_SCHEMA)
        tables.append(dataset.to_table(columns=columns).combine_chunks())
    return pa.concat_tables(tables)


def fhir_resource(row: dict, issued: datetime, *, subject: str | None = None) -> dict:
    """The FHIR DiagnosticReport of a report row, its id stable for the (study, run)."""
    from echo_ray.interop.fhir import diagnostic_report

    resource = diagnostic_report(row, issued=issued, subject=subject)
    resource["id"] = str(uuid.uuid5(_FHIR_NAMESPACE, f"{row['study_id']}\x1f{row['run_id']}"))
    return resource


def consolidate(dst: Location, *, include_phi: bool, fhir: bool) -> dict[str, Any]:
    """Write the final files from the part files (each study once); returns the counts."""
    # Every column but the ledger's file stamps, and one copy of each kept row; the JSON
    # files written a slice at a time (a million studies took 10.5 GB when they were built
    # in one piece from whole-table copies).
    table = _read_parts(dst.join(PARTS_DIR),
                        [n for n in PART_SCHEMA.names if n not in ("file_sizes", "file_mtimes_ns")
                         and (fhir or n != "fhir")])
    current, duplicates = _current_rows(table)
    current, moved = _drop_moved_files(table, current)
    duplicates += moved
    table = table.drop_columns(["file_keys"])
    is_error = table.column("error").is_valid().take(current)
    errors = table.take(current.filter(is_error))
    reports = table.take(current.filter(pc.invert(is_error)))
    del table
    columns = [c for c in REPORT_COLUMNS if include_phi or c not in _PHI_KEYS]
    report_table = reports.select(columns)
    dst.join(REPORTS_FILE).write_parquet(report_table)
    _write_lines(dst.join(REPORTS_JSONL), report_table, json.dumps)
    if fhir:
        _write_lines(dst.join(FHIR_FILE), reports, _fhir_line)
    error_rows = [_error_row(r) for r in errors.to_pylist()]
    dst.join(ERRORS_FILE).write_parquet(pa.Table.from_pylist(error_rows, schema=ERROR_SCHEMA))
    _write_errors_csv(dst.join(ERRORS_CSV), error_rows)
    srs = reports.column("sr_sop_instance_uid").is_valid()
    sr_counts = {"srs": pc.sum(srs).as_py() or 0,
                 "srs_stored": pc.sum(pc.fill_null(reports.column("sr_stored"), False)).as_py()
                 or 0,
                 "sr_errors": pc.sum(reports.column("sr_error").is_valid()).as_py() or 0}
    file_errors = Counter()
    images = 0
    for part in (reports, errors):
        flat = pc.list_flatten(part.column("file_errors"))
        file_errors.update(pc.struct_field(flat, "error").to_pylist())
        images += pc.sum(part.column("num_files")).as_py() or 0
    return {
        "studies": reports.num_rows + errors.num_rows,
        "reports": reports.num_rows,
        "errors": errors.num_rows,
        "images": images,
        "errors_by_reason": dict(sorted(Counter(r["reason"] for r in error_rows).items())),
        "file_errors_by_reason": dict(sorted(file_errors.items())),
        "duplicates_dropped": duplicates,
        **sr_counts,
        "files": [REPORTS_FILE, REPORTS_JSONL, *([FHIR_FILE] if fhir else []), ERRORS_FILE,
                  ERRORS_CSV],
    }


def _drop_moved_files(table: pa.Table, current: pa.Array) -> tuple[pa.Array, int]:
    """`current` less the error rows of `file:<path>` studies (a file whose header could
    not be read) whose file a later current row of another study holds: the file was fixed
    and now belongs to the study its header names. Returns the rows and how many went."""
    keys = table.column("study_id").take(current)
    lone = pc.and_(pc.starts_with(keys, "file:"),
                   table.column("error").take(current).is_valid())
    if not pc.any(lone).as_py():
        return current, 0
    rows = table.select(["study_id", "file_keys", "reported_at", "unit"]).take(current)
    lone_keys = pc.list_flatten(rows.filter(lone).column("file_keys")).unique()
    file_keys = rows.column("file_keys").combine_chunks()
    flat = pc.list_flatten(file_keys)
    hits = pc.is_in(flat, value_set=lone_keys)
    owners = pc.filter(pc.list_parent_indices(file_keys), hits).to_pylist()
    claimed: dict[str, list[tuple[str, str, str]]] = {}  # file key -> (study, time, unit)
    for i, key in zip(owners, pc.filter(flat, hits).to_pylist(), strict=True):
        claimed.setdefault(key, []).append(
            (rows["study_id"][i].as_py(), rows["reported_at"][i].as_py() or "",
             rows["unit"][i].as_py() or ""))
    drop = set()
    for i in pc.indices_nonzero(lone).to_pylist():
        study, at, unit = (rows["study_id"][i].as_py(), rows["reported_at"][i].as_py() or "",
                           rows["unit"][i].as_py() or "")
        for key in rows["file_keys"][i].as_py() or ():
            if any(other != study and (t, u) > (at, unit)
                   for other, t, u in claimed.get(key, ())):
                drop.add(i)
    keep = [i for i in range(len(current)) if i not in drop]
    return current.take(pa.array(keep, pa.int64())), len(drop)


_CSV_COLUMNS = ("study_id", "study_instance_uid", "file", "reason", "message", "num_files",
                "files", "file_errors", "run_id", "reported_at")


def _write_errors_csv(loc: Location, error_rows: list[dict], rows: int = 10_000) -> None:
    """errors.parquet as CSV for people and spreadsheets: the same rows and columns, the
    lists joined into text (`files` by "; ", `file_errors` as "file: reason (message)"
    joined by "; ")."""
    with loc.open_output() as out:
        for start in range(0, max(len(error_rows), 1), rows):
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            if start == 0:
                writer.writerow(_CSV_COLUMNS)
            for row in error_rows[start:start + rows]:
                writer.writerow([_csv_cell(row, name) for name in _CSV_COLUMNS])
            out.write(buffer.getvalue().encode())


def _csv_cell(row: dict, name: str) -> Any:
    if name == "files":
        return "; ".join(row["files"] or ())
    if name == "file_errors":
        return "; ".join(f"{e['file']}: {e['error']} ({e['message']})"
                         for e in row["file_errors"] or ())
    return row[name]


def _write_lines(loc: Location, table: pa.Table, line, rows: int = 10_000) -> None:
    """One line per row, `line(row dict)`, written `rows` rows at a time: a JSON file is
    never built in memory whole."""
    with loc.open_output() as out:
        for start in range(0, table.num_rows, rows):
            chunk = table.slice(start, rows).to_pylist()
            out.write("".join(line(r) + "\n" for r in chunk).encode())


def _fhir_line(row: dict) -> str:
    """The row's stored FHIR DiagnosticReport, or one built from it (older parts)."""
    return row["fhir"] or json.dumps(
        fhir_resource(row, datetime.fromisoformat(row["reported_at"])))


def _current_rows(table: pa.Table) -> tuple[pa.Array, int]:
    """The row of each study to keep, in study order: the latest (`reported_at`, then part
    name: deterministic); and how many older rows they supersede (a retried error, or two
    overlapping runs)."""
    keys = table.column("study_id").to_pylist()
    units = table.column("unit").to_pylist()
    times = table.column("reported_at").to_pylist()
    current: dict[str, int] = {}
    for i in sorted(range(len(keys)), key=lambda i: (keys[i], times[i] or "", units[i] or "")):
        current[keys[i]] = i
    rows = pa.array(sorted(current.values(), key=lambda i: keys[i]), pa.int64())
    return rows, len(keys) - len(current)


def _error_row(row: dict) -> dict:
    """An errors-table row: the file is named when the error is about one file."""
    file_errors = row["file_errors"] or []
    files = row["files"] or []
    one = files[0] if len(files) == 1 else (file_errors[0]["file"] if len(file_errors) == 1
                                            else None)
    return {"study_id": row["study_id"], "study_instance_uid": row["study_instance_uid"],
            "file": one, "reason": row["error"], "message": row["message"],
            "num_files": row["num_files"], "files": files, "file_errors": file_errors,
            "run_id": row["run_id"], "reported_at": row["reported_at"]}


def remove_temporary_parts(parts: Location) -> None:
    """Delete the temporary files a killed run left behind (never read: their names do not
    end in .parquet)."""
    if parts.is_s3 or not parts.exists():
        return
    for name in parts.list_files():
        if ".tmp-" in name:
            parts.fs.delete_file(parts.join(name).path)
