"""The DICOM shards format (`echo-ray prepare`'s output): file names, the row and error schemas,
and reading shards back.

A shards folder holds `shards/*.parquet` (one row per image, `SHARD_SCHEMA`), `errors.parquet`
(`ERROR_SCHEMA`), `tokenizer/` and `manifest.json`, written last (its presence means complete).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from echo_ray.data.storage import Location, resolve

MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
ERRORS_FILE = "errors.parquet"
TOKENIZER_DIR = "tokenizer"


# Columns of a shard row (one per image). `dicom` holds the original file bytes.
SHARD_SCHEMA = pa.schema(
    [
        ("dicom_id", pa.string()),
        ("subject_id", pa.string()),
        ("study_id", pa.string()),
        ("path", pa.string()),
        ("split", pa.string()),
        ("view_position", pa.string()),
        ("study_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()),
        ("sop_instance_uid", pa.string()),
        ("modality", pa.string()),
        ("photometric_interpretation", pa.string()),
        ("rows", pa.int32()),
        ("columns", pa.int32()),
        ("bits_stored", pa.int32()),
        ("transfer_syntax", pa.string()),
        ("num_frames", pa.int32()),
        ("report", pa.string()),
        ("report_normalized", pa.string()),
        ("labels", pa.list_(pa.float32())),
        ("labels_source", pa.string()),
        ("dicom", pa.binary()),
    ]
)
ERROR_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("dicom_id", pa.string()),
        ("study_id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def select_splits(batch: pa.Table, *, splits: tuple[str, ...]) -> pa.Table:
    """The rows of `batch` whose `split` is one of `splits` (a map_batches step)."""
    return batch.filter(pc.is_in(batch.column("split"), pa.array(splits)))


def shard_files(shards: Location) -> list[str]:
    """The shard files of a prepared folder (paths in `shards.fs`), checking it is complete."""
    if not shards.join(MANIFEST).exists():
        raise FileNotFoundError(
            f"{shards.uri} has no {MANIFEST}: it is not a finished `echo-ray prepare` output "
            "(run prepare, or wait for it to finish)"
        )
    folder = shards.join(SHARDS_DIR)
    return [folder.join(name).path for name in folder.list_files(".parquet")]


def iter_shard_rows(out: str, columns: Iterable[str] | None = None, *, s3_endpoint=None):
    """Read back prepared shards (without Ray): a convenience for tests and inspection."""
    dst = resolve(out, s3_endpoint=s3_endpoint)
    shards = dst.join(SHARDS_DIR)
    for name in shards.list_files(".parquet"):
        with shards.fs.open_input_file(shards.join(name).path) as f:
            yield from pq.read_table(f, columns=list(columns) if columns else None).to_pylist()
