"""The figures of every evaluated system, computed on the driver from its report rows:
clinical efficacy (label F1 and the training-majority baseline), text metrics and speed,
and (eval.bootstrap) the 95% interval of every quality figure and, with
`evaluate.compare_to`, every system's paired difference to that one. Plain Python, no ray.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from echo_ray.config.schema import ConfigError, EvaluateConfig
from echo_ray.data.storage import Location
from echo_ray.eval.bootstrap import (
    UNIT_WORDS,
    RowScores,
    intervals,
    majority_intervals,
    paired_difference,
)
from echo_ray.eval.label_metrics import (
    UNCERTAIN_POLICIES,
    label_f1,
    labels_from_vectors,
    majority_baseline,
    positive_matrix,
)
from echo_ray.eval.systems import System
from echo_ray.eval.text_metrics import (
    MetricUnavailable,
    bleu4,
    bleu_statistics,
    known_sentence_counts,
    known_sentence_rate,
    known_sentences,
    load_sentence_encoder,
    perplexity,
    ratescore_scores,
    rouge_l_scores,
    semscore_scores,
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
    "num_reports", "num_errors", "num_studies", "ci95",
)
# The key of results.json's paired differences to evaluate.compare_to, in each other system.
PAIRED_KEY = "paired_diff"


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

    With `options.bootstrap_samples` > 0, each system's `ci95` holds the 95% bootstrap
    interval of every quality figure (eval.bootstrap; None otherwise), and the baseline's
    too; with `options.compare_to`, every other system's PAIRED_KEY holds its paired
    bootstrap difference to that system: {"vs": its name, "num_images", "num_units",
    "figures"} (bootstrap.paired_difference).

    Raises:
        ConfigError: `options.compare_to` names none of `systems`.

    Returns:
        (system name -> figures; notes: which models, which conventions, what was skipped
        and why; the majority-class baseline's CE F1 on the same images, None without
        training labels).
    """
    check_compare_to(options.compare_to, [s.name for s in systems])
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
    row_scores: dict[str, RowScores] = {}
    baseline_rows: RowScores | None = None
    for system in systems:
        rows = tables[system.name].to_pylist()
        good = [r for r in rows if r["error"] is None and r["reference"]]
        figures: dict[str, Any] = {
            "mode": system.mode,
            "num_reports": len(good),
            "num_errors": sum(r["error"] is not None for r in rows),
            "num_no_reference": sum(r["error"] is None and not r["reference"] for r in rows),
            "num_studies": len({r["study_id"] for r in good}),
            "ci95": None,
        }
        if not good:
            figures.update({k: None for k in RESULT_KEYS if k not in figures})
            results[system.name] = figures
            continue
        generated = [r["report"] for r in good]
        references = [r["reference"] for r in good]
        predicted = labels_from_vectors(r["labels"] for r in good)
        labeled = np.ones(len(good), dtype=bool)  # (N,)
        if options.reference_labels == "labeler":
            reference_labels = [label_report(t) for t in references]
        else:
            labeled = np.array([r["reference_labels"] is not None for r in good])  # (N,)
            kept = [r for r, k in zip(good, labeled, strict=True) if k]
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
        # Per-report scores, computed once: their means are the figures, and the bootstrap
        # resamples them.
        means: dict[str, np.ndarray] = {}
        if encoder:
            means["semscore"] = semscore_scores(generated, references, encoder)
        means["rouge_l"] = rouge_l_scores(generated, references)
        figures["semscore"] = float(means["semscore"].mean()) if encoder else None
        figures["rouge_l"] = float(np.mean(means["rouge_l"]))
        figures["bleu4"] = bleu4(generated, references)
        scored = [r for r in good if r["fluency_tokens"] is not None]
        figures["fluency_ppl"] = perplexity(
            [r["fluency_nll"] for r in scored], [r["fluency_tokens"] for r in scored]
        ) if scored else None
        figures["ratescore"] = None
        if ratescore_reason is None:
            try:
                means["ratescore"] = ratescore_scores(generated, references)
                figures["ratescore"] = float(np.mean(means["ratescore"]))
            except MetricUnavailable as e:
                ratescore_reason = f"skipped: {e}"
        figures["known_sentences"] = known_sentence_rate(generated, train.sentences)
        row_scores[system.name] = _row_scores(
            good, options, predicted, reference_labels, labeled, means,
            bleu_statistics(generated, references), known_sentence_counts(generated,
                                                                          train.sentences),
        )
        if baseline is None and train.labels:
            baseline_rows = row_scores[system.name]
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
    samples, seed = options.bootstrap_samples, options.bootstrap_seed
    if samples:
        for name, scores in row_scores.items():
            results[name]["ci95"] = intervals(scores, samples, seed)
        if baseline is not None and baseline_rows is not None:
            positive = [k in baseline["positive_labels"] for k in CHEXPERT_LABELS]
            baseline["ci95"] = majority_intervals(baseline_rows, positive, samples, seed)
        notes["ci95"] = (
            f"95% bootstrap intervals: {samples} resamples of the "
            f"{UNIT_WORDS[options.bootstrap_unit]} (seed {seed}), each figure recomputed on "
            "each resample, 2.5th-97.5th percentiles; BLEU-4 from resampled per-report "
            "n-gram counts; speed figures have none"
        )
    if options.compare_to:
        base = row_scores.get(options.compare_to)
        for name, scores in row_scores.items():
            if name == options.compare_to:
                continue
            diff = (paired_difference(scores, base, samples, seed) if base is not None else
                    {"num_images": 0, "num_units": 0, "figures": {}})
            results[name][PAIRED_KEY] = {"vs": options.compare_to, **diff}
        for name in results.keys() - row_scores.keys() - {options.compare_to}:
            results[name][PAIRED_KEY] = {"vs": options.compare_to, "num_images": 0,
                                         "num_units": 0, "figures": {}}
        notes["compare_to"] = (
            f"{PAIRED_KEY}: each system minus {options.compare_to}, paired bootstrap on the "
            "images both systems scored (aligned by image id; the same "
            f"{UNIT_WORDS[options.bootstrap_unit]} resampled for both); frac_le_0: the "
            "share of resamples where the difference is <= 0 (small: reliably higher than "
            f"{options.compare_to}; for fluency_ppl lower is better)"
        )
    return results, notes, baseline


def check_compare_to(compare_to: str | None, names: Sequence[str]) -> None:
    """`evaluate.compare_to` must name an evaluated system.

    Raises:
        ConfigError: it names none of `names`.
    """
    if compare_to is not None and compare_to not in names:
        raise ConfigError(
            f"evaluate.compare_to {compare_to!r} (--compare-to) is not an evaluated system; "
            f"choose one of {list(names)} (the NAME of a --system NAME=PATH:MODE)"
        )


def _row_scores(good: list[dict], options: EvaluateConfig, predicted: list[dict],
                reference: list[dict], labeled: np.ndarray, means: dict[str, np.ndarray],
                bleu: np.ndarray, known: np.ndarray) -> RowScores:
    """The bootstrap's RowScores of one system's scored rows; `predicted` and `reference`
    are the label dicts of the `labeled` rows only."""
    unit = "study_id" if options.bootstrap_unit == "study" else "dicom_id"
    matrices: dict[str, dict[str, np.ndarray]] = {"predicted": {}, "reference": {}}
    for policy in UNCERTAIN_POLICIES:
        for side, labels in (("predicted", predicted), ("reference", reference)):
            matrix = np.zeros((len(good), len(CHEXPERT_LABELS)), dtype=bool)  # (N, 14)
            if labels:
                matrix[labeled] = positive_matrix(labels, uncertain=policy)
            matrices[side][policy] = matrix
    fluency = None
    if any(r["fluency_tokens"] is not None for r in good):
        fluency = np.array([(r["fluency_nll"], r["fluency_tokens"])
                            if r["fluency_tokens"] is not None else (0.0, 0)
                            for r in good], dtype=np.float64)  # (N, 2)
    return RowScores(
        image_ids=np.array([r["dicom_id"] for r in good], dtype=str),
        units=np.array([r[unit] or r["dicom_id"] for r in good], dtype=str),
        predicted=matrices["predicted"], reference=matrices["reference"],
        labeled=labeled, means=means, bleu=bleu, fluency=fluency, known=known,
    )


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
