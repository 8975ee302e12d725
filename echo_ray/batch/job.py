"""`echo-ray report`: every study of a DICOM archive reported exactly once, resumably.

The overnight job (docs/ARCHITECTURE.md section 3.5). The archive is a MIMIC-CXR tree or a
flat folder of DICOM files, on local disk or S3, or a PACS's DICOMweb root
(`dicomweb://HOST:PORT/PATH`: studies found with QIDO-RS, instances read with WADO-RS;
`sources.py`); the output folder (local or S3) is the job's only state:

    parts/part-<hash>.parquet   the ledger: one file per work unit, one row per study
                                (a report or an error), written whole and atomically
    reports.parquet             one row per reported study: the HTTP API's fields
    reports.jsonl               the same rows as JSON lines
    fhir.ndjson                 (--fhir) one FHIR R4 DiagnosticReport per report
    errors.parquet              one row per study that has no report (study, file, reason)
    errors.csv                  the same rows as CSV, the lists joined into text
    sr/<hash>.dcm               (--sr) one DICOM Structured Report per report
    summary.json                the counts; written last (absent while a run is going)

How a run goes:

1. Discovery (driver, `discovery.py`): list the archive. A MIMIC path
   (`files/pXX/pSUBJECT/sSTUDY/X.dcm`) puts its file in study `sSTUDY`; any other DICOM file
   is grouped by the StudyInstanceUID of its header (read with a prefix read, a few
   threads), and a file whose header cannot be read is a study of its own, `file:<path>`.
   Side files (reports, CSV, ...) are skipped and counted. A DICOMweb archive is searched
   instead: the studies with a CR/DX series (`data.modalities`), keyed by
   StudyInstanceUID, `--since` a StudyDate filter of the search. Study keys depend on the
   archive only: stable across runs.
2. Ledger (`ledger.py`): the study keys in `parts/` are done. Only the other studies are
   reported, so a rerun after a crash continues where it stopped, and a rerun over a grown
   archive (the nightly use) reports only the new studies. A new file of a study that is
   already reported is counted as late and left alone: the study keeps its one report. A
   study whose row is an error is reported again when one of its files changed since the
   row (size or modification time, which every row records per file) or it got a new
   file: a file caught mid-copy (`truncated`) and completed by the next export is
   reported. Unchanged studies are never redone.
3. Units (`discovery.plan_units`, `decoder.py`, `actor.py`): the pending keys, sorted, cut
   into chunks of `unit_size`; a unit's part file is named by a hash of its keys. A Ray
   Data pipeline, one unit per block: CPU tasks (`decoder.decode_units`, `pool.decode_cpus`
   at once, one CPU each) read each unit's files (parallel reads) and prepare every study
   (`studies.prepare_study`: frontal view choice, DICOM decode, resize to the model's grid,
   error rows); a pool of model actors (`ArchiveActor`, one `ReportGenerator` each,
   `num_gpus` per actor on a cluster) receives the prepared images, never DICOM bytes,
   runs the model on batches of `batch_size` (`studies.report_prepared`), builds, writes
   (`--sr`) and stores (`--store-sr`) each report's DICOM SR, and, once every
   study of the unit has a report or an error row, writes the unit's part file in one
   atomic write (local: temporary file + rename; S3: one PUT). A job killed mid-write
   leaves at most a temporary file, which is ignored. Ray Data's streaming executor holds
   the decode stage back when the actors fall behind, so memory stays bounded. With
   `pool.decode_in_actors` the actors read and prepare their units themselves, serially
   with the model (the design before the decode stage, kept for comparison).
4. Consolidation (driver, `ledger.consolidate`): every part is read, each study kept once
   (should two parts hold the same study, after two runs overlapped or after
   `--retry-errors` reported a failed study again, the latest row wins and the older one is
   counted), and the final files are written, each atomically, summary.json last.

DICOM Structured Reports (`--sr`, `--store-sr`; `actor.py`): each report's SR is built in
the actor from the report and the source image's header (kept by the decode stage for this
alone), written to `sr/` and/or stored to `report.sr_destination` (default: the dicomweb://
archive) before the unit's part file is written; the part rows record its UID
(`sr_sop_instance_uid`), `sr_stored` and `sr_error`. An SR that could not be stored leaves
its report in place; the next run with `--store-sr` stores it (`_store_earlier_srs`) and
records that in a part file of its own. A study is reported once, so its SR is stored once;
a unit redone after a kill stores the same SR (its UID is deterministic), which the PACS
keeps once.

No patient identifiers reach the outputs or the logs unless `include_phi`: MIMIC paths are
shown from the study folder down (`s50414267/<dicom_id>.dcm`), the ledger holds hashes of
paths, not paths. The SRs in `sr/` are the exception: DICOM documents about a patient, they
carry the source image's Patient and Study modules, as the PACS's copy does.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import ray

from echo_ray import __version__
from echo_ray.batch.actor import SR_DIR, ArchiveActor, sr_file_name
from echo_ray.batch.decoder import decode_units, log
from echo_ray.batch.discovery import plan_units
from echo_ray.batch.ledger import (
    PART_SCHEMA,
    PARTS_DIR,
    consolidate,
    read_ledger,
    remove_temporary_parts,
    unstored_sr_rows,
)
from echo_ray.batch.sources import DicomwebSource, FolderSource, archive_source
from echo_ray.config.schema import ConfigError, EchoConfig
from echo_ray.data.storage import resolve, resolve_model_dir
from echo_ray.interop.dicomweb import DicomwebClient, is_dicomweb
from echo_ray.model.folder import model_image_size
from echo_ray.runtime.cluster import (
    decode_tasks,
    init_ray,
    peak_rss_kib,
    require_shared_storage,
)

FORMAT = "echo-ray-archive-report/1"
SUMMARY_FILE = "summary.json"
_PROGRESS_EVERY_S = 10.0


def report_archive(
    checkpoint: str,
    archive: str,
    out: str,
    config: EchoConfig | None = None,
    *,
    s3_endpoint: str | None = None,
    ray_address: str | None = None,
    shared_storage: bool = False,
) -> dict[str, Any]:
    """Report every study of `archive` not yet in `out`; consolidate `out` (module docstring).

    Args:
        config: its `report`, `decoding`, `pool` and `data.modalities` settings are used
            (default: the tiny preset's).
        shared_storage: local paths are one filesystem shared by every Ray node; without
            it a multi-node cluster refuses them before any work
            (`runtime.cluster.require_shared_storage`).

    Returns:
        The summary (also written to `out`/summary.json).
    """
    config = (config or EchoConfig()).validate()
    options = config.report
    start = time.perf_counter()
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    src = archive_source(archive, s3_endpoint=s3_endpoint, modalities=config.data.modalities)
    sr_store = _sr_store(archive, options)
    dst = resolve(out, s3_endpoint=s3_endpoint)
    model = resolve_model_dir(checkpoint, s3_endpoint=s3_endpoint, what="--checkpoint")
    parts = dst.join(PARTS_DIR)
    summary_loc = dst.join(SUMMARY_FILE)
    ledger = read_ledger(parts, retry_errors=options.retry_errors)
    done = ledger.done
    folder = isinstance(src, FolderSource)
    same_fs = folder and type(src.loc.fs) is type(dst.fs)
    found = src.discover(ledger, options, exclude=dst.path if same_fs else None)
    units = plan_units(found.studies, options.unit_size)
    log(f"{src.uri} ({found.layout} layout): {found.dicom_files} DICOM file(s)"
        + (f", {found.side_files} side file(s) skipped; " if folder else
           f" in its {'/'.join(src.modalities)} series"
           + (f" of studies dated {options.since} or later" if options.since else "") + "; ")
        + f"{len(done)} studies already in {dst.uri}, "
        f"{len(found.studies)} to report in {len(units)} unit(s)"
        + (f", {found.changed_studies} of them error studies whose files changed"
           if found.changed_studies else "")
        + (f", {found.late_files} late file(s) of reported studies left alone"
           if found.late_files else "")
        + (f", {found.before_since} older than {options.since} skipped"
           if options.since and folder else ""))
    this_run = {"studies": 0, "reports": 0, "errors": 0, "images": 0, "units": len(units),
                "errors_by_reason": {}, "actor_busy_s": {}, "actor_start_s": {},
                "actor_busy_fraction": None,
                "decode_cpus": 0, "decode_task_s": 0.0, "decode_images_per_s": None,
                "srs_written": 0, "srs_stored": 0, "sr_errors": 0,
                "earlier_srs_stored": 0, "earlier_srs_failed": 0}
    if units:  # a run with nothing to report starts no Ray
        init_ray(ray_address)
        require_shared_storage({"--checkpoint": checkpoint,
                                "--archive": archive if folder else None, "--out": out},
                               shared=shared_storage, what="report")
    if summary_loc.exists():
        dst.fs.delete_file(summary_loc.path)  # written again, last, when complete
    if sr_store is not None:
        this_run.update(_store_earlier_srs(dst, src, sr_store, run_id, options.unit_size))
    if units:
        this_run.update(_run_units(units, src, parts, model, config, run_id,
                                   sr_dir=dst.join(SR_DIR), sr_store=sr_store))
    summary = consolidate(dst, include_phi=options.include_phi, fhir=options.fhir)
    wall = time.perf_counter() - start
    this_run["wall_time_s"] = round(wall, 2)
    this_run["studies_per_s"] = round(this_run["studies"] / wall, 3) if units else None
    busy = max(this_run["actor_busy_s"].values(), default=0.0)
    this_run["busy_studies_per_s"] = round(this_run["studies"] / busy, 3) if busy else None
    # The slowest stage's time: the busiest actor's, or the decode tasks' summed seconds
    # spread over the tasks that ran at once.
    stage = max(busy, this_run.get("decode_task_s", 0.0) / (this_run.get("decode_cpus") or 1))
    this_run["warm_studies_per_s"] = round(this_run["studies"] / stage, 3) if stage else None
    this_run.setdefault("peak_rss_mb", {"actor": None, "decode": None})
    this_run["peak_rss_mb"]["driver"] = round(peak_rss_kib() / 1024, 1)
    summary.update(
        format=FORMAT, echo_ray_version=__version__, run_id=run_id, source=src.uri,
        out=dst.uri, checkpoint=model.uri, layout=found.layout, dicom_files=found.dicom_files,
        side_files=found.side_files, late_files=found.late_files,
        changed_studies=found.changed_studies, before_since=found.before_since,
        previously_done=len(done) - found.changed_studies, this_run=this_run,
        studies_per_s=this_run["studies_per_s"], wall_time_s=this_run["wall_time_s"],
        options=options_record(config),
    )
    summary_loc.write_text(json.dumps(summary, indent=2, sort_keys=True))
    remove_temporary_parts(parts)
    log(f"done in {wall:.1f} s: {this_run['studies']} studies this run "
        f"({this_run['reports']} reports, {this_run['errors']} errors); {dst.uri} holds "
        f"{summary['studies']} studies: {summary['reports']} reports, {summary['errors']} "
        f"errors {json.dumps(summary['errors_by_reason'], sort_keys=True)}"
        + (f"; SRs this run: {this_run['srs_written']} written, {this_run['srs_stored']} "
           f"stored, {this_run['sr_errors']} failed" if options.sr or options.store_sr else ""))
    return summary


def _store_earlier_srs(dst, src, sr_store, run_id: str, chunk: int) -> dict[str, int]:
    """The SRs of earlier runs' reports that could not be stored (`sr_stored` false,
    `ledger.unstored_sr_rows`), stored now, `chunk` per request: each read from `sr/` or,
    for a DICOMweb archive, built again from its source instance's header (the same
    deterministic UID). A stored chunk gets new ledger rows (the same reports, `sr_stored`
    true) in a part file of its own, which supersede the old rows (consolidation's latest
    row wins; counted in `duplicates_dropped`). Part files are never rewritten."""
    from echo_ray.data.dicom import header_bytes
    from echo_ray.interop.destinations import DestinationError, store_instances
    from echo_ray.interop.sr import build_sr, sr_bytes

    rows = unstored_sr_rows(dst.join(PARTS_DIR))
    ready, failed = [], 0
    for row in rows:
        loc = dst.join(SR_DIR, sr_file_name(row["study_id"]))
        try:
            if loc.exists():
                ready.append((row, loc.read_bytes()))
            elif isinstance(src, DicomwebSource) and row["sop_instance_uid"]:
                data = src.client.retrieve_instance(row["study_instance_uid"],
                                                    row["series_instance_uid"],
                                                    row["sop_instance_uid"])
                ready.append((row, sr_bytes(build_sr(row, header_bytes(data)))))
            else:
                failed += 1  # neither an sr/ file nor a PACS to rebuild it from
        except (OSError, ValueError) as err:  # DicomwebError is a ValueError
            log(f"study {row['study_id']}: its SR could not be read or built again: "
                f"{type(err).__name__}")
            failed += 1
    stored = 0
    for start in range(0, len(ready), chunk):
        batch = ready[start:start + chunk]
        try:
            store_instances(sr_store, [blob for _, blob in batch])
        except DestinationError as err:
            log(f"{len(batch)} SR(s) of earlier runs not stored: {err}")
            failed += len(batch)
            continue
        now = datetime.now(UTC).isoformat()
        keys = "\n".join([run_id, *(row["study_id"] for row, _ in batch)])
        unit = f"part-sr-{hashlib.sha256(keys.encode()).hexdigest()[:16]}"
        rows_out = [{**row, "sr_stored": True, "sr_error": None, "unit": unit,
                     "run_id": run_id, "reported_at": now} for row, _ in batch]
        dst.join(PARTS_DIR, f"{unit}.parquet").write_parquet(
            pa.Table.from_pylist(rows_out, schema=PART_SCHEMA))
        stored += len(batch)
    if rows:
        log(f"SRs of earlier runs that could not be stored: {stored} stored now, "
            f"{failed} still not")
    return {"earlier_srs_stored": stored, "earlier_srs_failed": failed}


def _sr_store(archive: str, options) -> DicomwebClient | str | None:
    """Where `report.store_sr` stores SRs: `report.sr_destination`, else the dicomweb://
    archive. A DICOMweb destination is a client built here, on the driver, with the
    credentials of this environment (shipped to the actors inside it)."""
    if not options.store_sr:
        return None
    destination = options.sr_destination or (archive if is_dicomweb(archive) else None)
    if destination is None:
        raise ConfigError("report.store_sr stores SRs back to a dicomweb:// archive; with a "
                          "folder or s3:// archive also set report.sr_destination "
                          "(dicomweb://HOST:PORT/PATH or dimse://AE_TITLE@HOST:PORT)")
    return DicomwebClient.from_uri(destination) if is_dicomweb(destination) else destination


def options_record(config: EchoConfig) -> dict[str, Any]:
    """The settings a report summary records under "options"."""
    r, d, p = config.report, config.decoding, config.pool
    return {
        "decoding": d.mode, "steps": d.steps, "threshold": d.threshold,
        "max_new_tokens": d.max_new_tokens, "batch_size": r.batch_size,
        "unit_size": r.unit_size, "actors": p.actors, "cpus_per_actor": p.cpus_per_actor,
        "gpus_per_actor": p.gpus_per_actor, "threads": p.threads, "io_threads": r.io_threads,
        "decode_cpus": p.decode_cpus, "decode_in_actors": p.decode_in_actors,
        "since": r.since, "fhir": r.fhir, "fhir_patient_ref": r.fhir_patient_ref,
        "include_phi": r.include_phi, "retry_errors": r.retry_errors,
        "sr": r.sr, "store_sr": r.store_sr, "sr_destination": r.sr_destination,
    }


def _run_units(units, src, parts, model, config, run_id, *, sr_dir=None,
               sr_store=None) -> dict[str, Any]:
    """The units through Ray Data: CPU decode tasks (`decoder.decode_units`, `decode_cpus`
    at once, one CPU each) ahead of a pool of `ArchiveActor`s that only run the model, or,
    with `pool.decode_in_actors`, the actors alone. A progress line every
    `_PROGRESS_EVERY_S`; returns this run's counts and figures."""
    pool = config.pool
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    # Ray Data's progress bars are for terminals; the progress lines below print either way.
    ctx.enable_progress_bars = sys.stdout.isatty()
    # Each stage's concurrency is bounded here (decode_cpus tasks, pool.actors actors), so
    # no per-stage reservation: with it, while the actors start, Ray Data holds the decode
    # stage to its reserved share of a small cluster (one task of two on 4 logical CPUs).
    ctx.op_resource_reservation_enabled = False
    items = [{"unit": u["unit"], "studies": u["studies"]} for u in units]
    # One unit per block: a unit is the decode stage's task and the actors' batch, so
    # back-pressure (Ray Data's streaming executor) holds at most a few units in memory.
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    modalities = tuple(config.data.modalities) or None
    decode_cpus = 0
    if not pool.decode_in_actors:
        decode_cpus = decode_tasks(pool.decode_cpus, most=len(units))
        ds = ds.map_batches(
            decode_units,
            fn_kwargs={"src": src, "size": model_image_size(model), "options": config.report,
                       "modalities": modalities},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=decode_cpus),
        )
    ds = ds.map_batches(
        ArchiveActor,
        fn_constructor_kwargs={"model": model, "src": src, "parts": parts, "run_id": run_id,
                               "options": config.report, "decoding": config.decoding,
                               "pool": pool, "modalities": config.data.modalities,
                               "sr_dir": sr_dir, "sr_store": sr_store},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor or None,
    )
    total = sum(u["num_studies"] for u in units)
    reasons: Counter = Counter()
    busy: Counter = Counter()
    start_s: dict[str, float] = {}
    counts = Counter()
    decode_s = 0.0
    rss = {"actor": 0, "decode": 0}
    t0 = last = time.perf_counter()
    for row in ds.iter_rows():
        counts.update(units=1, studies=row["studies"], reports=row["reports"],
                      errors=row["errors"], images=row["images"])
        reasons.update(json.loads(row["errors_by_reason"]))
        busy[row["actor"]] += row["seconds"]
        start_s[row["actor"]] = row["actor_start_s"]
        decode_s += row["decode_s"]
        counts.update(srs_written=row["srs_written"], srs_stored=row["srs_stored"],
                      sr_errors=row["sr_errors"])
        rss["actor"] = max(rss["actor"], row["actor_rss_kib"])
        rss["decode"] = max(rss["decode"], row["decode_rss_kib"])
        now = time.perf_counter()
        if now - last >= _PROGRESS_EVERY_S or counts["units"] in (1, len(units)):
            last = now
            rate = counts["studies"] / (now - t0)
            eta = (total - counts["studies"]) / rate if rate else float("nan")
            log(f"{counts['units']}/{len(units)} units, {counts['studies']}/{total} studies "
                f"({counts['errors']} errors), {rate:.2f} studies/s, "
                f"{now - t0:.0f} s, about {eta:.0f} s to go")
    pipeline = time.perf_counter() - t0
    return {"studies": counts["studies"], "reports": counts["reports"],
            "errors": counts["errors"], "images": counts["images"],
            "errors_by_reason": dict(sorted(reasons.items())),
            "actor_busy_s": {k: round(v, 2) for k, v in sorted(busy.items())},
            "actor_busy_fraction": round(max(busy.values()) / pipeline, 3),
            "actor_start_s": {k: round(v, 2) for k, v in sorted(start_s.items())},
            "pipeline_s": round(pipeline, 2),
            "srs_written": counts["srs_written"], "srs_stored": counts["srs_stored"],
            "sr_errors": counts["sr_errors"],
            "decode_cpus": decode_cpus,
            "decode_task_s": round(decode_s, 2),
            "decode_images_per_s": (round(counts["images"] / decode_s, 2)
                                    if decode_s else None),
            "peak_rss_mb": {"actor": round(rss["actor"] / 1024, 1),
                            "decode": round(rss["decode"] / 1024, 1) if decode_cpus else None}}


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few readable lines (what `echo-ray report` prints)."""
    run = summary["this_run"]
    rate = run["studies_per_s"]
    return "\n".join([
        f"source        {summary['source']} ({summary['layout']} layout, "
        f"{summary['dicom_files']} DICOM files"
        + (f", {summary['side_files']} side files skipped)" if summary["layout"] != "dicomweb"
           else ")"),
        f"this run      {run['studies']} studies ({run['images']} images) in {run['units']} "
        f"unit(s): {run['reports']} reports, {run['errors']} errors "
        f"{json.dumps(run['errors_by_reason'], sort_keys=True)}",
        f"speed         {run['wall_time_s']} s wall"
        + (f", {rate:.2f} studies/s end to end" if rate else "")
        + (f"; {run['decode_cpus']} decode task(s) at once" if run.get("decode_cpus") else "")
        + (f"; model actors busy {run['actor_busy_fraction']:.0%} of the time"
           if run.get("actor_busy_fraction") is not None else ""),
        "peak memory   " + ", ".join(
            f"{label} {run['peak_rss_mb'][name]:.0f} MB" for name, label in (
                ("driver", "driver"), ("decode", "decode task"), ("actor", "model actor"))
            if run.get("peak_rss_mb", {}).get(name) is not None),
        f"output        {summary['out']}: {summary['studies']} studies, {summary['reports']} "
        f"reports, {summary['errors']} errors "
        f"{json.dumps(summary['errors_by_reason'], sort_keys=True)}",
        f"files         {', '.join(summary['files'])}, {SUMMARY_FILE}"
        + (f"; {summary['late_files']} late file(s) of reported studies left alone"
           if summary["late_files"] else "")
        + (f"; files of {summary['changed_studies']} error row(s) changed: reported again"
           if summary.get("changed_studies") else ""),
        *([f"DICOM SR      this run {run['srs_written']} written to sr/, {run['srs_stored']} "
           f"stored, {run['sr_errors']} failed; the folder holds {summary['srs']} "
           f"SR(s) ({summary['srs_stored']} stored, {summary['sr_errors']} with an SR error)"
          + (f"; SRs of earlier runs: {run['earlier_srs_stored']} stored now, "
             f"{run['earlier_srs_failed']} still not"
             if run.get("earlier_srs_stored") or run.get("earlier_srs_failed") else "")]
          if run.get("srs_written") or run.get("srs_stored") or run.get("sr_errors")
          or summary.get("srs") else []),
    ])

