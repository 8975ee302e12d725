"""Bootstrap 95% intervals of the quality figures, and paired bootstrap differences between
systems. numpy only, no ray.

Every quality figure of `scoring.score_systems` is a function of sums over the scored rows
(one row per image): CE F1 of TP / FP / FN counts, SemScore, ROUGE-L and RaTEScore of
per-report scores, BLEU-4 of per-report n-gram statistics, fluency perplexity of per-report
NLL and token counts, the known-sentence rate of per-report sentence counts. `RowScores`
holds those per-row quantities, computed once. A bootstrap resample is a vector of integer
weights over the rows (how many times each row was drawn), so `resampled_figures` computes
every figure on B resamples at once from one (B, N) @ (N, k) product of the weights with
the rows' quantities: 1000 resamples of 250 images cost milliseconds per system.

- Unit: `evaluate.bootstrap_unit`. "study" (default) draws studies with replacement, each
  with all its images (images of one study share the reference report, hence its labels:
  they are not independent); "image" draws images. `resample_weights` draws over the
  sorted unit ids, so the same units and seed give the same resamples whatever the row
  order, and systems scored on the same images get the same resamples.
- Interval: percentile, the 2.5th and 97.5th percentiles of the B resampled figures
  (numpy's linear interpolation); resamples where a figure is undefined (perplexity of a
  resample without a scored token) are left out of its percentiles.
- Paired difference (`paired_difference`): rows of two systems aligned by image id (on the
  images both scored), one set of resamples applied to both, the figure of one minus the
  other on each.

Speed figures (tokens/s, ms/report, ...) get no interval: they are timings of batches, not
averages over independent reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from echo_ray.eval.label_metrics import (
    UNCERTAIN_POLICIES,
    f1_from_counts,
    resampled_label_f1,
)
from echo_ray.eval.text_metrics import bleu4_from_statistics
from echo_ray.text.labels import CHEXPERT_LABELS

# The quality figures of results.json that get an interval (and a paired difference), besides
# per_label_f1; the speed figures are left out.
INTERVAL_KEYS: tuple[str, ...] = (
    "ce_f1_micro14", "ce_f1_macro14", "ce_f1_micro5", "ce_f1_macro5",
    "ce_f1_micro14_uncertain_positive", "ce_f1_macro14_uncertain_positive",
    "ce_f1_micro5_uncertain_positive", "ce_f1_macro5_uncertain_positive",
    "semscore", "rouge_l", "bleu4", "fluency_ppl", "ratescore", "known_sentences",
)
# What evaluate.bootstrap_unit resamples, in words (plural).
UNIT_WORDS = {"study": "studies", "image": "images"}
# Percentiles of the 95% interval.
CI_PERCENTILES = (2.5, 97.5)


def ce_key(summary: str, policy: str) -> str:
    """results.json's key of a CE F1 summary ("micro14", ...) under an uncertain policy."""
    return f"ce_f1_{summary}" + ("" if policy == "negative" else "_uncertain_positive")


@dataclass
class RowScores:
    """One system's scored rows (N images), as the bootstrap needs them.

    Attributes:
        image_ids: (N,) the rows' image ids (`dicom_id`): how two systems' rows align.
        units: (N,) the resampling unit of each row: its study id, or its image id.
        predicted: uncertain policy -> (N, 14) bool, positive_matrix of the generated
            report's labels.
        reference: uncertain policy -> (N, 14) bool, the same of the reference labels.
        labeled: (N,) bool, the row has reference labels (always, with the labeler; with
            `reference_labels=shard`, rows whose shard has none count in no CE figure).
        means: figure name -> (N,) float per-report scores whose mean is the figure
            (semscore, rouge_l, ratescore: those that were computed).
        bleu: (N, 10) text_metrics.bleu_statistics.
        fluency: (N, 2) float, summed NLL and scored tokens per report (0, 0 for a report
            not scored), or None when fluency was not scored.
        known: (N, 2) known sentences and sentences per report.
    """

    image_ids: np.ndarray
    units: np.ndarray
    predicted: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    labeled: np.ndarray
    means: dict[str, np.ndarray]
    bleu: np.ndarray
    fluency: np.ndarray | None
    known: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)

    def take(self, index: np.ndarray) -> RowScores:
        """The rows at `index` (an integer array), in that order."""
        return RowScores(
            image_ids=self.image_ids[index],
            units=self.units[index],
            predicted={k: v[index] for k, v in self.predicted.items()},
            reference={k: v[index] for k, v in self.reference.items()},
            labeled=self.labeled[index],
            means={k: v[index] for k, v in self.means.items()},
            bleu=self.bleu[index],
            fluency=None if self.fluency is None else self.fluency[index],
            known=self.known[index],
        )


def resample_weights(units: Sequence[str] | np.ndarray, samples: int, seed: int) -> np.ndarray:
    """(B, N) float64 bootstrap weights: resample b draws K units with replacement among the
    K distinct `units` (sorted, so row order does not matter), and row i weighs how many
    times its unit was drawn.

    Args:
        units: (N,) the unit id of each row (rows of one unit are drawn together).
        samples: B, the number of resamples (>= 1).
        seed: numpy Generator seed: the same units and seed, the same weights.
    """
    if samples < 1:
        raise ValueError(f"samples={samples}: the bootstrap needs at least one resample")
    keys, inverse = np.unique(np.asarray(units, dtype=str), return_inverse=True)  # (K,), (N,)
    k = len(keys)
    if k == 0:
        return np.zeros((samples, 0))
    draws = np.random.default_rng(seed).integers(0, k, size=(samples, k))  # (B, K)
    flat = (np.arange(samples)[:, None] * k + draws).ravel()  # (B*K,)
    counts = np.bincount(flat, minlength=samples * k).reshape(samples, k)  # (B, K)
    return counts[:, inverse].astype(np.float64)  # (B, N)


def _columns(rows: RowScores) -> tuple[np.ndarray, dict[str, slice]]:
    """(N, k) float64: every per-row quantity a figure sums, side by side, and where each
    block sits: label TP / FP / FN indicators per policy (zero on unlabeled rows), the
    per-report means, BLEU statistics, fluency NLL and tokens, known-sentence counts."""
    blocks: dict[str, np.ndarray] = {}
    labeled = rows.labeled[:, None]  # (N, 1)
    for policy in UNCERTAIN_POLICIES:
        pred, ref = rows.predicted[policy], rows.reference[policy]  # (N, 14) each
        blocks[f"tp_{policy}"] = pred & ref & labeled
        blocks[f"fp_{policy}"] = pred & ~ref & labeled
        blocks[f"fn_{policy}"] = ~pred & ref & labeled
    for key, values in rows.means.items():
        blocks[key] = values[:, None]  # (N, 1)
    blocks["rows"] = np.ones((len(rows), 1))  # (N, 1): the resample's size
    blocks["bleu"] = rows.bleu  # (N, 10)
    blocks["known"] = rows.known  # (N, 2)
    if rows.fluency is not None:
        blocks["fluency"] = rows.fluency  # (N, 2)
    where, start = {}, 0
    for key, block in blocks.items():
        where[key] = slice(start, start + block.shape[1])
        start += block.shape[1]
    columns = np.concatenate([b.astype(np.float64) for b in blocks.values()], axis=1)
    return columns, where  # (N, k)


def resampled_figures(rows: RowScores, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every quality figure of `rows` on B weighted resamples at once: one (B, N) @ (N, k)
    product gives every weighted sum, and each figure is computed from its sums.

    Args:
        rows: one system's RowScores (N rows).
        weights: (B, N) counts, from resample_weights; a row of ones gives the figures of
            the rows themselves (as score_systems computes them).

    Returns:
        INTERVAL_KEYS that `rows` has -> (B,) float64 (NaN where undefined), and
        "per_label_f1" -> (B, 14) (uncertain = negative, CHEXPERT_LABELS order).
    """
    columns, where = _columns(rows)  # (N, k)
    sums = np.asarray(weights, dtype=np.float64) @ columns  # (B, k)
    out: dict[str, np.ndarray] = {}
    for policy in UNCERTAIN_POLICIES:
        scores = f1_from_counts(*(sums[:, where[f"{c}_{policy}"]] for c in ("tp", "fp", "fn")))
        for summary in ("micro14", "macro14", "micro5", "macro5"):
            out[ce_key(summary, policy)] = scores[f"f1_{summary}"]
        if policy == "negative":
            out["per_label_f1"] = scores["per_label"]
    total = sums[:, where["rows"]][:, 0]  # (B,)
    with np.errstate(divide="ignore", invalid="ignore"):
        for key in rows.means:
            out[key] = sums[:, where[key]][:, 0] / total  # (B,)
        out["bleu4"] = bleu4_from_statistics(sums[:, where["bleu"]])  # (B, 10) -> (B,)
        if "fluency" in where:
            nll, tokens = sums[:, where["fluency"]].T  # (B,), (B,)
            out["fluency_ppl"] = np.where(tokens > 0, np.exp(nll / tokens), np.nan)
        known, sentences = sums[:, where["known"]].T  # (B,), (B,)
        out["known_sentences"] = np.where(sentences > 0, known / sentences, 0.0)
    return out


def percentile_interval(values: np.ndarray) -> list[float] | None:
    """[2.5th, 97.5th] percentile of the defined (non-NaN) values along axis 0; None when
    none is defined."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, CI_PERCENTILES)
    return [float(lo), float(hi)]


def intervals(rows: RowScores, samples: int, seed: int) -> dict[str, Any]:
    """The 95% percentile bootstrap interval of every quality figure of one system.

    Returns:
        {figure: [lo, hi] (None where undefined in every resample)} for the INTERVAL_KEYS
        the system has, and "per_label_f1": {label: [lo, hi]}.
    """
    figures = resampled_figures(rows, resample_weights(rows.units, samples, seed))
    per_label = figures.pop("per_label_f1")  # (B, 14)
    out: dict[str, Any] = {k: percentile_interval(v) for k, v in figures.items()}
    out["per_label_f1"] = {name: percentile_interval(per_label[:, j])
                           for j, name in enumerate(CHEXPERT_LABELS)}
    return out


def majority_intervals(rows: RowScores, positive: Sequence[bool], samples: int,
                       seed: int) -> dict[str, Any]:
    """intervals() of the majority-class baseline scored on `rows`' reference labels: each
    label predicted `positive[j]` for every image (uncertain = negative, as the baseline).

    Returns:
        {ce_f1_micro14, ce_f1_macro14, ce_f1_micro5, ce_f1_macro5: [lo, hi],
        "per_label_f1": {label: [lo, hi]}}.
    """
    reference = rows.reference["negative"]  # (N, 14)
    predicted = np.broadcast_to(np.asarray(positive, dtype=bool), reference.shape)  # (N, 14)
    weights = resample_weights(rows.units, samples, seed) * rows.labeled  # (B, N)
    scores = resampled_label_f1(predicted, reference, weights)
    out: dict[str, Any] = {f"ce_f1_{k}": percentile_interval(scores[f"f1_{k}"])
                           for k in ("micro14", "macro14", "micro5", "macro5")}
    out["per_label_f1"] = {name: percentile_interval(scores["per_label"][:, j])
                           for j, name in enumerate(CHEXPERT_LABELS)}
    return out


def _difference(point: float, resampled: np.ndarray) -> dict[str, Any]:
    defined = resampled[~np.isnan(resampled)]
    return {
        "diff": None if np.isnan(point) else float(point),
        "ci95": percentile_interval(resampled),
        "frac_le_0": float(np.mean(defined <= 0)) if defined.size else None,
    }


def paired_difference(rows: RowScores, base: RowScores, samples: int, seed: int
                      ) -> dict[str, Any]:
    """The paired bootstrap difference `rows` minus `base` of every quality figure.

    The two systems' rows are aligned by image id, on the images both scored (a row of one
    without a partner in the other, e.g. an error row there, is left out; an image id
    repeated within one system is aligned by its first row). Each resample draws the
    common units once and applies the same weights to both systems, so the difference
    varies only by what the systems do differently on the same images.

    Returns:
        {"num_images": common images, "num_units": their distinct units (studies or
        images), "figures": {figure: {"diff": point difference on the common images,
        "ci95": [lo, hi] percentile interval, "frac_le_0": share of resamples where the
        difference is <= 0}, "per_label_f1": {label: the same}}} for the figures both
        systems have; "figures" is empty without common images.
    """
    position = {}
    for i, image in enumerate(base.image_ids):
        position.setdefault(image, i)
    seen: set[str] = set()
    mine, theirs = [], []
    for i, image in enumerate(rows.image_ids):
        if image in position and image not in seen:
            seen.add(image)
            mine.append(i)
            theirs.append(position[image])
    out: dict[str, Any] = {"num_images": len(mine), "num_units": 0, "figures": {}}
    if not mine:
        return out
    a, b = rows.take(np.asarray(mine)), base.take(np.asarray(theirs))
    out["num_units"] = len(np.unique(a.units.astype(str)))
    weights = resample_weights(a.units, samples, seed)  # (B, n): one draw for both systems
    ones = np.ones((1, len(a)))  # (1, n): the point estimate
    fa, fb = resampled_figures(a, weights), resampled_figures(b, weights)
    pa, pb = resampled_figures(a, ones), resampled_figures(b, ones)
    figures: dict[str, Any] = {}
    for key in INTERVAL_KEYS:
        if key in fa and key in fb:
            figures[key] = _difference(pa[key][0] - pb[key][0], fa[key] - fb[key])
    delta = fa["per_label_f1"] - fb["per_label_f1"]  # (B, 14)
    point = pa["per_label_f1"][0] - pb["per_label_f1"][0]  # (14,)
    figures["per_label_f1"] = {name: _difference(point[j], delta[:, j])
                               for j, name in enumerate(CHEXPERT_LABELS)}
    out["figures"] = figures
    return out
