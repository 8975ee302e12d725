"""The model actor of the archive job: one `ReportGenerator`; a work unit in, the unit's part
file written, its counts out. Step 3 of `echo_ray.batch.job`.

A unit arrives prepared by the CPU decode stage (`decoder.decode_units`: a `prepared`
column) and the actor only runs the model (`studies.report_prepared`); with
`pool.decode_in_actors` it arrives as file lists and the actor reads and prepares its files
itself, serially with the model (the design before the decode stage, kept for
comparison). Either way the part file is written once, whole, when every study of the unit
has a report or an error row.

With `report.sr` / `report.store_sr`, each report's DICOM Structured Report is built here
(`interop.sr.build_sr`, from the report and the source header the decode stage kept), after
the model and before the part file: written to `sr/<hash of the study key>.dcm` (atomic,
like a part file) with `sr`, stored to the destination with `store_sr` (one STOW-RS request
or DIMSE association per unit). The SR's UID is a function of the report
(`interop.sr.sr_uids`), so a unit redone after a kill stores the same instance again, which
a PACS keeps once. A failed build or store never fails the unit: the report row stands with
`sr_error` saying why (and, for a failed store, `sr_stored` false: the next run with
`store_sr` stores it, `job._store_earlier_srs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import posixpath
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from echo_ray.batch.decoder import (
    UNEXPECTED,
    UnitStudy,
    log,
    prepared_batches,
)
from echo_ray.batch.discovery import file_key
from echo_ray.batch.ledger import PART_SCHEMA, fhir_resource
from echo_ray.config.schema import DecodingConfig, PoolConfig, ReportConfig
from echo_ray.data.storage import Location, model_name
from echo_ray.decode.replica import ModelReplica
from echo_ray.interop.dicomweb import DicomwebClient
from echo_ray.runtime.cluster import peak_rss_kib

# One row per unit back to the driver.
RESULT_SCHEMA = pa.schema([
    ("unit", pa.string()), ("actor", pa.string()), ("studies", pa.int64()),
    ("reports", pa.int64()), ("errors", pa.int64()), ("images", pa.int64()),
    ("errors_by_reason", pa.string()),
    ("seconds", pa.float64()),  # in the actor: the model (and, in-actor, reads and decode)
    ("actor_rss_kib", pa.int64()),
    ("actor_start_s", pa.float64()),  # the actor's start-up (the same in its every row)
    ("decode_s", pa.float64()),  # in the decode task (0 in-actor)
    ("decode_rss_kib", pa.int64()),
    ("srs_written", pa.int64()),  # sr/ files written (report.sr)
    ("srs_stored", pa.int64()),  # SRs stored to the destination (report.store_sr)
    ("sr_errors", pa.int64()),  # reports whose SR could not be built or stored
])
SR_DIR = "sr"


def sr_file_name(study_key: str) -> str:
    """The file of a study's SR in `sr/`: a hash of the study key (no identifiers)."""
    return hashlib.sha256(study_key.encode()).hexdigest()[:24] + ".dcm"


class ArchiveActor:
    """One model replica of the Ray Data actor pool; `__call__` takes a batch of units."""

    def __init__(self, *, model: Location, src: Location, parts: Location, run_id: str,
                 options: ReportConfig, decoding: DecodingConfig, pool: PoolConfig,
                 modalities: tuple[str, ...], sr_dir: Location | None = None,
                 sr_store: DicomwebClient | str | None = None) -> None:
        """`sr_dir`: where `report.sr` writes SRs (default: `sr/` beside `parts`);
        `sr_store`: where `report.store_sr` stores them (a client the driver built, with its
        credentials, or a destination URI; `destinations.store_instances`)."""
        started = time.perf_counter()
        replica = ModelReplica(threads=pool.threads, cpus=pool.cpus_per_actor,
                               use_gpu=pool.gpus_per_actor > 0, name="report")
        self.modalities = tuple(modalities) or None
        self.generator = replica.generator(
            model, decoding, model_id=model_name(model.uri), include_phi=options.include_phi,
            modalities=self.modalities,
            warm_up=min(options.batch_size, 2),  # not in the first unit's timing
        )
        self.size = self.generator.model.config.image_size
        self.src, self.parts, self.options, self.run_id = src, parts, options, run_id
        self.sr_dir = sr_dir or Location(parts.fs, posixpath.dirname(parts.path.rstrip("/")),
                                         posixpath.dirname(parts.uri.rstrip("/"))).join(SR_DIR)
        self.sr_store = sr_store
        self.io = ThreadPoolExecutor(options.io_threads) if pool.decode_in_actors else None
        self.actor = f"{os.uname().nodename}:{os.getpid()}"
        self.start_s = time.perf_counter() - started  # torch, the model, its warm-up

    def __call__(self, batch: pa.Table) -> pa.Table:
        units = batch.column("unit").to_pylist()
        studies = [json.loads(s) for s in batch.column("studies").to_pylist()]
        if "prepared" in batch.column_names:  # from the decode stage
            out = [self.report_unit(unit, s, pickle.loads(p), decode_s=d, decode_rss=r)
                   for unit, s, p, d, r in zip(
                       units, studies, batch.column("prepared").to_pylist(),
                       batch.column("decode_s").to_pylist(),
                       batch.column("decode_rss_kib").to_pylist(), strict=True)]
        else:
            out = [self.read_and_report_unit(unit, s)
                   for unit, s in zip(units, studies, strict=True)]
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

    def read_and_report_unit(self, unit: str, studies: list[dict]) -> dict[str, Any]:
        """`pool.decode_in_actors`: the unit's files read (parallel reads, the next batch
        prefetched while the model runs) and prepared here, batch by batch."""
        start = time.perf_counter()
        results = []
        for batch in prepared_batches(self.io, self.src, studies,
                                      batch_size=self.options.batch_size, size=self.size,
                                      options=self.options, modalities=self.modalities):
            results += self._report(batch)
        return self._finish(unit, studies, results, start)

    def report_unit(self, unit: str, studies: list[dict], prepared: list[UnitStudy], *,
                    decode_s: float = 0.0, decode_rss: int = 0) -> dict[str, Any]:
        """A unit prepared by the decode stage: the model on it, batch by batch."""
        start = time.perf_counter()
        size = self.options.batch_size
        results = []
        for i in range(0, len(prepared), size):
            results += self._report(prepared[i:i + size])
        return self._finish(unit, studies, results, start, decode_s=decode_s,
                            decode_rss=decode_rss)

    def _report(self, batch: list[UnitStudy]) -> list[tuple[dict, UnitStudy]]:
        """(result, study) per study: `report_prepared` on the batch; should it raise,
        study by study, so one study that breaks the code becomes one error row instead of
        failing its whole unit."""
        from echo_ray.decode.studies import report_prepared

        studies = [s.prepared for s in batch]
        try:
            return list(zip(report_prepared(self.generator, studies), batch, strict=True))
        except Exception:  # noqa: BLE001 - retried one by one just below
            pass
        results = []
        for study in batch:
            try:
                (result,) = report_prepared(self.generator, [study.prepared])
            except Exception as err:  # noqa: BLE001 - one error row, the batch goes on
                key = study.prepared.study_id
                log(f"study {key}: {type(err).__name__} while reporting")
                result = {"study_id": key, "error": UNEXPECTED,
                          "message": f"reporting raised {type(err).__name__}",
                          "num_files": study.prepared.num_files,
                          "file_errors": study.prepared.file_errors}
            results.append((result, study))
        return results

    def _finish(self, unit: str, studies: list[dict], results: list[tuple[dict, UnitStudy]],
                start: float, *, decode_s: float = 0.0, decode_rss: int = 0) -> dict[str, Any]:
        """The unit's part file, written in one atomic write now that every study has its
        report or error row; the unit's counts."""
        reported_at = datetime.now(UTC)
        rows = []
        for study, (result, prepared) in zip(studies, results, strict=True):
            row = {name: result.get(name) for name in PART_SCHEMA.names}
            row.update(files=study["names"], file_keys=[file_key(p) for p in study["paths"]],
                       file_sizes=study.get("sizes"), file_mtimes_ns=study.get("mtimes_ns"),
                       unit=unit, run_id=self.run_id, reported_at=reported_at.isoformat())
            if self.options.fhir and row["error"] is None:
                row["fhir"] = json.dumps(fhir_resource(row, reported_at,
                                                       subject=prepared.subject))
            rows.append(row)
        srs = self._structured_reports(rows, [r for _, r in results])
        self.parts.join(f"{unit}.parquet").write_parquet(
            pa.Table.from_pylist(rows, schema=PART_SCHEMA))
        reasons = Counter(r["error"] for r in rows if r["error"] is not None)
        return {
            "unit": unit, "actor": self.actor, "studies": len(rows),
            "reports": sum(r["error"] is None for r in rows), "errors": sum(reasons.values()),
            "images": sum(len(s["paths"]) for s in studies),
            "errors_by_reason": json.dumps(reasons), "seconds": time.perf_counter() - start,
            "actor_rss_kib": peak_rss_kib(),
            "actor_start_s": self.start_s,
            "decode_s": decode_s, "decode_rss_kib": decode_rss, **srs,
        }

    def _structured_reports(self, rows: list[dict], studies: list[UnitStudy]) -> dict[str, int]:
        """Each report row's SR (module docstring): built, written with `report.sr`, stored
        with `report.store_sr`; the row's `sr_*` columns set. Returns the unit's counts."""
        counts = {"srs_written": 0, "srs_stored": 0, "sr_errors": 0}
        if not (self.options.sr or self.options.store_sr):
            return counts
        from echo_ray.interop.sr import build_sr, sr_bytes

        built = []  # (row, Part 10 bytes)
        for row, study in zip(rows, studies, strict=True):
            header = study.prepared.source_header
            if row["error"] is not None:
                continue
            try:
                if header is None:
                    raise ValueError("the source header was not kept")
                ds = build_sr(row, header)
                blob = sr_bytes(ds)
            except Exception as err:  # noqa: BLE001 - the report stands, the SR is noted
                # sr_stored stays null: there is nothing a later run could store
                row["sr_error"] = f"the SR could not be built: {type(err).__name__}: {err}"
                counts["sr_errors"] += 1
                continue
            row["sr_sop_instance_uid"] = str(ds.SOPInstanceUID)
            built.append((row, blob))
            if self.options.sr:
                self.sr_dir.join(sr_file_name(row["study_id"])).write_bytes(blob)
                counts["srs_written"] += 1
        if self.options.store_sr and built:
            error = self._store([blob for _, blob in built])
            for row, _ in built:
                row.update(sr_stored=error is None, sr_error=error)
            counts["srs_stored" if error is None else "sr_errors"] += len(built)
        return counts

    def _store(self, blobs: list[bytes]) -> str | None:
        """Store the unit's SRs; None, or why they could not be stored (one line)."""
        from echo_ray.interop.destinations import DestinationError, store_instances

        if self.sr_store is None:
            return "the SR could not be stored: no destination (sr_store) was given"
        try:
            store_instances(self.sr_store, blobs)
        except DestinationError as err:
            log(f"{len(blobs)} SR(s) not stored: {err}")
            return f"the SR could not be stored: {err}"
        return None
