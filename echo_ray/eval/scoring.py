"""The figures of every evaluated system, computed on the driver from its report rows:
clinical efficacy (label F1 and the training-majority baseline), text metrics and speed.
Plain Python, no ray.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from echo_ray.config.schema import EvaluateConfig
from echo_ray.data.storage import Location
from echo_ray.eval.label_metrics import (
    UNCERTAIN_POLICIES,
    label_f1,
    labels_from_vectors,
    majority_baseline,
)
from echo_ray.eval.systems import System
from echo_ray.eval.text_metrics import (
    MetricUnavailable,
    bleu4,
    known_sentence_rate,
    known_sentences,
    load_sentence_encoder,
    perplexity,
    ratescore,
    rouge_l,
    semscore,
)
from echo_ray.text.labeler import label_report
from echo_ray.text.labels import CHEXPERT_LABELS

# Keys every system's object in results.json has (None where a metric was skipped).
RESULT_KEYS = (
    "ce_f1_micro14", "ce_f1_macro14", "ce_f1_micro5", "ce_f1_macro5",
    "ce_f1_micro14_uncertain_positive", "ce_f1_macro14_uncertain_positive",
    "ce_f1_micro5_uncertain_positive", "ce_f1_macro5_uncertain_positive",
    "semscore", "rouge_l", "bleu4", "fluency_ppl", "ratescore", "known_sentences",
    "tokens_per_forward", "tokens_per_s", "ms_per_report", "forwards_per_report",
    "num_reports", "num_errors",
)


@dataclass
class TrainingReference:
    """What the train split contributes: its report sentences (the known-sentence rate) and
    its labels (the majority-class baseline), under the run's reference-label policy."""

    sentences: set[str]
    labels: list[dict]


def training_reference(files: list[str], shards: Location, policy: str) -> TrainingReference:
    """The train split's report sentences and labels; `policy` is the run's
    reference_labels: "labeler" labels the report text, "shard" reads the labels column."""
    table = pads.dataset(files, filesystem=shards.fs, format="parquet").to_table(
        columns=["report_normalized", "labels"], filter=pc.field("split") == "train"
    )
    rows = [r for r in table.to_pylist() if r["report_normalized"]]
    if policy == "labeler":
        labels = [label_report(r["report_normalized"]) for r in rows]
    else:
        labels = labels_from_vectors(r["labels"] for r in rows if r["labels"] is not None)
    return TrainingReference(known_sentences(r["report_normalized"] for r in rows), labels)


def score_systems(
    systems: Sequence[System],
    tables: dict[str, pa.Table],
    options: EvaluateConfig,
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
