"""`echo-ray evaluate`: quality and speed of several systems on one split, in one table.

A system is a checkpoint and a decoding mode (`name=PATH:MODE`, e.g. `ar=runs/ar:ar`,
`teacher=runs/rad:multi-step`). For each system, in turn, a Ray Data batch-inference pass
reads the split's DICOM bytes from the shards and streams them through an actor pool (one
model per actor) that decodes the images, writes the reports, times every batch, and scores
the reports' fluency under an AR checkpoint. The driver collects the light rows (text and
counts, no pixels), then computes:

- clinical efficacy: CheXpert-14/5 micro and macro label F1 of the project's labeler on the
  generated report against the reference (uncertain = negative, and uncertain = positive);
- language: SemScore, ROUGE-L, BLEU-4, fluency perplexity, the share of generated
  sentences found verbatim in training reports, RaTEScore when available;
- speed: tokens per forward, tokens/s, ms per report, forwards per report.

Outputs (under `--out`): `results.json` (one object per system, keyed by its name),
`results.md` (the table, per-label F1 and the notes), `quality_vs_speed.png`,
`reports.parquet` (one row per system and image: reference, generated report, labels,
counts, errors) and `run.json` (what was evaluated, how).

Speed is measured inside the actors around the decoder call only (vision tower, prefill
and decoding of a batch; not DICOM decoding, not Ray), after one warm-up batch, with the
same batch size for every system: the systems are compared on equal terms.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from echo_ray.data.prepare import SPLITS, init_ray, select_splits, setup_model_actor, shard_files
from echo_ray.data.storage import Location, resolve, resolve_model_dir
from echo_ray.decode.modes import DECODING_MODES
from echo_ray.eval.metrics import (
    DEFAULT_SEMSCORE_MODEL,
    UNCERTAIN_POLICIES,
    MetricUnavailable,
    bleu4,
    format_f1_table,
    known_sentence_rate,
    known_sentences,
    label_f1,
    labels_from_vectors,
    load_sentence_encoder,
    majority_baseline,
    perplexity,
    ratescore,
    rouge_l,
    semscore,
)
from echo_ray.text.labeler import label_report, labels_to_vector
from echo_ray.text.labels import CHEXPERT_LABELS

logger = logging.getLogger(__name__)

# Short names accepted in a system spec, for the decoding modes of decoding.DECODING_MODES.
MODE_ALIASES = {"multistep": "multi-step", "onestep": "one-step", "fused": "one-step-fused"}
REFERENCE_LABELS = ("labeler", "shard")
RESULTS_FILE, TABLE_FILE, PLOT_FILE = "results.json", "results.md", "quality_vs_speed.png"
REPORTS_FILE, RUN_FILE = "reports.parquet", "run.json"
MAJORITY_ROW = "majority (train)"
# Keys every system's object in results.json has (None where a metric was skipped).
RESULT_KEYS = (
    "ce_f1_micro14", "ce_f1_macro14", "ce_f1_micro5", "ce_f1_macro5",
    "ce_f1_micro14_uncertain_positive", "ce_f1_macro14_uncertain_positive",
    "ce_f1_micro5_uncertain_positive", "ce_f1_macro5_uncertain_positive",
    "semscore", "rouge_l", "bleu4", "fluency_ppl", "ratescore", "known_sentences",
    "tokens_per_forward", "tokens_per_s", "ms_per_report", "forwards_per_report",
    "num_reports", "num_errors",
)
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


@dataclass(frozen=True)
class System:
    """One evaluated system: a name, a checkpoint (or run folder) and a decoding mode."""

    name: str
    path: str
    mode: str

    @classmethod
    def parse(cls, spec: str) -> System:
        """`NAME=PATH:MODE`; MODE one of decoding.DECODING_MODES or MODE_ALIASES."""
        name, eq, rest = spec.partition("=")
        path, colon, mode = rest.rpartition(":")
        if not eq or not colon or not name.strip() or not path:
            raise ValueError(
                f"system {spec!r}: expected NAME=PATH:MODE, e.g. ar=runs/ar:ar or "
                "teacher=runs/rad:multi-step"
            )
        mode = MODE_ALIASES.get(mode, mode)
        if mode not in DECODING_MODES:
            raise ValueError(
                f"system {spec!r}: unknown decoding mode {mode!r}; choose one of "
                f"{DECODING_MODES} (or {sorted(MODE_ALIASES)})"
            )
        return cls(name.strip(), path, mode)


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate (everything but the systems and the data)."""

    split: str = "test"
    limit: int = 0  # first N images of the split (0 = all)
    batch_size: int = 16
    fluency_model: str | None = None  # AR checkpoint; default: the first system decoding "ar"
    semscore_model: str = DEFAULT_SEMSCORE_MODEL
    ratescore: bool = True
    reference_labels: str = "labeler"  # "labeler": label the reference text; "shard": labels
    actors: int = 1  # model replicas per system
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    threads: int = 0  # torch threads per actor (0: one per CPU of the actor, at least 1)
    steps: int | None = None  # multi-step: forwards per block at most (default block_length)
    threshold: float = 0.9  # multi-step: tau

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {SPLITS}")
        if self.reference_labels not in REFERENCE_LABELS:
            raise ValueError(
                f"reference_labels={self.reference_labels!r}; choose one of {REFERENCE_LABELS}"
            )
        if self.batch_size < 1 or self.actors < 1 or self.limit < 0:
            raise ValueError("batch_size and actors must be >= 1, limit >= 0")


def evaluate(
    data: str,
    out: str,
    systems: Sequence[System | str],
    options: EvalOptions = EvalOptions(),
    *,
    s3_endpoint: str | None = None,
    ray_address: str | None = None,
) -> Evaluation:
    """Evaluate `systems` on one split of the shards in `data`; write the outputs to `out`.

    Returns:
        results.json's content (system name -> figures: RESULT_KEYS and more) and
        run.json's (what was evaluated and how, notes, the majority baseline).
    """
    options.validate()
    systems = [s if isinstance(s, System) else System.parse(s) for s in systems]
    if not systems:
        raise ValueError("no systems to evaluate: pass at least one NAME=PATH:MODE")
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"system names must be unique, got {names}")
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
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Ray Data's progress bars are for terminals; in a log they print a status block every
    # few seconds. The per-system progress lines below are printed either way.
    ctx.enable_progress_bars = sys.stdout.isatty()
    _log(f"{len(systems)} system(s) on the {options.split} split of {shards.uri} "
         f"(~{expected} images, batch {options.batch_size}, {options.actors} actor(s) each)")
    start = time.perf_counter()
    tables = {}
    for system in systems:
        tables[system.name] = _run_system(
            system, models[system.name], fluency, files, shards, options, expected
        )
    _log("scoring")
    results, notes, baseline = score_systems(
        systems, tables, options, _training_reference(files, shards, options.reference_labels),
        fluency_name=fluency and fluency.uri,
    )
    run_info = {
        "data": shards.uri,
        "split": options.split,
        "systems": {s.name: {"path": models[s.name].uri, "mode": s.mode} for s in systems},
        "options": asdict(options),
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


@dataclass
class TrainingReference:
    """What the train split contributes: its report sentences (the known-sentence rate) and
    its labels (the majority-class baseline), under the run's reference-label policy."""

    sentences: set[str]
    labels: list[dict]


def _training_reference(files: list[str], shards: Location, policy: str) -> TrainingReference:
    table = pads.dataset(files, filesystem=shards.fs, format="parquet").to_table(
        columns=["report_normalized", "labels"], filter=pc.field("split") == "train"
    )
    rows = [r for r in table.to_pylist() if r["report_normalized"]]
    if policy == "labeler":
        labels = [label_report(r["report_normalized"]) for r in rows]
    else:
        labels = labels_from_vectors(r["labels"] for r in rows if r["labels"] is not None)
    return TrainingReference(known_sentences(r["report_normalized"] for r in rows), labels)


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
    shards: Location, options: EvalOptions, expected: int,
) -> pa.Table:
    ds = ray.data.read_parquet(files, filesystem=shards.fs, columns=_INPUT_COLUMNS)
    ds = ds.map_batches(select_splits, fn_kwargs={"splits": (options.split,)},
                        batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    if options.limit:
        ds = ds.limit(options.limit)
    threads = options.threads or max(1, int(options.cpus_per_actor))
    ds = ds.map_batches(
        _ReportActor,
        fn_constructor_kwargs={
            "model": model, "mode": system.mode, "fluency": fluency, "threads": threads,
            "use_gpu": options.gpus_per_actor > 0, "steps": options.steps,
            "threshold": options.threshold, "batch_size": options.batch_size,
        },
        batch_size=options.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
    )
    _log(f"{system.name}: {model.uri} decoding {system.mode}")
    start, done, errors, parts = time.perf_counter(), 0, 0, []
    last = 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        parts.append(batch)
        done += batch.num_rows
        errors += batch.num_rows - pc.sum(pc.is_null(batch.column("error"))).as_py()
        now = time.perf_counter()
        if now - last > 10 or done >= expected:
            last = now
            _log(f"{system.name}: {done}/{expected} images, {errors} error(s), "
                 f"{now - start:.0f} s")
    table = pa.concat_tables(parts) if parts else _OUTPUT_SCHEMA.empty_table()
    _log(f"{system.name}: {table.num_rows} images in {time.perf_counter() - start:.1f} s")
    return table


class _ReportActor:
    """One model replica: DICOM bytes in, reports + timings + fluency NLL out (no pixels)."""

    def __init__(self, *, model: Location, mode: str, fluency: Location | None, threads: int,
                 use_gpu: bool, steps: int | None, threshold: float, batch_size: int) -> None:
        from echo_ray.data.storage import local_model_dir
        from echo_ray.decode.predictor import ReportGenerator, ReportScorer

        self.device = setup_model_actor(threads, use_gpu)
        self.tmp = tempfile.mkdtemp(prefix="echo-eval-")
        generator = ReportGenerator.from_checkpoint(
            local_model_dir(model, os.path.join(self.tmp, "model")), decoding=mode,
            steps=steps, threshold=threshold, model_id=model.uri,
        )
        self.generator = generator.to(self.device)
        self.scorer = None
        if fluency is not None:
            scorer = ReportScorer.from_checkpoint(
                local_model_dir(fluency, os.path.join(self.tmp, "fluency"))
            )
            self.scorer = scorer.to(self.device)
        self.generator.warm_up(min(batch_size, 2))  # not in the first system's timing

    def __call__(self, batch: pa.Table) -> pa.Table:
        blobs = batch.column("dicom").to_pylist()
        references = batch.column("report_normalized").to_pylist()
        slots, good, images, metas = self.generator.decode_dicoms(blobs)
        reports = self.generator.generate(images, metas) if images else []
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
        return pa.table({
            "dicom_id": batch.column("dicom_id"),
            "study_id": batch.column("study_id"),
            "view_position": batch.column("view_position"),
            "reference_labels": batch.column("labels"),
            **{name: pa.array(columns.get(name, []), _OUTPUT_SCHEMA.field(name).type)
               for name in _OUTPUT_SCHEMA.names
               if name not in ("dicom_id", "study_id", "view_position", "reference_labels")},
        }).select(_OUTPUT_SCHEMA.names).cast(_OUTPUT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Scoring (driver side, plain Python)


def score_systems(
    systems: Sequence[System],
    tables: dict[str, pa.Table],
    options: EvalOptions,
    train: TrainingReference,
    *,
    fluency_name: str | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict[str, Any] | None]:
    """The figures of every system from its rows.

    Rows with an error (the DICOM did not decode) or without a reference report are left
    out of every quality figure and counted in `num_errors` / `num_no_reference`.

    Returns:
        (system name -> figures; notes: which models, which conventions, what was skipped
        and why; the majority-class baseline's CE F1 on the same images, None without
        training labels).
    """
    notes: dict[str, str] = {
        "uncertain": "ce_f1_* score an uncertain label as negative; "
                     "ce_f1_*_uncertain_positive as positive",
        "reference_labels": (
            "the project's labeler on the reference report" if options.reference_labels ==
            "labeler" else "the shards' labels column (chexpert.csv when the archive has one)"
        ),
        "bleu4": "corpus BLEU-4 (sacrebleu, 13a tokenization) / 100",
        "rouge_l": "mean ROUGE-L F-measure (rouge-score, no stemming)",
        "known_sentences": "share of generated sentences found verbatim in training reports",
        "speed": f"decoder call only (vision + prefill + decode), batch {options.batch_size}, "
                 "after a warm-up batch; tokens exclude <eos>",
    }
    encoder = None
    try:
        encoder = load_sentence_encoder(options.semscore_model)
        notes["semscore"] = f"mean cosine of sentence embeddings, model {encoder.name}"
    except MetricUnavailable as e:
        notes["semscore"] = f"skipped: {e}"
    notes["fluency_ppl"] = (
        f"perplexity of the generated report given its image under {fluency_name}"
        if fluency_name else "skipped: no AR checkpoint (pass --fluency-model or an ar system)"
    )
    ratescore_reason = None if options.ratescore else "skipped: --no-ratescore"
    results: dict[str, dict[str, Any]] = {}
    baseline: dict[str, Any] | None = None
    for system in systems:
        rows = tables[system.name].to_pylist()
        good = [r for r in rows if r["error"] is None and r["reference"]]
        figures: dict[str, Any] = {
            "mode": system.mode,
            "num_reports": len(good),
            "num_errors": sum(r["error"] is not None for r in rows),
            "num_no_reference": sum(r["error"] is None and not r["reference"] for r in rows),
        }
        if not good:
            figures.update({k: None for k in RESULT_KEYS if k not in figures})
            results[system.name] = figures
            continue
        generated = [r["report"] for r in good]
        references = [r["reference"] for r in good]
        predicted = labels_from_vectors(r["labels"] for r in good)
        if options.reference_labels == "labeler":
            reference_labels = [label_report(t) for t in references]
        else:
            kept = [r for r in good if r["reference_labels"] is not None]
            reference_labels = labels_from_vectors(r["reference_labels"] for r in kept)
            predicted = labels_from_vectors(r["labels"] for r in kept)
        for policy in UNCERTAIN_POLICIES:
            scores = label_f1(predicted, reference_labels, uncertain=policy)
            suffix = "" if policy == "negative" else "_uncertain_positive"
            for key in ("micro14", "macro14", "micro5", "macro5"):
                figures[f"ce_f1_{key}{suffix}"] = scores[f"f1_{key}"]
            if policy == "negative":
                figures["per_label_f1"] = {k: scores["per_label"][k]["f1"]
                                           for k in CHEXPERT_LABELS}
        figures["semscore"] = semscore(generated, references, encoder) if encoder else None
        figures["rouge_l"] = rouge_l(generated, references)
        figures["bleu4"] = bleu4(generated, references)
        scored = [r for r in good if r["fluency_tokens"] is not None]
        figures["fluency_ppl"] = perplexity(
            [r["fluency_nll"] for r in scored], [r["fluency_tokens"] for r in scored]
        ) if scored else None
        figures["ratescore"] = None
        if ratescore_reason is None:
            try:
                figures["ratescore"] = ratescore(generated, references)
            except MetricUnavailable as e:
                ratescore_reason = f"skipped: {e}"
        figures["known_sentences"] = known_sentence_rate(generated, train.sentences)
        if baseline is None and train.labels:
            majority = majority_baseline(train.labels, reference_labels)
            baseline = {f"ce_f1_{k}": majority[f"f1_{k}"]
                        for k in ("micro14", "macro14", "micro5", "macro5")}
            baseline["per_label_f1"] = {k: majority["per_label"][k]["f1"]
                                        for k in CHEXPERT_LABELS}
            baseline["positive_labels"] = [k for k, v in majority["majority"].items() if v]
        figures.update(speed_figures(good))
        results[system.name] = figures
    notes["ratescore"] = ratescore_reason or "RaTEScore (ratescore package), mean over reports"
    notes["majority"] = ("majority (train): each label predicted as its majority class in the "
                         "train split, on the same images")
    return results, notes, baseline


def speed_figures(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Speed from per-report rows carrying their batch's id, size, forwards and latency.

    tokens_per_s: report tokens / seconds in the decoder, summed over distinct batches;
    ms_per_report: decoder milliseconds per report (a batch's time shared by its reports);
    forwards_per_report and tokens_per_forward: means over reports of their batch's figures
    (a batch decodes in lockstep, so its reports share its forwards).
    """
    batches = {r["batch_id"]: r["batch_latency_ms"] for r in rows}
    seconds = sum(batches.values()) / 1000
    tokens = sum(r["num_tokens"] for r in rows)
    return {
        "tokens_per_forward": statistics.fmean(r["batch_tokens_per_forward"] for r in rows),
        "tokens_per_s": tokens / seconds if seconds > 0 else math.inf,
        "ms_per_report": 1000 * seconds / len(rows),
        "forwards_per_report": statistics.fmean(r["batch_forwards"] for r in rows),
        "batch_latency_ms_p50": statistics.median(batches.values()),
        "num_batches": len(batches),
    }


# ---------------------------------------------------------------------------------------------
# Outputs


_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (key, header, format)
    ("mode", "decoding", "s"),
    ("num_reports", "reports", "d"),
    ("ce_f1_micro14", "CE F1 mi14", ".3f"),
    ("ce_f1_macro14", "CE F1 ma14", ".3f"),
    ("ce_f1_micro5", "CE F1 mi5", ".3f"),
    ("ce_f1_micro14_uncertain_positive", "mi14 (u=1)", ".3f"),
    ("semscore", "SemScore", ".3f"),
    ("rouge_l", "ROUGE-L", ".3f"),
    ("bleu4", "BLEU-4", ".3f"),
    ("fluency_ppl", "fluency PPL", ".2f"),
    ("ratescore", "RaTEScore", ".3f"),
    ("known_sentences", "known sent.", ".1%"),
    ("tokens_per_forward", "tok/fwd", ".2f"),
    ("tokens_per_s", "tok/s", ".0f"),
    ("ms_per_report", "ms/report", ".1f"),
    ("forwards_per_report", "fwd/report", ".1f"),
)


def format_results_table(
    results: dict[str, dict[str, Any]], baseline: dict[str, Any] | None = None
) -> str:
    """The systems x figures table, as Markdown (readable as plain text too); the
    majority-class baseline's CE F1 as a last row when given."""
    header = ["system"] + [title for _, title, _ in _TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    rows = dict(results)
    if baseline is not None:
        rows[MAJORITY_ROW] = {"mode": "-", **baseline}
    for name, fig in rows.items():
        cells = [name]
        for key, _, fmt in _TABLE_COLUMNS:
            value = fig.get(key)
            cells.append("n/a" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_results_markdown(results: dict[str, dict[str, Any]], run: dict[str, Any]) -> str:
    baseline = run.get("majority_baseline")
    columns = {**results, **({MAJORITY_ROW: baseline} if baseline else {})}
    per_label = {n: {"per_label": {k: {"f1": v} for k, v in f["per_label_f1"].items()},
                     **{f"f1_{k}": f[f"ce_f1_{k}"] for k in ("micro14", "macro14", "micro5",
                                                             "macro5")}}
                 for n, f in columns.items() if f.get("per_label_f1")}
    parts = [
        f"# echo-ray evaluation: {run['split']} split of {run['data']}",
        "",
        format_results_table(results, baseline),
        "",
        "Notes:",
        *(f"- {key}: {text}" for key, text in run["notes"].items()),
        "- systems: " + "; ".join(f"{n} = {s['path']} ({s['mode']})"
                                  for n, s in run["systems"].items()),
    ]
    if per_label:
        parts += ["", "Per-label CE F1 (uncertain = negative):", "", "```",
                  format_f1_table(per_label), "```"]
    return "\n".join(parts) + "\n"


def plot_quality_vs_speed(results: dict[str, dict[str, Any]], path: str) -> None:
    """Two panels, CE F1 (micro, 14 labels) and SemScore against tokens/s (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    shown = {n: f for n, f in results.items() if f.get("tokens_per_s")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in ((axes[0], "ce_f1_micro14", "CE F1, micro over 14 labels"),
                           (axes[1], "semscore", "SemScore")):
        points = {n: (f["tokens_per_s"], f[key]) for n, f in shown.items()
                  if f.get(key) is not None}
        for name, (x, y) in points.items():
            ax.scatter(x, y, s=50)
            # Systems of similar speed sit close: the lower one is labelled below its point.
            lower = any(y < y2 for n2, (x2, y2) in points.items()
                        if n2 != name and max(x, x2) / min(x, x2) < 1.3)
            ax.annotate(f"{name}\n({shown[name]['tokens_per_forward']:.1f} tok/fwd)", (x, y),
                        textcoords="offset points", xytext=(6, -22 if lower else 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.3)  # room for the labels of the outermost points
        ax.set_xlabel("tokens/s (log scale)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs speed")
        ax.grid(True, which="both", alpha=0.3)
        values = [f[key] for f in shown.values() if f.get(key) is not None]
        if values:
            ax.set_ylim(0, max(1.0, max(values) * 1.1) if key == "semscore"
                        else max(0.1, max(values) * 1.25))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(dst: Location, results: dict[str, dict[str, Any]],
                  tables: dict[str, pa.Table], run: dict[str, Any]) -> None:
    """results.json, results.md, the plot, reports.parquet and run.json under `dst`."""
    dst.fs.create_dir(dst.path, recursive=True)
    dst.join(RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True))
    dst.join(TABLE_FILE).write_text(format_results_markdown(results, run))
    dst.join(RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True, default=str))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, PLOT_FILE)
        plot_quality_vs_speed(results, local)
        with open(local, "rb") as f:
            dst.join(PLOT_FILE).write_bytes(f.read())
    reports = pa.concat_tables([
        t.append_column("system", pa.array([name] * t.num_rows, pa.string()))
        .append_column("decoding", pa.array([run["systems"][name]["mode"]] * t.num_rows,
                                            pa.string()))
        for name, t in tables.items()
    ])
    with dst.fs.open_output_stream(dst.join(REPORTS_FILE).path) as f:
        pq.write_table(reports, f)
