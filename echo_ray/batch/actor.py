"""The model actor of the archive job: one `ReportGenerator`; a work unit in, the unit's part
file written, its counts out. Step 3 of `echo_ray.batch.job`."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from echo_ray.batch.discovery import file_key, read_with_retries
from echo_ray.batch.ledger import PART_SCHEMA, fhir_resource
from echo_ray.config.schema import DecodingConfig, PoolConfig, ReportConfig
from echo_ray.data.dicom import DicomError, patient_id
from echo_ray.data.storage import Location, model_name
from echo_ray.decode.replica import ModelReplica


class ArchiveActor:
    """One model replica of the Ray Data actor pool; `__call__` takes a batch of units."""

    def __init__(self, *, model: Location, src: Location, parts: Location, run_id: str,
                 options: ReportConfig, decoding: DecodingConfig, pool: PoolConfig,
                 modalities: tuple[str, ...]) -> None:
        replica = ModelReplica(threads=pool.threads, cpus=pool.cpus_per_actor,
                               use_gpu=pool.gpus_per_actor > 0, name="report")
        self.generator = replica.generator(
            model, decoding, model_id=model_name(model.uri), include_phi=options.include_phi,
            modalities=tuple(modalities) or None,
            warm_up=min(options.batch_size, 2),  # not in the first unit's timing
        )
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
            subject = row.pop("_subject", None)
            row.update(unit=unit, run_id=self.run_id, reported_at=reported_at.isoformat())
            if self.options.fhir and row["error"] is None:
                row["fhir"] = json.dumps(fhir_resource(row, reported_at, subject=subject))
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
        return [[(name, self.io.submit(read_with_retries, self.src.join(path)))
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
        for study, result, errors, good in zip(chunk, results, read_errors, files, strict=True):
            if result is None:  # every file failed to read
                result = {"study_id": study["key"], "error": "read_failed",
                          "message": errors[0]["message"], "num_files": len(study["paths"]),
                          "file_errors": []}
            result["file_errors"] = [*result.get("file_errors", []), *errors]
            result["num_files"] = len(study["paths"])
            row = {name: result.get(name) for name in PART_SCHEMA.names}
            row.update(files=study["names"], file_keys=[file_key(p) for p in study["paths"]],
                       file_sizes=study.get("sizes"), file_mtimes_ns=study.get("mtimes_ns"),
                       _subject=self._subject(result, good))
            rows.append(row)
        return rows

    def _subject(self, result: dict, files: list[tuple[str, bytes]]) -> str | None:
        """The FHIR subject reference of a report (`report.fhir_patient_ref`): the reported
        file's PatientID, read for this alone (it goes into no other column)."""
        template = self.options.fhir_patient_ref
        if not (self.options.fhir and template) or result.get("error"):
            return None
        from echo_ray.interop.fhir import patient_reference

        if self.options.include_phi:
            return patient_reference(template, result.get("patient_id"))
        data = dict(files).get(result.get("source_file"))
        try:
            return patient_reference(template, patient_id(data)) if data else None
        except DicomError:
            return None

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
                log(f"study {key}: {type(err).__name__} while reporting")
                results.append({"study_id": key, "error": "unexpected_error",
                                "message": f"reporting raised {type(err).__name__}",
                                "file_errors": []})
        return results


def log(message: str) -> None:
    """A progress line of the job, on the driver's or an actor's stdout."""
    print(f"[echo-ray report] {message}", file=sys.__stdout__, flush=True)
