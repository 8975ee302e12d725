"""Prepared shards of a small synthetic archive, and rows edited in storage afterwards
(what the Ray tests of training, evaluation and trajectories start from)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig
from echo_ray.data.prepare import prepare_shards
from echo_ray.synth.archive import synthesize_archive

T = TypeVar("T")


def prepare_test_shards(tmp_path_factory, *, num_studies: int, seed: int, image_size: int,
                        overrides: Sequence[str] = ()) -> Path:
    """`echo-ray prepare` of a frontal-only synthetic archive; returns the shards folder."""
    archive = tmp_path_factory.mktemp("archive")
    synthesize_archive(archive, num_studies=num_studies, seed=seed, image_size=image_size,
                       lateral_fraction=0.0)
    out = tmp_path_factory.mktemp("shards")
    prepare_shards(str(archive), str(out), apply_overrides(EchoConfig(), list(overrides)))
    return out


def edit_first_shard(out: Path, edit: Callable[[list[dict]], T]) -> T:
    """Rewrite the first shard after `edit` changed its rows in place (a file damaged in
    storage after prepare); returns what `edit` returned."""
    shard = sorted((out / "shards").glob("*.parquet"))[0]
    table = pq.read_table(shard)
    rows = table.to_pylist()
    result = edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    return result
