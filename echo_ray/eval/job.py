"""`echo-ray evaluate`: quality and speed of several systems on one split, in one table.

A system is a checkpoint and a decoding mode (`name=PATH:MODE`, e.g. `ar=runs/ar:ar`,
`teacher=runs/rad:multi-step`, or `base=/models/Qwen2.5-VL-7B-Instruct:ar`: a plain Hugging
Face folder, without echo_config.json, is scored zero-shot with this run's `model` section:
image size, instruction, max_response_len from the preset and `--set model.*`). For each
system, in turn, a Ray Data batch-inference pass reads the split's DICOM bytes from the
shards, decodes them in CPU tasks (`pool.decode_cpus` at once; no torch in them) into the
model's `(S, S)` float32 images, and streams those, without the DICOM bytes, through an actor
pool (one model per actor) that writes the reports, times every batch, and scores the
reports' fluency under an AR checkpoint (`pool.decode_in_actors`: each actor decodes its own
DICOM bytes, serially with the model). The driver collects the light rows (text and counts,
no pixels), then computes:

- clinical efficacy: CheXpert-14/5 micro and macro label F1 of the project's labeler on the
  generated report against the reference (uncertain = negative, and uncertain = positive);
- language: SemScore, ROUGE-L, BLEU-4, fluency perplexity, the share of generated
  sentences found verbatim in training reports, RaTEScore when available;
- speed: tokens per forward, tokens/s, ms per report, forwards per report;
- uncertainty (eval.bootstrap): the 95% bootstrap interval of every quality figure
  (`evaluate.bootstrap_samples`, `bootstrap_seed`, `bootstrap_unit`), and with
  `evaluate.compare_to NAME` every other system's paired bootstrap difference to NAME.

Outputs (under `--out`): `results.json` (one object per system, keyed by its name),
`results.md` (the table, per-label F1 and the notes), `quality_vs_speed.png`,
`reports.parquet` (one row per system and image: reference, generated report, labels,
counts, errors) and `run.json` (what was evaluated, how).

Speed is measured inside the actors around the decoder call only (vision tower, prefill
and decoding of a batch; not DICOM decoding, not Ray), after one warm-up batch, with the
same batch size for every system: the systems are compared on equal terms. Each system's
figures also say how the pass ran: `decode_cpus` (CPU decode tasks at once; None when the
actors decoded), `pass_wall_s` (from the pass's start, actor start-up included, to its last
row), `actor_busy_fraction` (seconds the actors spent in their batch calls over
`pass_wall_s` x actors) and `peak_rss_mb` (driver, decode tasks, actors).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from echo_ray.config.schema import DecodingConfig, EchoConfig, ModelConfig, PoolConfig
from echo_ray.data.shards import select_splits, shard_files
from echo_ray.data.storage import Location, resolve, resolve_model_dir
from echo_ray.decode.replica import ModelReplica
from echo_ray.decode.studies import decode_images, image_from_bytes
from echo_ray.eval.scoring import check_compare_to, score_systems, training_reference
from echo_ray.eval.systems import System
from echo_ray.eval.tables import (
    PLOT_FILE,
    REPORTS_FILE,
    RESULTS_FILE,
    TABLE_FILE,
    format_intervals,
    format_results_table,
    write_outputs,
)
from echo_ray.model.folder import model_image_size
from echo_ray.runtime.cluster import (
    decode_tasks,
    init_ray,
    peak_rss_kib,
    require_shared_storage,
)
from echo_ray.text.labeler import labels_to_vector

logger = logging.getLogger(__name__)

_INPUT_COLUMNS = ["dicom_id", "study_id", "split", "view_position", "dicom", "report_normalized",
                  "labels"]
_OUTPUT_SCHEMA = pa.schema([
    ("dicom_id", pa.string()),
    ("study_id", pa.string()),
    ("view_position", pa.string()),
    ("reference", pa.string()),
    ("reference_labels", pa.list_(pa.float32())),
    ("report", pa.string()),
    ("findings", pa.string()),
    ("impression", pa.string()),
    ("labels", pa.list_(pa.float32())),
    ("num_tokens", pa.int32()),
    ("batch_id", pa.string()),
    ("batch_size", pa.int32()),
    ("batch_forwards", pa.int32()),
    ("batch_tokens_per_forward", pa.float64()),
    ("batch_latency_ms", pa.float64()),
    ("fluency_nll", pa.float64()),
    ("fluency_tokens", pa.int32()),
    ("error", pa.string()),
    ("error_message", pa.string()),
])


def evaluate(
    data: str,
    out: str,
    systems: Sequence[System | str],
    config: EchoConfig | None = None,
    *,
    s3_endpoint: str | None = None,
    ray_address: str | None = None,
    shared_storage: bool = False,
) -> Evaluation:
    """Evaluate `systems` on one split of the shards in `data`; write the outputs to `out`.

    Args:
        config: its `evaluate`, `pool` and `decoding` (steps, threshold of multi-step)
            sections are used (default: the tiny preset's), and its `model` section for
            systems that are plain Hugging Face folders (zero-shot).
        shared_storage: local paths are one filesystem shared by every Ray node; without
            it a multi-node cluster refuses them before any work
            (`runtime.cluster.require_shared_storage`).

    Returns:
        results.json's content (system name -> figures: RESULT_KEYS and more) and
        run.json's (what was evaluated and how, notes, the majority baseline).
    """
    config = (config or EchoConfig()).validate()
    options, pool = config.evaluate, config.pool
    systems = [s if isinstance(s, System) else System.parse(s) for s in systems]
    if not systems:
        raise ValueError("no systems to evaluate: pass at least one NAME=PATH:MODE")
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"system names must be unique, got {names}")
    check_compare_to(options.compare_to, names)
    shards = resolve(data, s3_endpoint=s3_endpoint)
    files = shard_files(shards)
    dst = resolve(out, s3_endpoint=s3_endpoint)
    models = {s.name: resolve_model_dir(s.path, s3_endpoint=s3_endpoint, what=f"system {s.name}:")
              for s in systems}
    fluency = _fluency_model(systems, models, options, s3_endpoint)
    manifest = json.loads(shards.join("manifest.json").read_text())
    expected = manifest["splits"].get(options.split, {}).get("images", 0)
    if options.limit:
        expected = min(expected, options.limit)

    init_ray(ray_address)
    require_shared_storage({"--data": data, "--out": out,
                            "--fluency-model": options.fluency_model,
                            **{f"--system {s.name}": s.path for s in systems}},
                           shared=shared_storage, what="evaluate")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Ray Data's progress bars are for terminals; in a log they print a status block every
    # few seconds. The per-system progress lines below are printed either way.
    ctx.enable_progress_bars = sys.stdout.isatty()
    _log(f"{len(systems)} system(s) on the {options.split} split of {shards.uri} "
         f"(~{expected} images, batch {options.batch_size}, {pool.actors} actor(s) each)")
    start = time.perf_counter()
    tables, passes = {}, {}
    for system in systems:
        tables[system.name], passes[system.name] = _run_system(
            system, models[system.name], fluency, files, shards, config, expected
        )
    _log("scoring")
    results, notes, baseline = score_systems(
        systems, tables, options, training_reference(files, shards, options.reference_labels),
        fluency_name=fluency and fluency.uri,
    )
    for name, figures in passes.items():
        results[name].update(figures)
    run_info = {
        "data": shards.uri,
        "split": options.split,
        "systems": {s.name: {"path": models[s.name].uri, "mode": s.mode} for s in systems},
        "options": options_record(config),
        "fluency_model": fluency and fluency.uri,
        "notes": notes,
        "majority_baseline": baseline,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    write_outputs(dst, results, tables, run_info)
    _log(f"done in {run_info['wall_time_s']} s: {dst.uri}/{RESULTS_FILE}, {TABLE_FILE}, "
         f"{PLOT_FILE}, {REPORTS_FILE}")
    return Evaluation(results, run_info)


@dataclass
class Evaluation:
    """What `evaluate` wrote: results.json's content and run.json's."""

    results: dict[str, dict[str, Any]]
    run: dict[str, Any]

    def table(self) -> str:
        return format_results_table(self.results, self.run.get("majority_baseline"))

    def intervals(self) -> str:
        """results.md's 95% intervals and paired differences (Markdown; empty without
        bootstrap resamples): what to print after `table()`."""
        return format_intervals(self.results, self.run)


def options_record(config: EchoConfig) -> dict[str, Any]:
    """The settings run.json records under "options"."""
    e, p, d = config.evaluate, config.pool, config.decoding
    return {
        "split": e.split, "limit": e.limit, "batch_size": e.batch_size,
        "fluency_model": e.fluency_model, "semscore_model": e.semscore_model,
        "ratescore": e.ratescore, "reference_labels": e.reference_labels,
        "bootstrap_samples": e.bootstrap_samples, "bootstrap_seed": e.bootstrap_seed,
        "bootstrap_unit": e.bootstrap_unit, "compare_to": e.compare_to, "actors": p.actors,
        "cpus_per_actor": p.cpus_per_actor, "gpus_per_actor": p.gpus_per_actor,
        "threads": p.threads, "decode_cpus": p.decode_cpus,
        "decode_in_actors": p.decode_in_actors, "steps": d.steps, "threshold": d.threshold,
    }


def _fluency_model(systems, models, options, s3_endpoint) -> Location | None:
    if options.fluency_model:
        return resolve_model_dir(options.fluency_model, s3_endpoint=s3_endpoint,
                                 what="--fluency-model")
    for s in systems:
        if s.mode == "ar":
            return models[s.name]
    return None


def _log(message: str) -> None:
    print(f"[echo-ray evaluate] {message}", file=sys.__stdout__, flush=True)


# ---------------------------------------------------------------------------------------------
# Batch inference (Ray Data + an actor pool per system)


def _run_system(
    system: System, model: Location, fluency: Location | None, files: list[str],
    shards: Location, config: EchoConfig, expected: int,
) -> tuple[pa.Table, dict[str, Any]]:
    """One system's pass: its report rows (`_OUTPUT_SCHEMA`) and how the pass ran
    (decode_cpus, pass_wall_s, actor_busy_fraction, peak_rss_mb: added to its results.json
    figures)."""
    options, pool = config.evaluate, config.pool
    decode_cpus = None if pool.decode_in_actors else decode_tasks(pool.decode_cpus)
    ds = actor_input(files, shards, config, model, decode_cpus)
    ds = ds.map_batches(
        _ReportActor,
        fn_constructor_kwargs={
            "model": model, "fluency": fluency, "pool": pool, "batch_size": options.batch_size,
            "decoding": dataclasses.replace(config.decoding, mode=system.mode),
            "plain_model": config.model, "decode": _decode_options(config),
        },
        batch_size=options.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.actors),
        num_cpus=pool.cpus_per_actor,
        num_gpus=pool.gpus_per_actor or None,
    )
    where = "in the actors" if decode_cpus is None else f"in {decode_cpus} CPU task(s)"
    _log(f"{system.name}: {model.uri} decoding {system.mode}; DICOM decoded {where}")
    start, done, errors, parts = time.perf_counter(), 0, 0, []
    busy, rss = 0.0, {"decode": 0, "actor": 0}
    last = 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        busy += pc.sum(batch.column("busy_s")).as_py() or 0.0
        for stage in rss:
            rss[stage] = max(rss[stage], pc.max(batch.column(f"{stage}_rss_kb")).as_py() or 0)
        batch = batch.select(_OUTPUT_SCHEMA.names)
        parts.append(batch)
        done += batch.num_rows
        errors += batch.num_rows - pc.sum(pc.is_null(batch.column("error"))).as_py()
        now = time.perf_counter()
        if now - last > 10 or done >= expected:
            last = now
            _log(f"{system.name}: {done}/{expected} images, {errors} error(s), "
                 f"{now - start:.0f} s")
    wall = time.perf_counter() - start
    table = pa.concat_tables(parts) if parts else _OUTPUT_SCHEMA.empty_table()
    figures = {
        "decode_cpus": decode_cpus,
        "pass_wall_s": round(wall, 1),
        "actor_busy_fraction": round(busy / (wall * pool.actors), 3) if wall > 0 else None,
        "peak_rss_mb": {"driver": round(peak_rss_kib() / 1024, 1),
                        **{stage: round(kb / 1024, 1) if kb else None
                           for stage, kb in rss.items()}},
    }
    _log(f"{system.name}: {table.num_rows} images in {wall:.1f} s, actors busy "
         f"{figures['actor_busy_fraction'] or 0:.0%}")
    return table, figures


def actor_input(files: list[str], shards: Location, config: EchoConfig, model: Location,
                decode_cpus: int | None) -> ray.data.Dataset:
    """The rows the model actors receive: the split's rows (`evaluate.limit` first), their
    DICOM bytes decoded by `decode_cpus` CPU tasks into the model's images (`decode_images`,
    no `dicom` column left); `decode_cpus=None`: the DICOM bytes as read, for actors that
    decode them (`pool.decode_in_actors`)."""
    options = config.evaluate
    ds = ray.data.read_parquet(files, filesystem=shards.fs, columns=_INPUT_COLUMNS)
    ds = ds.map_batches(select_splits, fn_kwargs={"splits": (options.split,)},
                        batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    if options.limit:
        ds = ds.limit(options.limit)
    if decode_cpus is None:
        return ds
    # Blocks of exactly one batch (the last may be short): a shard is one block when read,
    # and one block goes to one task, so without this one task would decode a whole shard.
    # The actors' batches stay the same rows as without the decode stage.
    ds = ds.repartition(target_num_rows_per_block=options.batch_size, strict=True)
    return ds.map_batches(
        decode_images,
        fn_kwargs={"size": model_image_size(model, config.model), **_decode_options(config)},
        batch_size=options.batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=decode_cpus),
        num_cpus=1,
    )


def _decode_options(config: EchoConfig) -> dict[str, Any]:
    """How evaluation decodes DICOM, in the CPU stage and in the actors alike: the
    modalities of `data.modalities` (empty: any), never PHI (no row of the outputs holds
    it)."""
    return {"modalities": tuple(config.data.modalities) or None, "include_phi": False}


class _ReportActor:
    """One model replica: the decode stage's images (or, with `pool.decode_in_actors`, the
    DICOM bytes, decoded here) in; reports + timings + fluency NLL out (no pixels), plus the
    seconds this call took (`busy_s`, on the batch's first row) and the peak RSS of this
    process and of the decode task (`actor_rss_kb`, `decode_rss_kb`)."""

    def __init__(self, *, model: Location, fluency: Location | None, pool: PoolConfig,
                 decoding: DecodingConfig, batch_size: int, plain_model: ModelConfig,
                 decode: dict[str, Any]) -> None:
        replica = ModelReplica(threads=pool.threads, cpus=pool.cpus_per_actor,
                               use_gpu=pool.gpus_per_actor > 0, name="eval")
        self.generator = replica.generator(
            model, decoding, model_id=model.uri, plain_model=plain_model,
            warm_up=min(batch_size, 2),  # not in the first system's timing
            **decode,
        )
        self.scorer = replica.scorer(fluency, plain_model) if fluency is not None else None

    def _prepared(self, batch: pa.Table):
        """`decode_dicoms`' (slots, good, images, metas) from the decode stage's columns."""
        size = self.generator.model.config.image_size
        slots, good, images = [], [], []
        for i, (blob, reason, message) in enumerate(zip(
            batch.column("image").to_pylist(), batch.column("decode_error").to_pylist(),
            batch.column("decode_message").to_pylist(), strict=True,
        )):
            if reason is not None:
                slots.append({"error": reason, "message": message})
                continue
            slots.append(None)
            good.append(i)
            images.append(image_from_bytes(blob, size))
        # One writable (N, S, S) array: torch takes it without a copy per image.
        images = np.stack(images) if images else []
        return slots, good, images, [{} for _ in good]

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        references = batch.column("report_normalized").to_pylist()
        if "dicom" in batch.column_names:  # pool.decode_in_actors
            slots, good, images, metas = self.generator.decode_dicoms(
                batch.column("dicom").to_pylist())
            decode_rss = [None] * batch.num_rows
        else:
            slots, good, images, metas = self._prepared(batch)
            decode_rss = batch.column("decode_rss_kb").to_pylist()
        reports = self.generator.generate(images, metas) if len(images) else []
        nll, counts = [None] * len(good), [None] * len(good)
        if self.scorer is not None and reports:
            nll, counts = self.scorer.nll(images, [r["report"] for r in reports])
        for k, (i, report) in enumerate(zip(good, reports, strict=True)):
            slots[i] = {**report, "fluency_nll": nll[k], "fluency_tokens": counts[k]}
        batch_id = uuid.uuid4().hex
        rows = []
        for slot, reference in zip(slots, references, strict=True):
            ok = "error" not in slot
            rows.append({
                "reference": reference,
                "report": slot.get("report"),
                "findings": slot.get("findings"),
                "impression": slot.get("impression"),
                "labels": labels_to_vector(slot["labels"]) if ok else None,
                "num_tokens": slot.get("num_tokens"),
                "batch_id": batch_id if ok else None,
                "batch_size": len(good) if ok else None,
                "batch_forwards": slot.get("num_forwards"),
                "batch_tokens_per_forward": slot.get("tokens_per_forward"),
                "batch_latency_ms": slot.get("latency_ms"),
                "fluency_nll": slot.get("fluency_nll"),
                "fluency_tokens": slot.get("fluency_tokens"),
                "error": slot.get("error"),
                "error_message": slot.get("message"),
            })
        columns = {name: [r[name] for r in rows] for name in rows[0]} if rows else {}
        table = pa.table({
            "dicom_id": batch.column("dicom_id"),
            "study_id": batch.column("study_id"),
            "view_position": batch.column("view_position"),
            "reference_labels": batch.column("labels"),
            **{name: pa.array(columns.get(name, []), _OUTPUT_SCHEMA.field(name).type)
               for name in _OUTPUT_SCHEMA.names
               if name not in ("dicom_id", "study_id", "view_position", "reference_labels")},
        }).select(_OUTPUT_SCHEMA.names).cast(_OUTPUT_SCHEMA)
        busy = ([time.perf_counter() - start] + [0.0] * batch.num_rows)[:batch.num_rows]
        return (table.append_column("busy_s", pa.array(busy, pa.float64()))
                .append_column("actor_rss_kb",
                               pa.array([peak_rss_kib()] * batch.num_rows, pa.int64()))
                .append_column("decode_rss_kb", pa.array(decode_rss, pa.int64())))
