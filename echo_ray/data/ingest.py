"""Training input: shards (or a trajectories folder) -> decoded, tokenized rows, as a Ray Data
dataset streamed into Ray Train workers.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from echo_ray.config.schema import SPLITS, EchoConfig
from echo_ray.data.dicom import DicomError, decode_dicom
from echo_ray.data.shards import MANIFEST, SHARDS_DIR, shard_files
from echo_ray.data.storage import resolve
from echo_ray.text.labels import CHEXPERT_LABELS

NUM_LABELS = len(CHEXPERT_LABELS)

logger = logging.getLogger(__name__)

# Columns read from the shards for training; the rest (metadata, raw report) stays on disk.
TRAIN_COLUMNS = ("dicom_id", "study_id", "split", "dicom", "report_normalized")
# The 14 CheXpert labels of each row (prepare's), read for the vision stage, and for AR and
# RAD with diagnosis tokens.
LABEL_COLUMN = "labels"
# A trajectories folder (`echo-ray trajectories`) adds the teacher's rollout: its tokens
# replace the tokenized reference, and the DCD targets travel along.
TRAJECTORY_COLUMNS = ("tokens", "commit_step", "top_ids", "top_probs")


def training_dataset(
    shards: str,
    split: str,
    *,
    image_size: int,
    tokenizer_json: str,
    config: EchoConfig,
    s3_endpoint: str | None = None,
    labels: bool = False,
) -> ray.data.Dataset:
    """Rows of one split, decoded to `image_size` pixels and tokenized, as a Ray Data dataset.

    Reads only the training columns of the shards, keeps the rows of `split`, then decodes
    and tokenizes in `map_batches` on CPU tasks. A row that cannot be used (its DICOM no
    longer decodes, or it has no report) stays in the stream with `ok = False` and its
    reason in `error`, so trainers count it and skip it; it is logged, never raised.

    Output columns: `dicom_id`, `pixels` (S * S float32 in [0, 1], row-major), `tokens` (int32
    ids of the normalized report, no special tokens), `ok`, `error` (the reason, or "").
    From a trajectories folder, `tokens` are the teacher's, and `commit_step`, `top_ids`,
    `top_probs` (the DCD targets, per position up to and including `<eos>`) follow. With
    `labels`, `labels` (the shards' 14 CheXpert values per row, float32, NaN = not
    mentioned) follows: the vision stage's targets, and the diagnosis slots' findings for AR
    and RAD with diagnosis tokens.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    src = resolve(shards, s3_endpoint=s3_endpoint)
    files = shard_files(src)
    if not files:
        raise FileNotFoundError(f"{src.uri}/{SHARDS_DIR} holds no .parquet shards")
    manifest = json.loads(src.join(MANIFEST).read_text())
    trajectories = str(manifest.get("format", "")).startswith("echo-ray-trajectories")
    if labels and trajectories:
        raise ValueError(f"{src.uri} is a trajectories folder: labels are read from shards")
    columns = [*TRAIN_COLUMNS, *(TRAJECTORY_COLUMNS if trajectories else ()),
               *((LABEL_COLUMN,) if labels else ())]
    ds = ray.data.read_parquet(files, filesystem=src.fs, columns=columns)
    return ds.map_batches(
        _training_batch,
        batch_format="pyarrow",
        batch_size=config.data.batch_size,
        num_cpus=config.data.num_cpus_per_task,
        fn_kwargs={
            "split": split,
            "image_size": image_size,
            "tokenizer_json": tokenizer_json,
            "max_dimension": config.data.max_dimension,
            "modalities": tuple(config.data.modalities) or None,
        },
    )


def _training_batch(
    batch: pa.Table, *, split: str, image_size: int, tokenizer_json: str, max_dimension: int,
    modalities: tuple[str, ...] | None,
) -> pa.Table:
    batch = batch.filter(pc.equal(batch.column("split"), split))
    n = batch.num_rows
    tokenizer = _report_tokenizer(tokenizer_json)
    pixels = np.zeros((n, image_size * image_size), np.float32)
    ok = np.ones(n, bool)
    errors = [""] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    ids = batch.column("dicom_id").to_pylist()
    blobs = batch.column("dicom").to_pylist()
    reports = batch.column("report_normalized").to_pylist()
    teacher = batch.column("tokens").to_pylist() if "tokens" in batch.column_names else None
    for i in range(n):
        if teacher is None and not reports[i]:
            ok[i], errors[i] = False, "no_report"
            logger.warning("skipping training row %s: no report to train on", ids[i])
            continue
        try:
            image = decode_dicom(
                blobs[i], size=image_size, max_dimension=max_dimension, modalities=modalities
            )
        except DicomError as e:
            ok[i], errors[i] = False, e.reason
            # dicom_id is an archive file name, never a patient identifier.
            logger.warning("skipping training row %s: %s (%s)", ids[i], e.reason, e)
            continue
        pixels[i] = image.pixels.reshape(-1)
        tokens[i] = (teacher[i] if teacher is not None
                     else tokenizer.encode(reports[i], add_special_tokens=False).ids)
    # Plain Arrow types (a fixed-size list per image, a list of ids per report): one schema
    # for every block, the empty ones included.
    out = {
        "dicom_id": pa.array(ids, pa.string()),
        "pixels": pa.FixedSizeListArray.from_arrays(
            pa.array(pixels.reshape(-1), pa.float32()), image_size * image_size
        ),
        "tokens": pa.array(tokens, pa.list_(pa.int32())),
        "ok": pa.array(ok, pa.bool_()),
        "error": pa.array(errors, pa.string()),
    }
    if teacher is not None:
        for name in TRAJECTORY_COLUMNS[1:]:
            out[name] = batch.column(name)
    if LABEL_COLUMN in batch.column_names:
        values = np.array(
            [[np.nan if v is None else v for v in row or [None] * NUM_LABELS]
             for row in batch.column(LABEL_COLUMN).to_pylist()], np.float32,
        ).reshape(n, NUM_LABELS)
        out[LABEL_COLUMN] = pa.FixedSizeListArray.from_arrays(
            pa.array(values.reshape(-1), pa.float32()), NUM_LABELS
        )
    return pa.table(out)


@functools.lru_cache(maxsize=2)
def _report_tokenizer(tokenizer_json: str):
    """The `tokenizers` backend of a saved tokenizer (no transformers import in data tasks)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)
