"""`echo-ray trajectories`: the RAD teacher's multi-step rollouts, the DCD student's targets.

A Ray Data batch-inference job: the shards' images (train and validate splits by default)
are decoded from DICOM by CPU tasks (`pool.decode_cpus` at once; no torch in them) into the
teacher's `(S, S)` float32 grid and stream, without their DICOM bytes, through an actor pool
(one teacher per actor; `num_gpus` per actor on a cluster; `pool.decode_in_actors`: each
actor decodes its own DICOM bytes, serially with the model) that decodes each image
multi-step with threshold tau and records, per position, the
committed token, the step of its block at which it was committed, and the teacher's
distribution at that moment as top-k ids + probabilities and the mass they cover
(docs/ARCHITECTURE.md sections 3.2 and 4.5). Rollouts that loop or never end are dropped and
counted; images that do not decode are counted.

Output (`--out`), laid out like `echo-ray prepare`'s so the trainer reads it the same way:

    shards/<same name as the input shard>.parquet   one row per kept rollout (the DICOM
                                                     bytes too, read back from the input
                                                     shard by the driver: training decodes
                                                     them like any shard); its Parquet
                                                     metadata holds the shard's counts
    tokenizer/                                       the teacher's tokenizer
    manifest.json                                    counts and settings, and how this
                                                     run's rollout ran (decode_cpus,
                                                     rollout_wall_s, actor_busy_fraction,
                                                     peak_rss_mb); written last

Resumable: an input shard whose output file exists is skipped, so a killed job rerun with
the same arguments redoes only the shards it had not finished (each file is written
whole, atomically).
"""

from __future__ import annotations

import json
import posixpath
import sys
import time
from collections import defaultdict, deque
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from echo_ray import __version__
from echo_ray.config.schema import (
    DecodingConfig,
    EchoConfig,
    PoolConfig,
    TrajectoriesConfig,
)
from echo_ray.data.dicom import DicomError, decode_dicom
from echo_ray.data.shards import MANIFEST, SHARDS_DIR, TOKENIZER_DIR, select_splits, shard_files
from echo_ray.data.storage import Location, resolve, resolve_model_dir
from echo_ray.decode.replica import ModelReplica
from echo_ray.decode.studies import decode_images, image_from_bytes
from echo_ray.model.folder import model_image_size
from echo_ray.runtime.cluster import (
    decode_tasks,
    init_ray,
    peak_rss_kib,
    require_shared_storage,
)

FORMAT = "echo-ray-trajectories/1"
STATS_KEY = b"echo_ray.trajectory_stats"
# Why a rollout is not kept (counted per shard and in the manifest).
DROP_REASONS = ("degenerate", "unfinished", "decode_error")
_INPUT_COLUMNS = ["dicom_id", "study_id", "split", "dicom", "report_normalized"]
SCHEMA = pa.schema([
    ("dicom_id", pa.string()),
    ("study_id", pa.string()),
    ("split", pa.string()),
    ("dicom", pa.binary()),
    ("report_normalized", pa.string()),  # the reference, for inspection
    ("tokens", pa.list_(pa.int32())),  # the teacher's report, no <eos>
    ("commit_step", pa.list_(pa.int16())),  # per position, <eos> included
    ("top_ids", pa.list_(pa.list_(pa.int32()))),  # per position: k ids
    ("top_probs", pa.list_(pa.list_(pa.float32()))),  # per position: their probabilities
    ("mass", pa.list_(pa.float32())),  # per position: sum of top_probs
    ("num_forwards", pa.int32()),  # of the batch the rollout was decoded in
])
# The actor's rows: SCHEMA plus where they came from, why one was dropped, the seconds the
# actor's call took (on the batch's first row, 0 on the others) and the peak RSS (KiB) of
# the actor and of the decode task the row came through.
_ACTOR_SCHEMA = pa.schema([*SCHEMA, ("path", pa.string()), ("drop", pa.string()),
                           ("busy_s", pa.float64()), ("actor_rss_kb", pa.int64()),
                           ("decode_rss_kb", pa.int64())])


def options_record(config: EchoConfig) -> dict[str, Any]:
    """The settings a trajectories manifest records under "options"."""
    t, d, p = config.trajectories, config.decoding, config.pool
    return {
        "splits": list(t.splits), "top_k": t.top_k, "steps": d.steps, "threshold": d.threshold,
        "batch_size": t.batch_size, "actors": p.actors, "cpus_per_actor": p.cpus_per_actor,
        "gpus_per_actor": p.gpus_per_actor, "threads": p.threads,
        "decode_cpus": p.decode_cpus, "decode_in_actors": p.decode_in_actors,
        "max_ngram": t.max_ngram,
        "min_repeats": t.min_repeats, "fail_after_shards": t.fail_after_shards,
    }


def generate_trajectories(
    teacher: str,
    data: str,
    out: str,
    config: EchoConfig | None = None,
    *,
    s3_endpoint: str | None = None,
    ray_address: str | None = None,
    shared_storage: bool = False,
) -> dict[str, Any]:
    """Roll the teacher out on the shards at `data`; write trajectory shards to `out`.

    Args:
        config: its `trajectories`, `decoding` (steps, threshold) and `pool` sections are
            used (default: the tiny preset's).
        shared_storage: local paths are one filesystem shared by every Ray node; without
            it a multi-node cluster refuses them before any work
            (`runtime.cluster.require_shared_storage`).

    Returns:
        The manifest (also written to `out`/manifest.json).
    """
    config = (config or EchoConfig()).validate()
    options = config.trajectories
    start = time.perf_counter()
    src = resolve(data, s3_endpoint=s3_endpoint)
    files = shard_files(src)
    dst = resolve(out, s3_endpoint=s3_endpoint)
    teacher_loc = resolve_model_dir(teacher, s3_endpoint=s3_endpoint, what="--teacher")
    init_ray(ray_address)
    require_shared_storage({"--teacher": teacher, "--data": data, "--out": out},
                           shared=shared_storage, what="trajectories")
    manifest_loc = dst.join(MANIFEST)
    if manifest_loc.exists():
        dst.fs.delete_file(manifest_loc.path)  # written again, last, when complete
    _copy_tokenizer(teacher_loc, dst.join(TOKENIZER_DIR))
    out_dir = dst.join(SHARDS_DIR)
    done = set(out_dir.list_files(".parquet")) if out_dir.exists() else set()
    expected = _selected_rows(files, src, options.splits)
    pending = [f for f in files if posixpath.basename(f) not in done]
    _log(f"teacher {teacher_loc.uri}; {len(files)} shard(s), {len(files) - len(pending)} "
         f"already done; {sum(expected[f] for f in pending)} images to roll out "
         f"({'/'.join(options.splits)}), top-{options.top_k}, tau {config.decoding.threshold}")

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = sys.stdout.isatty()
    for f in pending:  # shards with no selected rows are done at once
        if expected[f] == 0:
            _write_shard(out_dir.join(posixpath.basename(f)), [], {r: 0 for r in DROP_REASONS})
    pending = [f for f in pending if expected[f] > 0]
    rollout = _roll_out(pending, src, out_dir, teacher_loc, config, expected) if pending else {}
    manifest = _manifest(src, dst, teacher_loc, config, files, start, rollout)
    manifest_loc.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    coverage = manifest["top_k_mass_mean"]
    _log(f"done in {manifest['wall_time_s']} s: {manifest['rollouts']} rollouts kept, "
         f"dropped {json.dumps(manifest['dropped'])}"
         + (f", top-{options.top_k} mass {coverage:.3f} on average" if coverage else "")
         + f" -> {dst.uri}")
    return manifest


def _selected_rows(files: list[str], src: Location, splits: tuple[str, ...]) -> dict[str, int]:
    """Per input shard, how many of its rows are in `splits` (the rows to roll out)."""
    counts = {}
    for f in files:
        table = pads.dataset(f, filesystem=src.fs, format="parquet").to_table(columns=["split"])
        counts[f] = int(pc.sum(pc.is_in(table.column("split"), pa.array(splits))).as_py() or 0)
    return counts


def _roll_out(pending, src, out_dir, teacher, config, expected) -> dict[str, Any]:
    """Roll out the `pending` input shards, writing each output shard once all its selected
    rows are back. Returns how it ran: decode_cpus, rollout_wall_s, actor_busy_fraction,
    peak_rss_mb."""
    options, pool = config.trajectories, config.pool
    decode_cpus = None if pool.decode_in_actors else decode_tasks(pool.decode_cpus)
    ds = actor_input(pending, src, config, teacher, decode_cpus)
    ds = ds.map_batches(
        _TeacherActor,
        fn_constructor_kwargs={"teacher": teacher, "options": options,
                               "decoding": config.decoding, "pool": pool,
                               "modalities": _modalities(config)},
        batch_size=options.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor or None,
    )
    # Ray Data gives the input path as it read it; map it back to our file list.
    by_name = {posixpath.basename(f): f for f in pending}
    rows: dict[str, list[dict]] = defaultdict(list)
    total, seen, t0 = sum(expected[f] for f in pending), 0, time.perf_counter()
    written, busy, rss = 0, 0.0, {"decode": 0, "actor": 0}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        busy += pc.sum(batch.column("busy_s")).as_py() or 0.0
        for stage in rss:
            rss[stage] = max(rss[stage], pc.max(batch.column(f"{stage}_rss_kb")).as_py() or 0)
        for row in batch.to_pylist():
            name = posixpath.basename(row["path"])
            rows[name].append(row)
            seen += 1
            if len(rows[name]) == expected[by_name[name]]:
                kept = [r for r in rows[name] if r["drop"] is None]
                dropped = {reason: sum(r["drop"] == reason for r in rows[name])
                           for reason in DROP_REASONS}
                if decode_cpus is not None:  # the actors never held the DICOM bytes
                    _attach_dicoms(kept, by_name[name], src)
                _write_shard(out_dir.join(name), kept, dropped)
                written += 1
                del rows[name]
                _log(f"{name}: {len(kept)} rollouts kept, dropped {json.dumps(dropped)}; "
                     f"{seen}/{total} images, {written}/{len(pending)} shards, "
                     f"{time.perf_counter() - t0:.0f} s")
                if written == options.fail_after_shards:
                    raise RuntimeError(f"fault drill: the job dies after {written} shard(s)")
    if rows:  # pragma: no cover - Ray Data lost rows; nothing half-written is left behind
        raise RuntimeError(f"incomplete shards after the rollout: {sorted(rows)}")
    wall = time.perf_counter() - t0
    return {
        "decode_cpus": decode_cpus,
        "rollout_wall_s": round(wall, 1),
        "actor_busy_fraction": round(busy / (wall * pool.actors), 3) if wall > 0 else None,
        "peak_rss_mb": {"driver": round(peak_rss_kib() / 1024, 1),
                        **{stage: round(kb / 1024, 1) if kb else None
                           for stage, kb in rss.items()}},
    }


def actor_input(files: list[str], src: Location, config: EchoConfig, teacher: Location,
                decode_cpus: int | None) -> ray.data.Dataset:
    """The rows the teachers receive: the selected splits' rows of `files` (with their
    `path`), their DICOM bytes decoded by `decode_cpus` CPU tasks into the teacher's images
    (`decode_images`, no `dicom` column left); `decode_cpus=None`: the DICOM bytes as read,
    for actors that decode them (`pool.decode_in_actors`)."""
    options = config.trajectories
    ds = ray.data.read_parquet(files, filesystem=src.fs, columns=_INPUT_COLUMNS,
                               include_paths=True)
    ds = ds.map_batches(select_splits, fn_kwargs={"splits": options.splits},
                        batch_format="pyarrow",
                        batch_size=None, num_cpus=0.25)
    if decode_cpus is None:
        return ds
    # Blocks of exactly one batch (the last may be short): a shard is one block when read,
    # and one block goes to one task, so without this one task would decode a whole shard.
    # The teachers' batches stay the same rows as without the decode stage.
    ds = ds.repartition(target_num_rows_per_block=options.batch_size, strict=True)
    return ds.map_batches(
        decode_images,
        fn_kwargs={"size": model_image_size(teacher), "modalities": _modalities(config)},
        batch_size=options.batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=decode_cpus),
        num_cpus=1,
    )


def _modalities(config: EchoConfig) -> tuple[str, ...] | None:
    """The DICOM modalities the rollout decodes (`data.modalities`; empty: any)."""
    return tuple(config.data.modalities) or None


def _attach_dicoms(rows: list[dict], file: str, src: Location) -> None:
    """Put each kept row's DICOM bytes back, read from its input shard (the output shards
    carry them for training; the teachers never did). Rows are matched by (dicom_id,
    study_id), in the shard's order."""
    ids = pa.array(sorted({r["dicom_id"] for r in rows}), pa.string())
    if not len(ids):
        return
    table = pads.dataset(file, filesystem=src.fs, format="parquet").to_table(
        columns=["dicom_id", "study_id", "dicom"], filter=pc.field("dicom_id").isin(ids))
    blobs: dict[tuple, deque] = defaultdict(deque)
    for dicom_id, study_id, blob in zip(*(table.column(c).to_pylist() for c in table.column_names),
                                        strict=True):
        blobs[dicom_id, study_id].append(blob)
    for row in rows:
        row["dicom"] = blobs[row["dicom_id"], row["study_id"]].popleft()


def _write_shard(loc: Location, rows: list[dict], dropped: dict[str, int]) -> None:
    table = pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    masses = [m for r in rows for m in r["mass"]]
    stats = {"rollouts": len(rows), "dropped": dropped, "positions": len(masses),
             "mass_mean": float(np.mean(masses)) if masses else None}
    table = table.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()})
    loc.write_parquet(table)  # atomic: a killed job leaves no partial shard


def _copy_tokenizer(teacher: Location, dst: Location) -> None:
    dst.delete_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "chat_template.json"):  # the prompt's template too
        if teacher.join(name).exists():
            dst.join(name).write_bytes(teacher.join(name).read_bytes())


def _manifest(src, dst, teacher, config, files, start, rollout) -> dict[str, Any]:
    shards, splits = [], {s: {"rollouts": 0} for s in config.trajectories.splits}
    dropped = dict.fromkeys(DROP_REASONS, 0)
    out_dir = dst.join(SHARDS_DIR)
    for name in out_dir.list_files(".parquet"):
        with out_dir.fs.open_input_file(out_dir.join(name).path) as f:
            meta = pq.ParquetFile(f).metadata
            stats = json.loads(meta.metadata[STATS_KEY])
            split_col = pq.read_table(f, columns=["split"]).column("split").to_pylist()
        shards.append({"file": f"{SHARDS_DIR}/{name}", "rows": meta.num_rows, **stats})
        for reason, n in stats["dropped"].items():
            dropped[reason] += n
        for s in split_col:
            splits[s]["rollouts"] += 1
    for s in splits:
        splits[s]["images"] = splits[s]["rollouts"]  # what a shards manifest calls it
    positions = sum(s.get("positions", 0) for s in shards)
    mass = sum(s["mass_mean"] * s["positions"] for s in shards if s.get("mass_mean") is not None)
    return {
        "format": FORMAT,
        "echo_ray_version": __version__,
        "source": src.uri,
        "teacher": teacher.uri,
        "options": options_record(config),
        "rollouts": sum(s["rows"] for s in shards),
        "dropped": dropped,
        # How much of the teacher's distribution the top-k records cover, over all positions.
        "top_k_mass_mean": mass / positions if positions else None,
        "splits": splits,
        "shards": shards,
        "input_shards": len(files),
        "tokenizer": TOKENIZER_DIR,
        "wall_time_s": round(time.perf_counter() - start, 1),
        # This run's rollout (none when every shard was already done): CPU decode tasks at
        # once (None: the actors decoded), its wall time (actor start-up included), the
        # actors' busy share of it, peak RSS.
        "decode_cpus": rollout.get("decode_cpus"),
        "rollout_wall_s": rollout.get("rollout_wall_s"),
        "actor_busy_fraction": rollout.get("actor_busy_fraction"),
        "peak_rss_mb": rollout.get("peak_rss_mb"),
    }


def _log(message: str) -> None:
    print(f"[echo-ray trajectories] {message}", file=sys.__stdout__, flush=True)


class _TeacherActor:
    """One teacher replica: the decode stage's images (or, with `pool.decode_in_actors`, the
    DICOM bytes, decoded here) in; multi-step rollouts with their records out, plus this
    call's seconds and peak RSS (`_ACTOR_SCHEMA`)."""

    def __init__(self, *, teacher: Location, options: TrajectoriesConfig,
                 decoding: DecodingConfig, pool: PoolConfig,
                 modalities: tuple[str, ...] | None) -> None:
        replica = ModelReplica(threads=pool.threads, cpus=pool.cpus_per_actor,
                               use_gpu=pool.gpus_per_actor > 0, name="traj")
        self.options, self.threshold = options, decoding.threshold
        self.modalities = modalities
        self.model = replica.model(teacher)
        self.steps = decoding.steps or self.model.block_length

    def _image(self, row: dict) -> np.ndarray | None:
        """The row's image: the decode stage's bytes, or its DICOM decoded here; None (and
        `drop` = "decode_error") when the file does not decode."""
        size = self.model.config.image_size
        if "image" not in row:  # pool.decode_in_actors
            try:
                return decode_dicom(row["dicom"], size=size, modalities=self.modalities).pixels
            except DicomError:
                row["drop"] = "decode_error"
                return None
        blob = row.pop("image")
        if blob is None:  # the decode stage could not decode it
            row["drop"] = "decode_error"
            return None
        return image_from_bytes(blob, size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from echo_ray.decode.sampler import generate
        from echo_ray.distill.records import is_degenerate, trajectory_records

        start = time.perf_counter()
        model, opts = self.model, self.options
        rows = batch.to_pylist()
        images, good = [], []
        for i, row in enumerate(rows):
            image = self._image(row)
            if image is not None:
                images.append(image)
                good.append(i)
        if images:
            pixel_values = model.preprocess_images(np.stack(images))
            with torch.no_grad():
                out = generate(model, pixel_values, mode="diffusion", steps=self.steps,
                               threshold=self.threshold, fused=True, record_top_k=opts.top_k)
            records = trajectory_records(out, model.eos_token_id)
            for i, record in zip(good, records, strict=True):
                row = rows[i]
                ended = record.pop("ended")
                row.update(record, num_forwards=out.num_forwards)
                if not ended:  # cut at max_new_tokens: a report that does not end
                    row["drop"] = "unfinished"
                elif opts.min_repeats and is_degenerate(
                    record["tokens"], max_ngram=opts.max_ngram, min_repeats=opts.min_repeats
                ):
                    row["drop"] = "degenerate"
                else:
                    row["drop"] = None
        rss = peak_rss_kib()
        for k, row in enumerate(rows):
            for name in _ACTOR_SCHEMA.names:
                row.setdefault(name, None)
            row.update(busy_s=time.perf_counter() - start if k == 0 else 0.0, actor_rss_kb=rss)
        return pa.Table.from_pylist(rows, schema=_ACTOR_SCHEMA)
