"""The CPU decode stage of the archive job: a unit's files read, and each study's headers
read, frontal view chosen, decoded and resized to the model's grid
(`studies.prepare_study`), in plain Ray Data tasks ahead of the model actors (step 3 of
`echo_ray.batch.job`). numpy and pydicom only: no torch, no model.

`prepared_batches` is also what a model actor runs itself with `pool.decode_in_actors` (the
design before this stage), so both paths give a study the same row.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from echo_ray.batch.sources import ArchiveSource, as_source
from echo_ray.config.schema import ReportConfig
from echo_ray.data.dicom import DicomError, patient_id
from echo_ray.data.storage import Location
from echo_ray.decode.studies import PreparedStudy, prepare_study
from echo_ray.runtime.cluster import peak_rss_kib

# What a study becomes when preparing it raised (a bug or a library's surprise, not a bad
# file): one error row, the unit goes on. `report.retry_errors` tries it again.
UNEXPECTED = "unexpected_error"


@dataclass
class UnitStudy:
    """One study of a unit, prepared: what the model half needs and nothing more (no DICOM
    bytes). `prepared.file_errors` already holds the files that could not be read, and
    `prepared.num_files` counts them."""

    prepared: PreparedStudy
    subject: str | None = None  # the FHIR subject reference (`report.fhir_patient_ref`)


def submit_reads(io: ThreadPoolExecutor, src: Location | ArchiveSource,
                 studies: Sequence[dict]) -> list[list[tuple[str, Future]]]:
    """Every file of `studies` (the unit's JSON entries) read on `io` from the archive
    (`sources`: a folder, S3 or DICOMweb): per study, (name, future of the bytes)."""
    source = as_source(src)
    return [[(name, io.submit(source.read, path))
             for path, name in zip(s["paths"], s["names"], strict=True)] for s in studies]


def prepared_batches(io: ThreadPoolExecutor, src: Location | ArchiveSource,
                     studies: Sequence[dict], *, batch_size: int, size: int, options: ReportConfig,
                     modalities: tuple[str, ...] | None) -> Iterator[list[UnitStudy]]:
    """The unit's studies prepared `batch_size` at a time (`prepare_unit_studies`), the next
    batch's files read on `io` while this one is prepared: at most two batches of DICOM
    bytes in memory (a 64-study unit of 2,560 px files would be most of a GB)."""
    chunks = [studies[i:i + batch_size] for i in range(0, len(studies), batch_size)]
    pending = submit_reads(io, src, chunks[0]) if chunks else []
    for i, chunk in enumerate(chunks):
        current = pending
        if i + 1 < len(chunks):  # prefetch: the next batch is read while this one runs
            pending = submit_reads(io, src, chunks[i + 1])
        yield prepare_unit_studies(chunk, current, size=size, options=options,
                                   modalities=modalities)


def prepare_unit_studies(studies: Sequence[dict], reads: list[list[tuple[str, Future]]], *,
                         size: int, options: ReportConfig,
                         modalities: tuple[str, ...] | None) -> list[UnitStudy]:
    """Each study's read files through `prepare_study`, in order.

    A file that could not be read is a `read_failed` file error of its study; a study none of
    whose files could be read is a `read_failed` error row; a study whose preparation raised
    is an `unexpected_error` row (logged by key only). The chosen file's bytes are dropped
    (`PreparedStudy.shipped`); the FHIR subject is read from them first when
    `options.fhir_patient_ref` asks for it. With `report.sr` or `report.store_sr` the
    chosen file's header is kept (`PreparedStudy.source_header`, for the SR; it holds
    patient identifiers and goes into no column or log line).
    """
    out = []
    for study, study_reads in zip(studies, reads, strict=True):
        good, errors = [], []
        for name, future in study_reads:
            try:
                good.append((name, future.result()))
            except OSError as err:
                errors.append({"file": name, "error": "read_failed",
                               "message": f"could not read the file: {type(err).__name__}"})
        key = study["key"]
        if not good:  # every file failed to read
            prepared = PreparedStudy(study_id=key, num_files=0, error="read_failed",
                                     message=errors[0]["message"])
        else:
            try:
                prepared = prepare_study(good, size=size, study_id=key, modalities=modalities,
                                         include_phi=options.include_phi,
                                         keep_header=options.sr or options.store_sr)
            except Exception as err:  # noqa: BLE001 - one error row, the unit goes on
                log(f"study {key}: {type(err).__name__} while reporting")
                prepared = PreparedStudy(study_id=key, num_files=len(good), error=UNEXPECTED,
                                         message=f"reporting raised {type(err).__name__}")
        prepared.file_errors = [*prepared.file_errors, *errors]
        prepared.num_files = len(study["paths"])
        out.append(UnitStudy(prepared.shipped(), _subject(prepared, options)))
    return out


def _subject(prepared: PreparedStudy, options: ReportConfig) -> str | None:
    """The FHIR subject reference of a report (`report.fhir_patient_ref`): the reported
    file's PatientID, read for this alone (it goes into no other column)."""
    template = options.fhir_patient_ref
    if not (options.fhir and template) or prepared.error is not None:
        return None
    from echo_ray.interop.fhir import patient_reference

    if options.include_phi:
        return patient_reference(template, (prepared.meta or {}).get("patient_id"))
    try:
        return patient_reference(template, patient_id(prepared.source_data))
    except DicomError:
        return None


def decode_units(batch: pa.Table, *, src: Location | ArchiveSource, size: int,
                 options: ReportConfig, modalities: tuple[str, ...] | None) -> pa.Table:
    """The Ray Data task: units in (`unit`, `studies` JSON), one row per unit out with its
    studies prepared (`prepared`: the pickled `UnitStudy` list, images float32 `(size,
    size)`, never DICOM bytes) and the task's figures (`decode_s` this unit's seconds,
    `decode_rss_kib` the process's peak RSS)."""
    rows = []
    with ThreadPoolExecutor(options.io_threads) as io:
        for unit, text in zip(batch.column("unit").to_pylist(),
                              batch.column("studies").to_pylist(), strict=True):
            start = time.perf_counter()
            prepared = [study for batch in prepared_batches(
                io, src, json.loads(text), batch_size=options.batch_size, size=size,
                options=options, modalities=modalities) for study in batch]
            rows.append({"unit": unit, "studies": text,
                         "prepared": pickle.dumps(prepared, protocol=5),
                         "decode_s": time.perf_counter() - start,
                         "decode_rss_kib": peak_rss_kib()})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("unit", pa.string()), ("studies", pa.string()), ("prepared", pa.large_binary()),
        ("decode_s", pa.float64()), ("decode_rss_kib", pa.int64())]))


def log(message: str) -> None:
    """A progress line of the job, on the driver's, a task's or an actor's stdout."""
    print(f"[echo-ray report] {message}", file=sys.__stdout__, flush=True)
