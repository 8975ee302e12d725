"""Ray Data pipelines: DICOM archive -> Parquet shards (+ errors table, manifest, tokenizer).

`prepare_shards` turns an archive (MIMIC-CXR layout or a flat folder of .dcm files, on local
disk or S3) into Parquet shards that later stages stream into Ray Train:

    list files (driver)  ->  pass 1: read + decode-check each DICOM, parse + normalize +
                              label its study's report        (Ray Data map_batches, light rows)
                         ->  errors table    (rows whose file failed, with the reason)
                         ->  pass 2: attach the original DICOM bytes of the good rows
                              and write shards                 (Ray Data map_batches + write)
                         ->  tokenizer trained on normalized train-split reports
                         ->  manifest.json (written last: its presence means complete;
                              it counts, per split, the reports that training will cut
                              at model.max_response_len tokens)

Pass 1 keeps no pixel bytes, so it can be materialized at archive scale; pass 2 streams
bytes straight to the writer. Rerunning replaces the previous output (same rows, same shard
names), it never appends.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import SaveMode
from ray.data.datasource import FilenameProvider

from echo_ray import __version__
from echo_ray.config.schema import SPLITS, EchoConfig
from echo_ray.data.dicom import DicomError, decode_dicom
from echo_ray.data.layout import assign_split, discover_archive
from echo_ray.data.shards import (
    ERROR_SCHEMA,
    ERRORS_FILE,
    MANIFEST,
    SHARD_SCHEMA,
    SHARDS_DIR,
    TOKENIZER_DIR,
)
from echo_ray.data.storage import Location, resolve
from echo_ray.runtime.cluster import init_ray, require_shared_storage
from echo_ray.text.labeler import label_report
from echo_ray.text.labels import CHEXPERT_LABELS
from echo_ray.text.normalizer import normalize_report

logger = logging.getLogger(__name__)


# Pass-1 rows: the shard columns without the bytes, plus the error columns.
_INSPECT_SCHEMA = pa.schema(
    [f for f in SHARD_SCHEMA if f.name != "dicom"]
    + [pa.field("error_reason", pa.string()), pa.field("error_detail", pa.string())]
)


# ---------------------------------------------------------------------------------------------
# Ray Data stages


def _inspect_batch(batch: dict[str, np.ndarray], *, src: Location, config: dict) -> pa.Table:
    """Pass 1: validate each DICOM and process its study's report. Never raises for bad input."""
    rows = []
    reports: dict[str, tuple[str | None, str | None, list | None]] = {}
    for i in range(len(batch["path"])):
        item = {k: str(batch[k][i]) for k in batch}
        row = _inspect_one(item, src, config, reports)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=_INSPECT_SCHEMA)


def _inspect_one(item: dict[str, str], src: Location, config: dict, reports: dict) -> dict:
    row: dict[str, Any] = {f.name: None for f in _INSPECT_SCHEMA}
    row.update(
        path=item["path"], dicom_id=item["dicom_id"], subject_id=item["subject_id"] or None,
        study_id=item["study_id"] or None,
    )
    try:
        data = src.join(item["path"]).read_bytes()
    except OSError as e:
        row.update(error_reason="read_failed", error_detail=f"could not read the file: {e}")
        return row
    try:
        image = decode_dicom(
            data,
            size=None,  # validate the full decode; resizing happens at training time
            max_dimension=config["max_dimension"],
            modalities=tuple(config["modalities"]) or None,
        )
    except DicomError as e:
        row.update(error_reason=e.reason, error_detail=str(e))
        return row
    except Exception as e:  # a decoder bug must not stop the job: record it, keep going
        row.update(error_reason="decode_failed", error_detail=f"{type(e).__name__}: {e}")
        return row
    meta = image.meta
    study_id = item["study_id"] or meta.get("study_instance_uid") or item["path"]
    row.update(
        study_id=study_id,
        view_position=(item["view_hint"] or meta.get("view_position") or None),
        **{k: meta.get(k) for k in (
            "study_instance_uid", "series_instance_uid", "sop_instance_uid", "modality",
            "photometric_interpretation", "rows", "columns", "bits_stored", "transfer_syntax",
            "num_frames",
        )},
    )
    row["split"] = item["split"] or assign_split(
        item["subject_id"] or study_id, tuple(config["split_fractions"])
    )
    # The report belongs to the study; studies with several images share one parse.
    if item["report_path"] not in reports:
        reports[item["report_path"]] = _process_report(src, item["report_path"], study_id)
    raw, normalized, labels = reports[item["report_path"]]
    row.update(report=raw, report_normalized=normalized)
    if item["labels_json"]:
        row.update(labels=json.loads(item["labels_json"]), labels_source="chexpert.csv")
    elif labels is not None:
        row.update(labels=labels, labels_source="labeler")
    return row


def _process_report(src: Location, report_path: str, study_id: str):
    if not report_path:
        return None, None, None
    try:
        raw = src.join(report_path).read_text()
    except OSError:
        return None, None, None
    labels = label_report(raw)  # labels the findings + impression, as CheXpert does
    return raw, normalize_report(raw, seed=study_id), [labels[name] for name in CHEXPERT_LABELS]


def is_truncated(num_tokens: int, max_response_len: int) -> bool:
    """Whether a report of `num_tokens` tokens loses tokens in training: a response holds at
    most `max_response_len - 1` report tokens and then `<eos>` (`pad_responses`)."""
    return num_tokens > max_response_len - 1


def _valid_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch.column("error_reason")))


def _attach_bytes(batch: pa.Table, *, src: Location) -> pa.Table:
    """Pass 2: add the original DICOM bytes to validated rows."""
    paths = batch.column("path").to_pylist()
    blobs = []
    for path in paths:
        try:
            blobs.append(src.join(path).read_bytes())
        except OSError as e:
            raise RuntimeError(
                f"{path} was readable during validation but not now ({e}): the archive changed "
                "while preparing; rerun `echo-ray prepare` (it replaces the partial output)"
            ) from e
    table = batch.drop_columns(["error_reason", "error_detail"])
    table = table.append_column(pa.field("dicom", pa.binary()), pa.array(blobs, pa.binary()))
    return table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)


def decode_files_batch(
    batch: dict[str, np.ndarray], *, src: Location, image_size: int, max_dimension: int = 8192,
    modalities: tuple[str, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Read + decode + resize the files named in `batch["path"]` into model-ready pixels.

    Bad files become rows with `ok = False` and an `error` reason; pixels are then zeros.
    """
    paths = [str(p) for p in batch["path"]]
    pixels = np.zeros((len(paths), image_size, image_size), np.float32)
    ok = np.zeros(len(paths), bool)
    errors = []
    for i, path in enumerate(paths):
        try:
            image = decode_dicom(
                src.join(path).read_bytes(), size=image_size, max_dimension=max_dimension,
                modalities=modalities,
            )
            pixels[i], ok[i] = image.pixels, True
            errors.append("")
        except (DicomError, OSError) as e:
            errors.append(getattr(e, "reason", "read_failed"))
    return {"path": np.array(paths, object), "pixels": pixels, "ok": ok,
            "error": np.array(errors, object)}


class _ShardNames(FilenameProvider):
    """Deterministic shard names, so a rerun rewrites the same files."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"shard-{task_index:05d}.parquet"


# ---------------------------------------------------------------------------------------------
# The job


def prepare_shards(
    archive: str,
    out: str,
    config: EchoConfig | None = None,
    *,
    s3_endpoint: str | None = None,
    ray_address: str | None = None,
    shared_storage: bool = False,
) -> dict[str, Any]:
    """Turn a DICOM archive into Parquet shards, an errors table, a tokenizer and a manifest.

    Args:
        archive: local folder or `s3://bucket/prefix` (MIMIC-CXR layout or flat .dcm folder).
        out: local folder or `s3://bucket/prefix`; previous output there is replaced.
        config: data and tokenizer settings (the `tiny` preset by default).
        s3_endpoint: S3 endpoint URL for both sides (else AWS_ENDPOINT_URL).
        ray_address: Ray cluster to use (else the current session or a local one).
        shared_storage: local `archive` and `out` paths are one filesystem shared by every
            Ray node; without it a multi-node cluster refuses them before anything is read
            or written (`runtime.cluster.require_shared_storage`).

    Returns:
        The manifest (also written to `out/manifest.json`).

    Raises:
        SharedStorageError: a local path on a multi-node cluster, not declared shared.
    """
    config = (config or EchoConfig.from_name("tiny")).validate()
    dcfg = config.data
    start = time.perf_counter()
    src = resolve(archive, s3_endpoint=s3_endpoint)
    dst = resolve(out, s3_endpoint=s3_endpoint)
    if not src.exists():
        raise FileNotFoundError(f"archive {src.uri} does not exist")
    # Ray tasks read the archive and write the shards, on any node: check before any work.
    init_ray(ray_address)
    require_shared_storage({"--archive": archive, "--out": out}, shared=shared_storage,
                           what="prepare")

    items, info = discover_archive(src)
    _log(f"found {info['num_dicom_files']} DICOM files ({info['layout']} layout) in {src.uri}")
    # A half-written previous run must not look complete: drop its manifest first.
    manifest_loc = dst.join(MANIFEST)
    if manifest_loc.exists():
        dst.fs.delete_file(manifest_loc.path)
    for stale in (dst.join(SHARDS_DIR), dst.join(TOKENIZER_DIR)):
        stale.delete_dir()

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic rows and shard contents

    shard_rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    if items:
        num_blocks = max(1, -(-len(items) // dcfg.rows_per_shard))
        inspected = (
            ray.data.from_items(items, override_num_blocks=num_blocks)
            .map_batches(
                _inspect_batch,
                fn_kwargs={"src": src, "config": _worker_config(dcfg)},
                batch_size=dcfg.batch_size,
                batch_format="numpy",
                num_cpus=dcfg.num_cpus_per_task,
            )
            .materialize()
        )
        _log("pass 1 (validate + reports) done")
        light = inspected.select_columns(
            [c for c in _INSPECT_SCHEMA.names if c not in ("report",)]
        ).take_all()
        errors = [r for r in light if r["error_reason"] is not None]
        shard_rows = [r for r in light if r["error_reason"] is None]
        good = inspected.map_batches(_valid_rows, batch_format="pyarrow", batch_size=None)
        if shard_rows:
            (
                good.repartition(num_blocks=max(1, -(-len(shard_rows) // dcfg.rows_per_shard)))
                .map_batches(
                    _attach_bytes,
                    fn_kwargs={"src": src},
                    batch_size=None,
                    batch_format="pyarrow",
                    num_cpus=dcfg.num_cpus_per_task,
                )
                .write_parquet(
                    dst.join(SHARDS_DIR).path,
                    filesystem=dst.fs,
                    filename_provider=_ShardNames(),
                    mode=SaveMode.OVERWRITE,
                )
            )
        _log(f"pass 2 (shards) done: {len(shard_rows)} images written")

    _write_errors(dst, errors)
    tokenizer_info = _train_tokenizer(dst, shard_rows, config)
    if tokenizer_info["reports_truncated"]:
        _log(f"reports that training cuts to model.max_response_len - 1 = "
             f"{config.model.max_response_len - 1} tokens + <eos>: "
             f"{json.dumps(tokenizer_info['reports_truncated'])}")
    manifest = _manifest(src, dst, info, shard_rows, errors, tokenizer_info, config, start)
    manifest_loc.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _worker_config(dcfg) -> dict[str, Any]:
    return {
        "max_dimension": dcfg.max_dimension,
        "modalities": list(dcfg.modalities),
        "split_fractions": list(dcfg.split_fractions),
    }


def _write_errors(dst: Location, errors: list[dict[str, Any]]) -> None:
    rows = [
        {"path": e["path"], "dicom_id": e["dicom_id"], "study_id": e["study_id"],
         "reason": e["error_reason"], "detail": e["error_detail"]}
        for e in errors
    ]
    dst.join(ERRORS_FILE).write_parquet(pa.Table.from_pylist(rows, schema=ERROR_SCHEMA))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ERROR_SCHEMA.names)
    writer.writeheader()
    writer.writerows(rows)
    dst.join("errors.csv").write_text(buf.getvalue())


def _train_tokenizer(dst: Location, rows: list[dict[str, Any]], config: EchoConfig) -> dict:
    """Train the report tokenizer on normalized reports of the train split (one per study);
    with it, count each split's reports (one per study) that training cuts at
    `model.max_response_len` tokens."""
    # Imported here: only the driver trains it, and transformers is slow for workers to import.
    from echo_ray.text.tokenizer import save_tokenizer, train_report_tokenizer

    by_study = {r["study_id"]: r["report_normalized"] for r in rows
                if r["split"] == "train" and r["report_normalized"]}
    texts = [by_study[k] for k in sorted(by_study)]
    if not texts:
        _log("no training reports: tokenizer not trained (inference-only archive)")
        return {"trained": False, "num_reports": 0, "reports_truncated": None}
    tok = train_report_tokenizer(
        texts, vocab_size=config.tokenizer.vocab_size,
        min_frequency=config.tokenizer.min_frequency,
    )
    if dst.is_s3:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            save_tokenizer(tok, tmp)
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    dst.join(TOKENIZER_DIR, name).write_bytes(f.read())
    else:
        save_tokenizer(tok, dst.join(TOKENIZER_DIR).path)
    _log(f"tokenizer trained on {len(texts)} reports: vocab {len(tok)}")
    num_tokens = {}  # split -> the token count of each study's report (train: of `texts`)
    for split in SPLITS:
        reports = by_study if split == "train" else {
            r["study_id"]: r["report_normalized"] for r in rows
            if r["split"] == split and r["report_normalized"]
        }
        ids = tok(list(reports.values()), add_special_tokens=False)["input_ids"] if reports else []
        num_tokens[split] = [len(x) for x in ids]
    lengths = num_tokens["train"]
    max_len = config.model.max_response_len
    truncated = {split: sum(is_truncated(n, max_len) for n in counts)
                 for split, counts in num_tokens.items()}
    return {
        "trained": True, "num_reports": len(texts), "vocab_size": len(tok),
        "report_tokens_mean": float(np.mean(lengths)), "report_tokens_max": int(max(lengths)),
        "reports_truncated": truncated,
    }


def _manifest(src, dst, info, rows, errors, tokenizer_info, config, start) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        in_split = [r for r in rows if r["split"] == split]
        splits[split] = {
            "images": len(in_split),
            "studies": len({r["study_id"] for r in in_split}),
        }
    shard_files = []
    shards = dst.join(SHARDS_DIR)
    if shards.exists():
        for name in shards.list_files(".parquet"):
            with shards.fs.open_input_file(shards.join(name).path) as f:
                shard_files.append({"file": f"{SHARDS_DIR}/{name}",
                                    "rows": pq.ParquetFile(f).metadata.num_rows})
    all_studies = {r["study_id"] for r in rows} | {e["study_id"] for e in errors if e["study_id"]}
    return {
        "format": "echo-ray-shards/1",
        "echo_ray_version": __version__,
        "source": src.uri,
        **info,
        "studies": len(all_studies),
        "studies_with_images": len({r["study_id"] for r in rows}),
        "images": len(rows),
        "errors": len(errors),
        "errors_by_reason": dict(sorted(Counter(e["error_reason"] for e in errors).items())),
        "reports_missing": sum(1 for r in rows if r["report_normalized"] is None),
        "labels_source": dict(Counter(r["labels_source"] or "none" for r in rows)),
        "splits": splits,
        "shards": shard_files,
        "errors_table": ERRORS_FILE,
        "tokenizer": TOKENIZER_DIR if tokenizer_info["trained"] else None,
        "tokenizer_info": {k: v for k, v in tokenizer_info.items() if k != "reports_truncated"},
        # {split: reports (one per study) that training cuts (is_truncated), in tokens of
        # the prepared tokenizer}; null without one
        "reports_truncated": tokenizer_info["reports_truncated"],
        "max_response_len": config.model.max_response_len,
        "config": {"data": config.to_dict()["data"], "tokenizer": config.to_dict()["tokenizer"]},
        "wall_time_s": round(time.perf_counter() - start, 2),
    }


def _log(message: str) -> None:
    logger.info(message)
    print(f"[echo-ray prepare] {message}", flush=True)


def summarize_manifest(m: dict) -> str:
    """A short human-readable summary of a shards manifest."""
    lines = [
        f"source      {m['source']} ({m['layout']} layout)",
        f"studies     {m['studies']} ({m['studies_with_images']} with at least one good image)",
        f"images      {m['images']} written to {len(m['shards'])} shard(s)",
        f"errors      {m['errors']} {json.dumps(m['errors_by_reason'])}",
        "splits      " + ", ".join(
            f"{k} {v['studies']} studies / {v['images']} images" for k, v in m["splits"].items()
        ),
        f"tokenizer   {m['tokenizer'] or 'not trained'}"
        + (f" (vocab {m['tokenizer_info']['vocab_size']}, "
           f"{m['tokenizer_info']['report_tokens_mean']:.0f} tokens per report on average)"
           if m["tokenizer"] else ""),
    ]
    if any((m.get("reports_truncated") or {}).values()):
        lines.append(f"truncated   {json.dumps(m['reports_truncated'])} reports cut to "
                     f"{m['max_response_len'] - 1} tokens + <eos> (model.max_response_len)")
    lines.append(f"wall time   {m['wall_time_s']} s")
    return "\n".join(lines)
