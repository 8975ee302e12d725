"""CheXpert label F1 (clinical efficacy) between generated and reference reports, both
labeled by text.labeler.label_report (or, for references, read from a shard's `labels`
column through labels_from_vectors). No ray, no torch.

- label_f1: per-label precision / recall / F1 / support over CHEXPERT_LABELS, and micro /
  macro F1 over the 14 labels and over the 5 CheXpert competition labels.
- majority_baseline: the same figures for predicting each label's training majority.
- positive_matrix / resampled_label_f1 / f1_from_counts: the same F1s from (N, 14) 0/1
  matrices or from TP / FP / FN counts, for the bootstrap: on many weighted resamples of the
  studies at once.
- format_f1_table: a fixed-width table comparing several systems.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from echo_ray.text.labels import CHEXPERT5_LABELS, CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN

__all__ = [
    "UNCERTAIN_POLICIES",
    "f1_from_counts",
    "format_f1_table",
    "label_f1",
    "labels_from_vectors",
    "majority_baseline",
    "positive_matrix",
    "resampled_label_f1",
]

Labels = Mapping[str, float | None]

# How an UNCERTAIN label is scored: as a negative (the usual CE convention) or a positive.
UNCERTAIN_POLICIES: tuple[str, ...] = ("negative", "positive")

# Summary rows of format_f1_table: (result key, row title).
_SUMMARY_ROWS: tuple[tuple[str, str], ...] = (
    ("f1_micro14", "micro F1 (14)"),
    ("f1_macro14", "macro F1 (14)"),
    ("f1_micro5", "micro F1 (5)"),
    ("f1_macro5", "macro F1 (5)"),
)


def _is_missing(value: Any) -> bool:
    # A shard read through pandas / numpy turns null labels into NaN (float32 NaN included).
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def labels_from_vectors(vectors: Iterable[Sequence[float | None] | None]) -> list[dict]:
    """Label dicts (as label_report returns them) from label vectors in CHEXPERT_LABELS order.

    This reads a shard's `labels` column (echo_ray.data.prepare): per study a list of 14 floats,
    1.0 positive, 0.0 negative, -1.0 uncertain, null (None, or NaN after pandas) not
    mentioned; it is the inverse of text.labeler.labels_to_vector.

    Raises:
        ValueError: a vector is None (the study has no report, hence no labels: drop such
            rows first), has a length other than 14, or holds a value other than 1.0, 0.0,
            -1.0 or a null.
    """
    out = []
    for i, vector in enumerate(vectors):
        if vector is None:
            raise ValueError(
                f"study {i} has no label vector (its report is missing); drop rows whose "
                "`labels` is null before computing label metrics"
            )
        values = list(vector)
        if len(values) != len(CHEXPERT_LABELS):
            raise ValueError(
                f"study {i}: label vector has {len(values)} entries, expected "
                f"{len(CHEXPERT_LABELS)} in CHEXPERT_LABELS order"
            )
        labels: dict[str, float | None] = {}
        for name, value in zip(CHEXPERT_LABELS, values, strict=True):
            if _is_missing(value):
                labels[name] = None
            elif float(value) in (POSITIVE, NEGATIVE, UNCERTAIN):
                labels[name] = float(value)
            else:
                raise ValueError(
                    f"study {i}: {name} = {value!r}; expected {POSITIVE} (positive), "
                    f"{NEGATIVE} (negative), {UNCERTAIN} (uncertain) or None (not mentioned)"
                )
        out.append(labels)
    return out


def _positive_matrix(studies: Sequence[Labels], uncertain: str, side: str) -> np.ndarray:
    """(N, 14) bool: label j of study i counts as positive."""
    positive_values = (POSITIVE, UNCERTAIN) if uncertain == "positive" else (POSITIVE,)
    matrix = np.zeros((len(studies), len(CHEXPERT_LABELS)), dtype=bool)  # (N, 14)
    known = set(CHEXPERT_LABELS)
    for i, labels in enumerate(studies):
        if not isinstance(labels, Mapping):
            raise TypeError(
                f"{side}[{i}] is a {type(labels).__name__}, expected a dict of label name -> "
                "value as label_report returns; convert label vectors with labels_from_vectors"
            )
        unknown = set(labels) - known
        if unknown:
            raise ValueError(
                f"{side}[{i}] has unknown label names {sorted(unknown)}; expected names from "
                f"CHEXPERT_LABELS: {list(CHEXPERT_LABELS)}"
            )
        for j, name in enumerate(CHEXPERT_LABELS):
            value = labels.get(name)
            if _is_missing(value):
                continue
            if value not in (POSITIVE, NEGATIVE, UNCERTAIN):
                raise ValueError(
                    f"{side}[{i}]: {name} = {value!r}; expected {POSITIVE}, {NEGATIVE}, "
                    f"{UNCERTAIN} or None"
                )
            matrix[i, j] = value in positive_values
    return matrix


def positive_matrix(studies: Sequence[Labels], *, uncertain: str = "negative") -> np.ndarray:
    """(N, 14) bool, CHEXPERT_LABELS order: label j of study i counts as positive under
    `uncertain` (label_f1's rule). The input of resampled_label_f1.

    Raises:
        ValueError / TypeError: as label_f1, for an unknown policy, label or value.
    """
    _check_policy(uncertain)
    return _positive_matrix(studies, uncertain, "studies")


def resampled_label_f1(
    predicted: np.ndarray, reference: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """label_f1's F1s on B weighted resamples of the same N studies at once.

    Resample b counts study i `weights[b, i]` times (a bootstrap draw: integer counts; 0
    leaves it out), so its TP / FP / FN are weighted sums over studies; the F1 rules are
    label_f1's (zero division gives 0). A row of ones gives label_f1's figures exactly.

    Args:
        predicted: (N, 14) bool, positive_matrix of the predicted labels.
        reference: (N, 14) bool, positive_matrix of the reference labels.
        weights: (B, N) non-negative counts.

    Returns:
        {"per_label": (B, 14) F1 in CHEXPERT_LABELS order, "f1_micro14", "f1_macro14",
        "f1_micro5", "f1_macro5": (B,) each}.
    """
    pred = np.asarray(predicted, dtype=bool)  # (N, 14)
    ref = np.asarray(reference, dtype=bool)  # (N, 14)
    w = np.asarray(weights, dtype=np.float64)  # (B, N)
    if pred.shape != ref.shape or pred.ndim != 2 or w.ndim != 2 or w.shape[1] != pred.shape[0]:
        raise ValueError(
            f"predicted {pred.shape}, reference {ref.shape} and weights {w.shape}: expected "
            "(N, 14), (N, 14) and (B, N)"
        )
    tp = w @ (pred & ref).astype(np.float64)  # (B, 14)
    fp = w @ (pred & ~ref).astype(np.float64)  # (B, 14)
    fn = w @ (~pred & ref).astype(np.float64)  # (B, 14)
    return f1_from_counts(tp, fp, fn)


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """label_f1's F1s from per-label TP / FP / FN counts of shape (..., 14) (CHEXPERT_LABELS
    order; e.g. (B, 14) for B bootstrap resamples), with label_f1's rules.

    Returns:
        {"per_label": (..., 14), "f1_micro14", "f1_macro14", "f1_micro5", "f1_macro5":
        (...) each}.
    """
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))  # (..., 14)

    def f1(t: np.ndarray, p: np.ndarray, n: np.ndarray) -> np.ndarray:
        denominator = 2 * t + p + n
        return np.divide(2 * t, denominator, out=np.zeros_like(t), where=denominator > 0)

    per_label = f1(tp, fp, fn)  # (..., 14)
    five = [CHEXPERT_LABELS.index(k) for k in CHEXPERT5_LABELS]
    return {
        "per_label": per_label,
        "f1_micro14": f1(tp.sum(-1), fp.sum(-1), fn.sum(-1)),  # (...,)
        "f1_macro14": per_label.mean(axis=-1),  # (...,)
        "f1_micro5": f1(tp[..., five].sum(-1), fp[..., five].sum(-1),
                        fn[..., five].sum(-1)),  # (...,)
        "f1_macro5": per_label[..., five].mean(axis=-1),  # (...,)
    }


def _check_policy(uncertain: str) -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"uncertain={uncertain!r}; expected one of {UNCERTAIN_POLICIES} (how an "
            "UNCERTAIN label is scored)"
        )


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def _scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """CE figures from (N, 14) bool matrices of predicted and reference positives."""
    tp = (pred & ref).sum(axis=0)  # (14,)
    fp = (pred & ~ref).sum(axis=0)  # (14,)
    fn = (~pred & ref).sum(axis=0)  # (14,)
    per_label = {}
    for j, name in enumerate(CHEXPERT_LABELS):
        t, p, n = int(tp[j]), int(fp[j]), int(fn[j])
        per_label[name] = {
            "precision": t / (t + p) if t + p else 0.0,
            "recall": t / (t + n) if t + n else 0.0,
            "f1": _f1(t, p, n),
            "support": t + n,
            "tp": t,
            "fp": p,
            "fn": n,
        }

    def micro(names: Sequence[str]) -> float:
        return _f1(*(sum(per_label[k][c] for k in names) for c in ("tp", "fp", "fn")))

    def macro(names: Sequence[str]) -> float:
        return sum(per_label[k]["f1"] for k in names) / len(names)

    return {
        "per_label": per_label,
        "f1_micro14": micro(CHEXPERT_LABELS),
        "f1_macro14": macro(CHEXPERT_LABELS),
        "f1_micro5": micro(CHEXPERT5_LABELS),
        "f1_macro5": macro(CHEXPERT5_LABELS),
        "num_studies": int(pred.shape[0]),
    }


def label_f1(
    predicted: Sequence[Labels],
    reference: Sequence[Labels],
    *,
    uncertain: str = "negative",
) -> dict[str, Any]:
    """CheXpert label F1 (clinical efficacy) of predicted against reference labels.

    A label is positive when it is POSITIVE, and also when UNCERTAIN if
    uncertain="positive"; NEGATIVE, None and missing labels are negative. The same rule
    applies to both sides. Scores are for the positive class of each label.

    Zero division follows sklearn's zero_division=0, as CheXpert-based CE papers do:
    precision, recall or F1 whose denominator is zero is 0, so a label with no predicted
    and no reference positive has F1 0 and pulls the macro average down. Macro F1 is the
    mean of the per-label F1s; micro F1 is 2*TP / (2*TP + FP + FN) over TP, FP, FN
    summed across the labels.

    Args:
        predicted: one label dict per study (label name -> POSITIVE / NEGATIVE /
            UNCERTAIN / None), as text.labeler.label_report returns for a generated report.
        reference: the reference labels, same length and study order (shard vectors go
            through labels_from_vectors first).
        uncertain: "negative" or "positive", how UNCERTAIN is scored.

    Returns:
        {"per_label": {label: {"precision", "recall", "f1", "support", "tp", "fp", "fn"}}
        over CHEXPERT_LABELS (support = reference positives), "f1_micro14", "f1_macro14",
        "f1_micro5", "f1_macro5" (5 = CHEXPERT5_LABELS), "num_studies"}.

    Raises:
        ValueError: the two sequences differ in length or are empty, uncertain is not a
            policy of UNCERTAIN_POLICIES, or a dict holds an unknown label or value.
        TypeError: an entry is not a dict.
    """
    _check_policy(uncertain)
    if len(predicted) != len(reference):
        raise ValueError(
            f"predicted has {len(predicted)} studies but reference has {len(reference)}; "
            "pass one label dict per study on both sides, in the same order"
        )
    if not reference:
        raise ValueError("no studies to score: predicted and reference are empty")
    return _scores(
        _positive_matrix(predicted, uncertain, "predicted"),
        _positive_matrix(reference, uncertain, "reference"),
    )


def majority_baseline(
    train_reference: Sequence[Labels],
    test_reference: Sequence[Labels],
    *,
    uncertain: str = "negative",
) -> dict[str, Any]:
    """label_f1 of predicting, for every test study, each label's majority class in train.

    A label is predicted positive for all test studies when more than half of the
    training studies have it positive (under the same uncertain policy), else negative
    for all (a tie is negative). A label whose majority is negative therefore scores F1 0.

    Returns:
        label_f1's dict, plus "majority": {label: True if predicted positive}.

    Raises:
        ValueError: train_reference or test_reference is empty, or as label_f1.
    """
    _check_policy(uncertain)
    if not train_reference:
        raise ValueError("train_reference is empty: the majority class needs training studies")
    if not test_reference:
        raise ValueError("no studies to score: test_reference is empty")
    train = _positive_matrix(train_reference, uncertain, "train_reference")  # (N_train, 14)
    majority = 2 * train.sum(axis=0) > train.shape[0]  # (14,)
    ref = _positive_matrix(test_reference, uncertain, "test_reference")  # (N_test, 14)
    pred = np.broadcast_to(majority, ref.shape)  # (N_test, 14)
    result = _scores(pred, ref)
    result["majority"] = {name: bool(m) for name, m in zip(CHEXPERT_LABELS, majority, strict=True)}
    return result


def format_f1_table(results: Mapping[str, Mapping[str, Any]], *, digits: int = 3) -> str:
    """A fixed-width text table of F1s: one row per CheXpert label, then the micro / macro
    rows (14 and 5 labels), one column per system.

    Args:
        results: system name -> a label_f1 / majority_baseline result, e.g.
            {"majority": ..., "ar": ..., "rad": ...}; columns follow its order.
        digits: decimals shown.
    """
    if not results:
        raise ValueError("results is empty: pass {system name: label_f1 result}")
    for system, result in results.items():
        missing = [k for k in ("per_label", *(k for k, _ in _SUMMARY_ROWS)) if k not in result]
        if missing:
            raise ValueError(f"results[{system!r}] lacks {missing}; pass the dict label_f1 returns")
    rows: list[tuple[str, list[float]]] = [
        (name, [r["per_label"][name]["f1"] for r in results.values()]) for name in CHEXPERT_LABELS
    ]
    rows += [(title, [r[key] for r in results.values()]) for key, title in _SUMMARY_ROWS]

    first = max(len("label"), *(len(title) for title, _ in rows))
    widths = [max(len(str(system)), digits + 2) for system in results]
    columns = list(zip(results, widths, strict=True))
    header = "label".ljust(first) + "".join(f"  {str(s):>{w}}" for s, w in columns)
    lines = [header, "-" * len(header)]
    for i, (title, values) in enumerate(rows):
        if i == len(CHEXPERT_LABELS):
            lines.append("-" * len(header))
        cells = "".join(f"  {v:>{w}.{digits}f}" for v, w in zip(values, widths, strict=True))
        lines.append(title.ljust(first) + cells)
    return "\n".join(lines)
