"""`echo-ray report`: every study of a DICOM archive reported exactly once, resumably.

The overnight job (DESIGN.md section 6). The archive is a MIMIC-CXR tree or a flat folder of
DICOM files, on local disk or S3; the output folder (local or S3) is the job's only state:

    parts/part-<hash>.parquet   the ledger: one file per work unit, one row per study
                                (a report or an error), written whole and atomically
    reports.parquet             one row per reported study: the HTTP API's fields
    reports.jsonl               the same rows as JSON lines
    fhir.ndjson                 (--fhir) one FHIR R4 DiagnosticReport per report
    errors.parquet              one row per study that has no report (study, file, reason)
    summary.json                the counts; written last (absent while a run is going)

How a run goes:

1. Discovery (driver): list the archive. A MIMIC path (`files/pXX/pSUBJECT/sSTUDY/X.dcm`)
   puts its file in study `sSTUDY`; any other DICOM file is grouped by the
   StudyInstanceUID of its header (read with a prefix read, a few threads), and a file
   whose header cannot be read is a study of its own, `file:<path>`. Side files (reports,
   CSV, ...) are skipped and counted. Study keys depend on the archive only: stable
   across runs.
2. Ledger: the study keys in `parts/` are done. Only the other studies are reported, so a
   rerun after a crash continues where it stopped, and a rerun over a grown archive (the
   nightly use) reports only the new studies. A new file of a study that is already done
   is counted as late and left alone: the study keeps its one report.
3. Units: the pending keys, sorted, cut into chunks of `unit_size`; a unit's part file is
   named by a hash of its keys. A Ray Data actor pool (one `ReportGenerator` per actor,
   `num_gpus` per actor on a cluster) reads each unit's files (parallel reads, the next
   batch prefetched while the model runs), reports the studies in batches of
   `batch_size` through `studies.report_studies` (frontal view choice, error rows), and
   writes the unit's part file in one atomic write (local: temporary file + rename; S3:
   one PUT). A job killed mid-write leaves at most a temporary file, which is ignored.
4. Consolidation (driver): every part is read, each study kept once (should two parts
   hold the same study, after two runs overlapped or after `--retry-errors` reported a
   failed study again, the latest row wins and the older one is counted), and the final
   files are written, each atomically, summary.json last.

No patient identifiers reach the outputs or the logs unless `include_phi`: MIMIC paths are
shown from the study folder down (`s50414267/<dicom_id>.dcm`), the ledger holds hashes of
paths, not paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray

from echo_ray import __version__
from echo_ray.data.dicom import DicomError, read_header
from echo_ray.data.prepare import MIMIC_IMAGE, init_ray, setup_model_actor
from echo_ray.data.storage import Location, resolve, resolve_model_dir
from echo_ray.text.labels import CHEXPERT_LABELS

FORMAT = "echo-ray-archive-report/1"
PARTS_DIR = "parts"
REPORTS_FILE, REPORTS_JSONL, FHIR_FILE = "reports.parquet", "reports.jsonl", "fhir.ndjson"
ERRORS_FILE, SUMMARY_FILE = "errors.parquet", "summary.json"
# Error reasons of this job, beside `studies.STUDY_ERROR_REASONS`.
ARCHIVE_ERROR_REASONS = (
    "read_failed",  # the file could not be read from storage (after retries)
    "unexpected_error",  # the study made the reporting code raise (see the actor's log)
)
# Errors that say nothing about the study itself: `--retry-errors` reports those again.
RETRYABLE_ERRORS = ARCHIVE_ERROR_REASONS
DICOM_SUFFIXES = (".dcm", ".dicom")
HEADER_PREFIX = 64 * 1024  # bytes read to find a flat file's StudyInstanceUID
_PROGRESS_EVERY_S = 10.0
_READ_ATTEMPTS = 3
_PHI_KEYS = ("patient_name", "patient_id", "patient_birth_date")
_FHIR_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/echo-ray/echo-ray/fhir")

_FILE_ERROR = pa.struct([("file", pa.string()), ("error", pa.string()),
                         ("message", pa.string())])
# One row per study in a part file: the report fields of `studies.report_studies` (the HTTP
# API's), its error fields, and the ledger's own columns (last block).
PART_SCHEMA = pa.schema([
    ("study_id", pa.string()),
    ("study_instance_uid", pa.string()),
    ("series_instance_uid", pa.string()),
    ("sop_instance_uid", pa.string()),
    ("patient_name", pa.string()),  # only with include_phi
    ("patient_id", pa.string()),
    ("patient_birth_date", pa.string()),
    ("report", pa.string()),
    ("findings", pa.string()),
    ("impression", pa.string()),
    ("labels", pa.struct([(name, pa.float64()) for name in CHEXPERT_LABELS])),
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
    ("fhir", pa.string()),  # the DiagnosticReport JSON (with fhir)
    ("unit", pa.string()),
    ("run_id", pa.string()),
    ("reported_at", pa.string()),  # ISO 8601, UTC
])
_LEDGER_ONLY = ("error", "message", "files", "file_keys", "fhir", "unit")
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
class ReportOptions:
    """How to report an archive (everything but the checkpoint and the locations)."""

    decoding: str = "one-step-fused"  # one of decoding.DECODING_MODES
    steps: int | None = None  # multi-step: forwards per block at most
    threshold: float = 0.9  # multi-step: tau
    max_new_tokens: int | None = None  # default: the model's max_response_len
    batch_size: int = 16  # studies per model call
    unit_size: int = 64  # studies per part file: the unit of work and of resumption
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    threads: int = 0  # torch threads per actor (0: one per CPU of the actor)
    io_threads: int = 8  # parallel file reads (per actor, and the driver's header reads)
    since: str | None = None  # YYYY-MM-DD or ISO datetime: files modified since then
    fhir: bool = False  # also write fhir.ndjson
    include_phi: bool = False  # patient name / ID / birth date and full paths in outputs
    retry_errors: bool = False  # report studies again whose row is a RETRYABLE_ERRORS error

    def validate(self) -> None:
        from echo_ray.decode.modes import DECODING_MODES

        if self.decoding not in DECODING_MODES:
            raise ValueError(f"decoding {self.decoding!r}: choose one of {DECODING_MODES}")
        for name in ("batch_size", "unit_size", "actors", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.unit_size < self.batch_size:
            raise ValueError(f"unit_size ({self.unit_size}) must be >= batch_size "
                             f"({self.batch_size}): a model call takes studies of one unit")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor must be > 0 and gpus_per_actor >= 0")
        self.since_timestamp()

    def since_timestamp(self) -> float | None:
        """`since` as seconds since the epoch (a date is midnight UTC), None without it."""
        if self.since is None:
            return None
        try:
            when = datetime.fromisoformat(self.since)
        except ValueError:
            raise ValueError(
                f"since {self.since!r}: expected a date like 2024-05-31 or an ISO datetime"
            ) from None
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


# ---------------------------------------------------------------------------------------------
# Discovery (driver side: a listing, and header reads for files outside a MIMIC tree)


@dataclass
class ArchiveStudy:
    """One study to report: its key and its files (archive paths and output names)."""

    key: str
    paths: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    newest: float = 0.0  # latest modification time of its files (epoch seconds)


@dataclass
class Discovery:
    """What an archive holds, less what the ledger already has."""

    studies: list[ArchiveStudy]  # to report, sorted by key
    layout: str  # mimic, flat, mixed or empty
    dicom_files: int  # candidate files in the archive
    side_files: int  # skipped: not DICOM by name (reports, CSV, ...) or content
    late_files: int  # new files of studies that are already reported
    before_since: int  # studies (MIMIC) or files (flat) older than `since`


def file_key(path: str) -> str:
    """The ledger's name for an archive path (a hash: paths may hold patient identifiers)."""
    return hashlib.sha256(path.encode()).hexdigest()[:24]


def discover_studies(
    src: Location,
    *,
    done: set[str] = frozenset(),
    known_files: set[str] = frozenset(),
    since: float | None = None,
    include_phi: bool = False,
    io_threads: int = 8,
    exclude: str | None = None,
) -> Discovery:
    """Group the archive's DICOM files into studies (module docstring, step 1).

    Args:
        done: study keys already reported (skipped).
        known_files: `file_key`s of files already reported (not even read).
        since: only studies (MIMIC) or files (flat) modified at or after this epoch time.
        exclude: a path under `src` to leave out (the output folder, when inside it).
    """
    listing = _list(src, exclude)
    mimic: dict[str, ArchiveStudy] = {}
    flat: list[tuple[str, float, int | None, bool]] = []
    side = late = old = mimic_files = 0
    for rel, mtime, size in listing:
        base = posixpath.basename(rel)
        suffix = posixpath.splitext(base)[1].lower()
        named_dicom = suffix in DICOM_SUFFIXES
        # Candidates: .dcm/.dicom, and names PACS exports use (no extension, or a UID
        # such as 1.2.840.113619.2.1.5) when their content turns out to be DICOM.
        if base.startswith(".") or base.upper() == "DICOMDIR" or not (
                named_dicom or not suffix or suffix[1:].isdigit()):
            side += 1
            continue
        m = MIMIC_IMAGE.search(rel)
        mimic_files += bool(m)
        if file_key(rel) in known_files:
            continue
        if m:
            key = f"s{m.group('study')}"
            if key in done:
                late += 1
                continue
            study = mimic.setdefault(key, ArchiveStudy(key))
            study.paths.append(rel)
            study.names.append(rel if include_phi else f"{key}/{base}")
            study.newest = max(study.newest, mtime)
        elif since is not None and mtime < since:
            old += 1
        else:
            flat.append((rel, mtime, size, named_dicom))
    studies = []
    for study in mimic.values():
        if since is not None and study.newest < since:
            old += 1
        else:
            studies.append(study)
    grouped: dict[str, ArchiveStudy] = {}
    with ThreadPoolExecutor(io_threads) as pool:
        keys = pool.map(lambda f: _header_study(src, f[0], f[2]), flat)
        for (rel, mtime, _, named_dicom), (uid, reason) in zip(flat, keys, strict=True):
            if reason == "not_dicom" and not named_dicom:
                side += 1  # not named .dcm and not DICOM: a side file (README, ...)
                continue
            key = uid or f"file:{rel}"
            if key in done:
                late += 1
                continue
            study = grouped.setdefault(key, ArchiveStudy(key))
            study.paths.append(rel)
            study.names.append(rel)
            study.newest = max(study.newest, mtime)
    studies += grouped.values()
    for study in studies:  # files in a stable order: the view choice breaks ties by order
        order = sorted(range(len(study.paths)), key=study.paths.__getitem__)
        study.paths = [study.paths[i] for i in order]
        study.names = [study.names[i] for i in order]
    dicom_files = len(listing) - side
    other = dicom_files - mimic_files
    layout = ("empty" if not dicom_files else "mimic" if not other else
              "flat" if not mimic_files else "mixed")
    return Discovery(sorted(studies, key=lambda s: s.key), layout, dicom_files, side, late, old)


def _list(src: Location, exclude: str | None) -> list[tuple[str, float, int | None]]:
    """(path relative to src, modification time, size) of every file under src, sorted."""
    info = src.fs.get_file_info(src.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"archive {src.uri} does not exist")
    if info.type == pafs.FileType.File:
        raise NotADirectoryError(f"archive {src.uri} is a file; expected a folder or prefix")
    base = src.path.rstrip("/") + "/"
    out = []
    for item in src.fs.get_file_info(pafs.FileSelector(src.path, recursive=True)):
        if item.type != pafs.FileType.File:
            continue
        if exclude and (item.path == exclude or item.path.startswith(exclude.rstrip("/") + "/")):
            continue
        rel = item.path[len(base):] if item.path.startswith(base) else item.path
        mtime = item.mtime.timestamp() if item.mtime is not None else 0.0
        out.append((rel, mtime, item.size))
    return sorted(out)


def _header_study(src: Location, rel: str, size: int | None) -> tuple[str | None, str | None]:
    """(StudyInstanceUID, None) of a file, or (None, error reason) when it cannot be read.

    Reads the first HEADER_PREFIX bytes; the whole file only when the header goes on
    past them (an element cut short raises `truncated`; an element read whole is right).
    """
    loc = src.join(rel)
    try:
        with loc.fs.open_input_file(loc.path) as f:
            data = f.read(HEADER_PREFIX)
        whole = size is not None and len(data) >= size
        try:
            header = read_header(data)
        except DicomError as err:
            if whole or err.reason != "truncated":
                return None, err.reason
            header = None
        if header is None or (header["study_instance_uid"] is None and not whole):
            header = read_header(_read_bytes(loc))
        return header["study_instance_uid"], None
    except DicomError as err:
        return None, err.reason
    except OSError:
        return None, "read_failed"


def _read_bytes(loc: Location) -> bytes:
    for attempt in range(_READ_ATTEMPTS):
        try:
            return loc.read_bytes()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == _READ_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def plan_units(studies: Sequence[ArchiveStudy], unit_size: int) -> list[dict[str, Any]]:
    """Cut the (sorted) studies into work units, each named by a hash of its study keys."""
    units = []
    for i in range(0, len(studies), unit_size):
        chunk = studies[i:i + unit_size]
        digest = hashlib.sha256("\n".join(s.key for s in chunk).encode()).hexdigest()[:16]
        units.append({
            "unit": f"part-{digest}",
            "studies": json.dumps([{"key": s.key, "paths": s.paths, "names": s.names}
                                   for s in chunk]),
            "num_studies": len(chunk),
        })
    return units


# ---------------------------------------------------------------------------------------------
# The job


def report_archive(
    checkpoint: str,
    archive: str,
    out: str,
    options: ReportOptions = ReportOptions(),
    *,
    s3_endpoint: str | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Report every study of `archive` not yet in `out`; consolidate `out` (module docstring).

    Returns:
        The summary (also written to `out`/summary.json).
    """
    options.validate()
    start = time.perf_counter()
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    src = resolve(archive, s3_endpoint=s3_endpoint)
    dst = resolve(out, s3_endpoint=s3_endpoint)
    model = resolve_model_dir(checkpoint, s3_endpoint=s3_endpoint, what="--checkpoint")
    parts = dst.join(PARTS_DIR)
    summary_loc = dst.join(SUMMARY_FILE)
    if summary_loc.exists():
        dst.fs.delete_file(summary_loc.path)  # written again, last, when complete
    done, known_files = _ledger(parts, retry_errors=options.retry_errors)
    same_fs = type(src.fs) is type(dst.fs)
    found = discover_studies(
        src, done=done, known_files=known_files, since=options.since_timestamp(),
        include_phi=options.include_phi, io_threads=options.io_threads,
        exclude=dst.path if same_fs else None,
    )
    units = plan_units(found.studies, options.unit_size)
    _log(f"{src.uri} ({found.layout} layout): {found.dicom_files} DICOM file(s), "
         f"{found.side_files} side file(s) skipped; {len(done)} studies already in {dst.uri}, "
         f"{len(found.studies)} to report in {len(units)} unit(s)"
         + (f", {found.late_files} late file(s) of reported studies left alone"
            if found.late_files else "")
         + (f", {found.before_since} older than {options.since} skipped"
            if options.since else ""))
    this_run = {"studies": 0, "reports": 0, "errors": 0, "images": 0, "units": len(units),
                "errors_by_reason": {}, "actor_busy_s": {}}
    if units:
        init_ray(ray_address)
        this_run.update(_run_units(units, src, parts, model, options, run_id))
    summary = consolidate(dst, options, fhir=options.fhir)
    wall = time.perf_counter() - start
    this_run["wall_time_s"] = round(wall, 2)
    this_run["studies_per_s"] = round(this_run["studies"] / wall, 3) if units else None
    busy = max(this_run["actor_busy_s"].values(), default=0.0)
    this_run["busy_studies_per_s"] = round(this_run["studies"] / busy, 3) if busy else None
    summary.update(
        format=FORMAT, echo_ray_version=__version__, run_id=run_id, source=src.uri,
        out=dst.uri, checkpoint=model.uri, layout=found.layout, dicom_files=found.dicom_files,
        side_files=found.side_files, late_files=found.late_files,
        before_since=found.before_since, previously_done=len(done), this_run=this_run,
        studies_per_s=this_run["studies_per_s"], wall_time_s=this_run["wall_time_s"],
        options=asdict(options),
    )
    summary_loc.write_text(json.dumps(summary, indent=2, sort_keys=True))
    _cleanup_temporary(parts)
    _log(f"done in {wall:.1f} s: {this_run['studies']} studies this run "
         f"({this_run['reports']} reports, {this_run['errors']} errors); {dst.uri} holds "
         f"{summary['studies']} studies: {summary['reports']} reports, {summary['errors']} "
         f"errors {json.dumps(summary['errors_by_reason'], sort_keys=True)}")
    return summary


def _ledger(parts: Location, *, retry_errors: bool = False) -> tuple[set[str], set[str]]:
    """The study keys and file keys already in the part files.

    With `retry_errors`, a study whose current row is a `RETRYABLE_ERRORS` error is not
    done: it is reported again, and its new row supersedes the old one.
    """
    if not parts.exists():
        return set(), set()
    table = _read_parts(parts, ["study_id", "file_keys", "error", "unit", "reported_at"])
    if retry_errors:
        table = table.take(_current_rows(table)[0])
        retry = pc.is_in(table.column("error"), pa.array(RETRYABLE_ERRORS))
        table = table.filter(pc.invert(pc.fill_null(retry, False)))
    keys = set(table.column("study_id").to_pylist())
    files = {k for ks in table.column("file_keys").to_pylist() for k in ks or ()}
    return keys, files


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


def _run_units(units, src, parts, model, options, run_id) -> dict[str, Any]:
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    # Ray Data's progress bars are for terminals; the progress lines below print either way.
    ctx.enable_progress_bars = sys.stdout.isatty()
    items = [{"unit": u["unit"], "studies": u["studies"]} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _ArchiveActor,
        fn_constructor_kwargs={"model": model, "src": src, "parts": parts, "options": options,
                               "run_id": run_id},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
    )
    total = sum(u["num_studies"] for u in units)
    reasons: Counter = Counter()
    busy: Counter = Counter()
    counts = Counter()
    t0 = last = time.perf_counter()
    for row in ds.iter_rows():
        counts.update(units=1, studies=row["studies"], reports=row["reports"],
                      errors=row["errors"], images=row["images"])
        reasons.update(json.loads(row["errors_by_reason"]))
        busy[row["actor"]] += row["seconds"]
        now = time.perf_counter()
        if now - last >= _PROGRESS_EVERY_S or counts["units"] in (1, len(units)):
            last = now
            rate = counts["studies"] / (now - t0)
            eta = (total - counts["studies"]) / rate if rate else float("nan")
            _log(f"{counts['units']}/{len(units)} units, {counts['studies']}/{total} studies "
                 f"({counts['errors']} errors), {rate:.2f} studies/s, "
                 f"{now - t0:.0f} s, about {eta:.0f} s to go")
    return {"studies": counts["studies"], "reports": counts["reports"],
            "errors": counts["errors"], "images": counts["images"],
            "errors_by_reason": dict(sorted(reasons.items())),
            "actor_busy_s": {k: round(v, 2) for k, v in sorted(busy.items())},
            "pipeline_s": round(time.perf_counter() - t0, 2)}


def _log(message: str) -> None:
    print(f"[echo-ray report] {message}", file=sys.__stdout__, flush=True)


# ---------------------------------------------------------------------------------------------
# The actor: one model replica; a unit in, its part file written, its counts out


class _ArchiveActor:
    def __init__(self, *, model: Location, src: Location, parts: Location,
                 options: ReportOptions, run_id: str) -> None:
        from echo_ray.data.storage import local_model_dir, model_name
        from echo_ray.decode.predictor import ReportGenerator

        threads = options.threads or max(1, int(options.cpus_per_actor))
        device = setup_model_actor(threads, options.gpus_per_actor > 0)
        self.tmp = tempfile.mkdtemp(prefix="echo-report-")
        self.generator = ReportGenerator.from_checkpoint(
            local_model_dir(model, os.path.join(self.tmp, "model")), decoding=options.decoding,
            steps=options.steps, threshold=options.threshold,
            max_new_tokens=options.max_new_tokens, model_id=model_name(model.uri),
            include_phi=options.include_phi,
        ).to(device)
        self.generator.warm_up(min(options.batch_size, 2))  # not in the first unit's timing
        self.src, self.parts, self.options, self.run_id = src, parts, options, run_id
        self.io = ThreadPoolExecutor(options.io_threads)
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = [self.report_unit(unit, json.loads(studies)) for unit, studies in
               zip(batch.column("unit").to_pylist(), batch.column("studies").to_pylist(),
                   strict=True)]
        return pa.Table.from_pylist(out)

    def report_unit(self, unit: str, studies: list[dict]) -> dict[str, Any]:
        start = time.perf_counter()
        size = self.options.batch_size
        chunks = [studies[i:i + size] for i in range(0, len(studies), size)]
        rows = []
        pending = self._submit_reads(chunks[0])
        for i, chunk in enumerate(chunks):
            current = pending
            if i + 1 < len(chunks):  # prefetch: the next batch is read while this one runs
                pending = self._submit_reads(chunks[i + 1])
            rows += self._report(chunk, current)
        reported_at = datetime.now(UTC)
        for row in rows:
            row.update(unit=unit, run_id=self.run_id, reported_at=reported_at.isoformat())
            if self.options.fhir and row["error"] is None:
                row["fhir"] = json.dumps(fhir_resource(row, reported_at))
        self.parts.join(f"{unit}.parquet").write_parquet(
            pa.Table.from_pylist(rows, schema=PART_SCHEMA))
        reasons = Counter(r["error"] for r in rows if r["error"] is not None)
        return {
            "unit": unit, "actor": self.actor, "studies": len(rows),
            "reports": sum(r["error"] is None for r in rows), "errors": sum(reasons.values()),
            "images": sum(len(s["paths"]) for s in studies),
            "errors_by_reason": json.dumps(reasons), "seconds": time.perf_counter() - start,
        }

    def _submit_reads(self, chunk: list[dict]) -> list[list]:
        return [[(name, self.io.submit(_read_bytes, self.src.join(path)))
                 for path, name in zip(s["paths"], s["names"], strict=True)] for s in chunk]

    def _report(self, chunk: list[dict], reads: list[list]) -> list[dict]:
        from echo_ray.decode.studies import report_studies

        files, read_errors = [], []
        for study_reads in reads:
            good, errors = [], []
            for name, future in study_reads:
                try:
                    good.append((name, future.result()))
                except OSError as err:
                    errors.append({"file": name, "error": "read_failed",
                                   "message": f"could not read the file: {type(err).__name__}"})
            files.append(good)
            read_errors.append(errors)
        todo = [i for i, f in enumerate(files) if f]  # studies with something to report on
        results: list[dict | None] = [None] * len(chunk)
        for i, result in zip(todo, self._report_studies(
                report_studies, [files[i] for i in todo], [chunk[i]["key"] for i in todo]),
                strict=True):
            results[i] = result
        rows = []
        for study, result, errors in zip(chunk, results, read_errors, strict=True):
            if result is None:  # every file failed to read
                result = {"study_id": study["key"], "error": "read_failed",
                          "message": errors[0]["message"], "num_files": len(study["paths"]),
                          "file_errors": []}
            result["file_errors"] = [*result.get("file_errors", []), *errors]
            result["num_files"] = len(study["paths"])
            row = {name: result.get(name) for name in PART_SCHEMA.names}
            row.update(files=study["names"], file_keys=[file_key(p) for p in study["paths"]])
            rows.append(row)
        return rows

    def _report_studies(self, report_studies, files: list, keys: list[str]) -> list[dict]:
        """report_studies on the batch; should it raise, study by study, so one study that
        breaks the code becomes one error row instead of failing its whole unit."""
        if not files:
            return []
        try:
            return report_studies(self.generator, files, study_ids=keys)
        except Exception:  # noqa: BLE001 - retried one by one just below
            pass
        results = []
        for study_files, key in zip(files, keys, strict=True):
            try:
                results += report_studies(self.generator, [study_files], study_ids=[key])
            except Exception as err:  # noqa: BLE001 - one error row, the batch goes on
                _log(f"study {key}: {type(err).__name__} while reporting")
                results.append({"study_id": key, "error": "unexpected_error",
                                "message": f"reporting raised {type(err).__name__}",
                                "file_errors": []})
        return results


def fhir_resource(row: dict, issued: datetime) -> dict:
    """The FHIR DiagnosticReport of a report row, its id stable for the (study, run)."""
    from echo_ray.interop.fhir import diagnostic_report

    resource = diagnostic_report(row, issued=issued)
    resource["id"] = str(uuid.uuid5(_FHIR_NAMESPACE, f"{row['study_id']}\x1f{row['run_id']}"))
    return resource


# ---------------------------------------------------------------------------------------------
# Consolidation (driver side)


def consolidate(dst: Location, options: ReportOptions, *, fhir: bool) -> dict[str, Any]:
    """Write the final files from the part files (each study once); returns the counts."""
    # Every column but the ledger's file hashes, and one copy of each kept row; the JSON
    # files written a slice at a time (a million studies took 10.5 GB when they were built
    # in one piece from whole-table copies).
    table = _read_parts(dst.join(PARTS_DIR),
                        [n for n in PART_SCHEMA.names if n != "file_keys"
                         and (fhir or n != "fhir")])
    current, duplicates = _current_rows(table)
    is_error = table.column("error").is_valid().take(current)
    errors = table.take(current.filter(is_error))
    reports = table.take(current.filter(pc.invert(is_error)))
    del table
    columns = [c for c in REPORT_COLUMNS if options.include_phi or c not in _PHI_KEYS]
    report_table = reports.select(columns)
    dst.join(REPORTS_FILE).write_parquet(report_table)
    _write_lines(dst.join(REPORTS_JSONL), report_table, json.dumps)
    if fhir:
        _write_lines(dst.join(FHIR_FILE), reports, _fhir_line)
    error_rows = [_error_row(r) for r in errors.to_pylist()]
    dst.join(ERRORS_FILE).write_parquet(pa.Table.from_pylist(error_rows, schema=ERROR_SCHEMA))
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
        "files": [REPORTS_FILE, REPORTS_JSONL, *([FHIR_FILE] if fhir else []), ERRORS_FILE],
    }


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


def _cleanup_temporary(parts: Location) -> None:
    """Temporary files a killed run left behind (never read: their names do not end in
    .parquet)."""
    if parts.is_s3 or not parts.exists():
        return
    for name in parts.list_files():
        if ".tmp-" in name:
            parts.fs.delete_file(parts.join(name).path)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few readable lines (what `echo-ray report` prints)."""
    run = summary["this_run"]
    rate = run["studies_per_s"]
    return "\n".join([
        f"source        {summary['source']} ({summary['layout']} layout, "
        f"{summary['dicom_files']} DICOM files, {summary['side_files']} side files skipped)",
        f"this run      {run['studies']} studies ({run['images']} images) in {run['units']} "
        f"unit(s): {run['reports']} reports, {run['errors']} errors "
        f"{json.dumps(run['errors_by_reason'], sort_keys=True)}",
        f"speed         {run['wall_time_s']} s wall"
        + (f", {rate:.2f} studies/s end to end" if rate else ""),
        f"output        {summary['out']}: {summary['studies']} studies, {summary['reports']} "
        f"reports, {summary['errors']} errors "
        f"{json.dumps(summary['errors_by_reason'], sort_keys=True)}",
        f"files         {', '.join(summary['files'])}, {SUMMARY_FILE}"
        + (f"; {summary['late_files']} late file(s) of reported studies left alone"
           if summary["late_files"] else ""),
    ])

