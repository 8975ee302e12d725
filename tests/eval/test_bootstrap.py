"""Bootstrap intervals and paired differences (eval.bootstrap, through score_systems and the
outputs): synthetic report rows, no Ray, no model."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from echo_ray.config.schema import ConfigError, EchoConfig, EvaluateConfig
from echo_ray.eval.bootstrap import (
    INTERVAL_KEYS,
    RowScores,
    intervals,
    paired_difference,
    resample_weights,
    resampled_figures,
)
from echo_ray.eval.label_metrics import (
    UNCERTAIN_POLICIES,
    label_f1,
    positive_matrix,
    resampled_label_f1,
)
from echo_ray.eval.scoring import PAIRED_KEY, RESULT_KEYS, TrainingReference, score_systems
from echo_ray.eval.systems import System
from echo_ray.eval.tables import (
    RESULTS_FILE,
    RUN_FILE,
    TABLE_FILE,
    format_results_table,
    write_outputs,
)
from echo_ray.eval.text_metrics import bleu4, bleu4_from_statistics, bleu_statistics
from echo_ray.text.labeler import label_report, labels_to_vector
from echo_ray.text.labels import CHEXPERT_LABELS

REPORTS = (
    "FINDINGS: Heart size is normal. No pleural effusion. IMPRESSION: No acute "
    "cardiopulmonary process.",
    "FINDINGS: The heart is enlarged. There is a small left pleural effusion. IMPRESSION: "
    "Cardiomegaly with small effusion.",
    "FINDINGS: A pacemaker is in place. Lungs are clear. IMPRESSION: No acute process.",
    "FINDINGS: Right lower lobe consolidation. IMPRESSION: Pneumonia.",
    "FINDINGS: The heart is enlarged. A pacemaker is in place. IMPRESSION: Cardiomegaly.",
)
TRAIN = TrainingReference(sentences={"lungs are clear."},
                          labels=[label_report(REPORTS[0]), label_report(REPORTS[0]),
                                  label_report(REPORTS[1])])


def _options(**kw) -> EvaluateConfig:
    # An encoder that is not there: SemScore is skipped (no model to load in unit tests).
    return EvaluateConfig(semscore_model="no-such-org/no-such-encoder", ratescore=False, **kw)


def report_rows(num_images: int, seed: int, *, correct: float) -> list[dict]:
    """Rows as evaluate's actors write them: two images per study (one reference report),
    each generated report the reference with probability `correct`, else another one."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        reference = REPORTS[(i // 2 * 7 + seed) % len(REPORTS)]
        report = reference if rng.random() < correct else REPORTS[rng.integers(len(REPORTS))]
        rows.append({
            "dicom_id": f"d{i:04d}", "study_id": f"s{i // 2:04d}", "reference": reference,
            "reference_labels": None, "report": report,
            "labels": labels_to_vector(label_report(report)), "num_tokens": 20,
            "batch_id": f"b{i // 4}", "batch_forwards": 20, "batch_tokens_per_forward": 1.0,
            "batch_latency_ms": 80.0, "fluency_nll": float(rng.uniform(5, 30)),
            "fluency_tokens": 20, "error": None,
        })
    return rows


def _score(systems: dict[str, list[dict]], options: EvaluateConfig):
    tables = {name: pa.Table.from_pylist(rows) for name, rows in systems.items()}
    return score_systems([System(n, "unused", "ar") for n in systems], tables, options, TRAIN)


def synthetic_scores(num_images: int, seed: int) -> RowScores:
    """RowScores of random labels and per-report scores, one image per study."""
    rng = np.random.default_rng(seed)
    ref = rng.random((num_images, 14)) < 0.3  # (N, 14)
    pred = ref ^ (rng.random((num_images, 14)) < 0.2)  # (N, 14): 20% of the calls wrong
    return _row_scores(pred, ref, rng.uniform(0.2, 0.9, num_images))


def _row_scores(pred: np.ndarray, ref: np.ndarray, rouge: np.ndarray) -> RowScores:
    n = len(rouge)
    totals = np.array([10, 9, 8, 7], dtype=np.float64)
    correct = np.floor(rouge[:, None] * totals)  # (N, 4)
    bleu = np.column_stack([np.full(n, 10.0), np.full(n, 10.0), correct,
                            np.tile(totals, (n, 1))])  # (N, 10)
    ids = np.array([f"d{i:05d}" for i in range(n)])
    return RowScores(
        image_ids=ids, units=ids, predicted=dict.fromkeys(UNCERTAIN_POLICIES, pred),
        reference=dict.fromkeys(UNCERTAIN_POLICIES, ref), labeled=np.ones(n, dtype=bool),
        means={"rouge_l": rouge}, bleu=bleu,
        fluency=np.column_stack([20 * (1 - rouge), np.full(n, 10.0)]),
        known=np.column_stack([np.ones(n), np.full(n, 2.0)]),
    )


def _width(interval: list[float]) -> float:
    return interval[1] - interval[0]


# --- the resampled figures are the figures ---------------------------------------------------


def test_unit_weights_give_label_f1_and_corpus_bleu_exactly():
    rng = np.random.default_rng(3)
    values = (1.0, 0.0, -1.0, None)
    predicted = [{k: values[rng.integers(4)] for k in CHEXPERT_LABELS} for _ in range(60)]
    reference = [{k: values[rng.integers(4)] for k in CHEXPERT_LABELS} for _ in range(60)]
    for policy in UNCERTAIN_POLICIES:
        expected = label_f1(predicted, reference, uncertain=policy)
        got = resampled_label_f1(positive_matrix(predicted, uncertain=policy),
                                 positive_matrix(reference, uncertain=policy), np.ones((1, 60)))
        for key in ("f1_micro14", "f1_macro14", "f1_micro5", "f1_macro5"):
            assert got[key][0] == pytest.approx(expected[key], abs=1e-12)
        assert got["per_label"][0] == pytest.approx(
            [expected["per_label"][k]["f1"] for k in CHEXPERT_LABELS], abs=1e-12)
    generated = [REPORTS[i % 5] for i in range(7)] + ["x"]
    references = [REPORTS[(i + 1) % 5] for i in range(7)] + ["no findings today"]
    stats = bleu_statistics(generated, references)  # (8, 10)
    assert bleu4_from_statistics(stats.sum(0)) == pytest.approx(bleu4(generated, references),
                                                                abs=1e-12)
    assert bleu4_from_statistics(stats[-1]) == pytest.approx(bleu4(generated[-1:],
                                                                   references[-1:]), abs=1e-12)


def test_resample_weights_draw_whole_units_and_ignore_row_order():
    units = np.array(["s2", "s1", "s2", "s3", "s1"])
    weights = resample_weights(units, 200, seed=4)  # (200, 5)
    assert weights.shape == (200, 5)
    assert (weights[:, 0] == weights[:, 2]).all() and (weights[:, 1] == weights[:, 4]).all()
    # Three studies drawn per resample: 3 study draws of 2, 2 and 1 images.
    per_study = weights[:, [0, 1, 3]]  # (200, 3)
    assert (per_study.sum(1) == 3).all()
    shuffled = resample_weights(units[[4, 3, 2, 1, 0]], 200, seed=4)
    assert np.array_equal(shuffled[:, [4, 3, 2, 1, 0]], weights)


# --- intervals -------------------------------------------------------------------------------


def test_every_quality_figure_has_an_interval_around_its_value():
    results, notes, baseline = _score({"a": report_rows(120, 0, correct=0.6)},
                                      _options(bootstrap_samples=500))
    figures = results["a"]
    assert figures["num_reports"] == 120 and figures["num_studies"] == 60
    expected = set(INTERVAL_KEYS) - {"semscore", "ratescore"}  # skipped here
    assert set(k for k, v in figures["ci95"].items() if v is not None) - {"per_label_f1"} == \
        expected
    for key in expected:
        lo, hi = figures["ci95"][key]
        assert lo <= figures[key] <= hi, (key, lo, figures[key], hi)
        assert lo < hi, key  # 60 studies of mixed quality: the figures vary
    for label, interval in figures["ci95"]["per_label_f1"].items():
        assert interval[0] <= figures["per_label_f1"][label] <= interval[1], label
    for key in ("ce_f1_micro14", "ce_f1_macro14", "ce_f1_micro5", "ce_f1_macro5"):
        lo, hi = baseline["ci95"][key]
        assert lo <= baseline[key] <= hi, key
    assert "500 resamples of the studies" in notes["ci95"]
    assert "speed figures have none" in notes["ci95"]
    for key in ("tokens_per_s", "ms_per_report", "tokens_per_forward", "forwards_per_report"):
        assert key not in figures["ci95"]


def test_a_perfect_system_has_a_degenerate_interval_at_one():
    rows = report_rows(60, 1, correct=1.0)
    assert all(r["report"] == r["reference"] for r in rows)
    figures = _score({"oracle": rows}, _options())[0]["oracle"]
    for key in ("ce_f1_micro14", "ce_f1_micro5", "ce_f1_micro14_uncertain_positive",
                "rouge_l", "bleu4"):
        assert figures[key] == pytest.approx(1.0)
        assert figures["ci95"][key] == pytest.approx([1.0, 1.0]), key


def test_intervals_narrow_as_the_number_of_images_grows():
    small = intervals(synthetic_scores(50, seed=5), 1000, seed=0)
    large = intervals(synthetic_scores(1000, seed=5), 1000, seed=0)
    for key in ("ce_f1_micro14", "ce_f1_macro14", "rouge_l", "bleu4", "fluency_ppl"):
        assert _width(large[key]) < _width(small[key]) / 2, key


def test_the_same_seed_gives_the_same_intervals():
    rows = {"a": report_rows(80, 2, correct=0.5)}
    first = _score(rows, _options(bootstrap_seed=7))[0]["a"]["ci95"]
    again = _score(rows, _options(bootstrap_seed=7))[0]["a"]["ci95"]
    other = _score(rows, _options(bootstrap_seed=8))[0]["a"]["ci95"]
    assert first == again
    assert first != other


def test_no_resamples_no_intervals_and_the_same_figures():
    rows = {"a": report_rows(40, 3, correct=0.5), "b": report_rows(40, 3, correct=0.8)}
    with_ci = _score(rows, _options())[0]
    without = _score(rows, _options(bootstrap_samples=0))[0]
    for name in rows:
        assert without[name]["ci95"] is None and with_ci[name]["ci95"] is not None
        assert {k: v for k, v in with_ci[name].items() if k != "ci95"} == \
            {k: v for k, v in without[name].items() if k != "ci95"}


# --- paired differences ----------------------------------------------------------------------


def test_a_system_minus_itself_is_exactly_zero():
    rows = report_rows(60, 4, correct=0.5)
    results = _score({"a": rows, "copy": [dict(r) for r in rows]},
                     _options(compare_to="a"))[0]
    assert PAIRED_KEY not in results["a"]
    paired = results["copy"][PAIRED_KEY]
    assert paired["vs"] == "a" and paired["num_images"] == 60 and paired["num_units"] == 30
    figures = paired["figures"]
    assert set(figures) == set(INTERVAL_KEYS) - {"semscore", "ratescore"} | {"per_label_f1"}
    for key in set(figures) - {"per_label_f1"}:
        assert figures[key] == {"diff": 0.0, "ci95": [0.0, 0.0], "frac_le_0": 1.0}, key
    for label, difference in figures["per_label_f1"].items():
        assert difference == {"diff": 0.0, "ci95": [0.0, 0.0], "frac_le_0": 1.0}, label


def test_the_paired_interval_is_narrower_than_independent_resampling():
    """Two systems that differ on a few images: image difficulty moves both together, so
    resampling the same images for both cancels it; resampling them independently does
    not."""
    rng = np.random.default_rng(6)
    a = synthetic_scores(200, seed=6)
    better = rng.random(200) < 0.1  # B fixes 10% of A's images
    pred_b = np.where(better[:, None], a.reference["negative"], a.predicted["negative"])
    b = _row_scores(pred_b, a.reference["negative"],
                    np.where(better, np.minimum(a.means["rouge_l"] + 0.2, 1.0),
                             a.means["rouge_l"]))
    paired = paired_difference(b, a, 1000, seed=0)["figures"]
    # Independent resampling: each system's own draw of the images.
    fb = resampled_figures(b, resample_weights(b.units, 1000, seed=1))
    fa = resampled_figures(a, resample_weights(a.units, 1000, seed=2))
    for key in ("ce_f1_micro14", "ce_f1_macro14", "rouge_l", "bleu4"):
        unpaired = np.percentile(fb[key] - fa[key], [2.5, 97.5])
        assert paired[key]["diff"] > 0, key
        assert _width(paired[key]["ci95"]) < _width(unpaired) / 2, key
        assert paired[key]["ci95"][0] > 0  # B is reliably better: the interval excludes 0
        assert paired[key]["frac_le_0"] == 0.0


def test_paired_differences_are_on_the_images_both_systems_scored():
    """An error row of one system, and rows in another order: aligned by image id."""
    rows_a = report_rows(40, 5, correct=0.5)
    rows_b = [dict(r) for r in reversed(rows_a)]
    broken = next(r for r in rows_b if r["dicom_id"] == "d0007")
    broken.update(error="not_dicom", report=None, labels=None, batch_id=None,
                  fluency_nll=None, fluency_tokens=None)
    results = _score({"a": rows_a, "b": rows_b}, _options(compare_to="b"))[0]
    assert results["b"]["num_reports"] == 39 and results["b"]["num_errors"] == 1
    paired = results["a"][PAIRED_KEY]
    assert paired["vs"] == "b" and paired["num_images"] == 39 and paired["num_units"] == 20
    # The same reports on the 39 common images, whatever the row order: no difference.
    assert paired["figures"]["ce_f1_micro14"] == {"diff": 0.0, "ci95": [0.0, 0.0],
                                                  "frac_le_0": 1.0}


def test_compare_to_an_unknown_system_is_a_clear_error():
    rows = {"ar": report_rows(10, 0, correct=0.5), "teacher": report_rows(10, 0, correct=0.5)}
    with pytest.raises(ConfigError, match=r"compare_to 'student'.*\['ar', 'teacher'\]"):
        _score(rows, _options(compare_to="student"))
    with pytest.raises(ConfigError, match="bootstrap_samples above 0"):
        EchoConfig(evaluate=EvaluateConfig(compare_to="ar", bootstrap_samples=0)).validate()


def test_evaluate_refuses_an_unknown_compare_to_before_any_work(tmp_path):
    from echo_ray.eval.job import evaluate

    config = EchoConfig(evaluate=EvaluateConfig(compare_to="teacher"))
    with pytest.raises(ConfigError, match="compare_to 'teacher'.*--compare-to"):
        evaluate(str(tmp_path / "no-shards"), str(tmp_path / "out"),
                 ["ar=/no/model:ar"], config)
    assert not (tmp_path / "out").exists()


# --- outputs ---------------------------------------------------------------------------------


def test_results_json_and_md_carry_intervals_and_paired_differences(tmp_path):
    from echo_ray.eval.job import options_record

    systems = {"ar": report_rows(40, 7, correct=0.4), "teacher": report_rows(40, 7, correct=0.7)}
    options = _options(compare_to="teacher")
    results, notes, baseline = _score(systems, options)
    config = EchoConfig(evaluate=options)
    run = {"data": "synthetic", "split": "test", "notes": notes, "majority_baseline": baseline,
           "systems": {n: {"path": "unused", "mode": "ar"} for n in systems},
           "options": options_record(config)}
    tables = {n: pa.Table.from_pylist(rows) for n, rows in systems.items()}
    from echo_ray.data.storage import resolve

    write_outputs(resolve(str(tmp_path)), results, tables, run)
    on_disk = json.loads((tmp_path / RESULTS_FILE).read_text())
    for name, figures in on_disk.items():
        assert not [k for k in RESULT_KEYS if k not in figures]
        assert set(figures["ci95"]["per_label_f1"]) == set(CHEXPERT_LABELS)
        assert len(figures["ci95"]["ce_f1_micro14"]) == 2
    paired = on_disk["ar"][PAIRED_KEY]
    assert paired["vs"] == "teacher" and set(paired["figures"]["bleu4"]) == {
        "diff", "ci95", "frac_le_0"}
    assert PAIRED_KEY not in on_disk["teacher"]
    run_json = json.loads((tmp_path / RUN_FILE).read_text())
    assert run_json["options"]["compare_to"] == "teacher"
    assert run_json["options"]["bootstrap_samples"] == 1000
    assert len(run_json["majority_baseline"]["ci95"]["ce_f1_micro14"]) == 2

    markdown = (tmp_path / TABLE_FILE).read_text()
    assert markdown.startswith("# echo-ray evaluation")
    assert format_results_table(results, baseline) in markdown  # the table, unchanged
    lo, hi = on_disk["ar"]["ci95"]["ce_f1_micro14"]
    assert f"| CE F1 mi14 | {on_disk['ar']['ce_f1_micro14']:.3f} [{lo:.3f}, {hi:.3f}] |" in \
        markdown
    assert "Per-label CE F1 (uncertain = negative) with 95% bootstrap intervals" in markdown
    assert "| Pleural Effusion |" in markdown
    assert "Paired bootstrap difference ar - teacher on the 40 images" in markdown
    assert "| figure | ar - teacher | 95% interval | P(diff <= 0) |" in markdown


# The results table of a fixed set of figures, as format_results_table printed it before
# intervals existed: the quickstart prints this table and the README quotes it digit for
# digit, so intervals must not change it.
_FIXED_FIGURES = {
    "mode": "ar", "num_reports": 234, "ce_f1_micro14": 0.32412, "ce_f1_macro14": 0.1102,
    "ce_f1_micro5": 0.2871, "ce_f1_micro14_uncertain_positive": 0.331, "semscore": 0.8123,
    "rouge_l": 0.4432, "bleu4": 0.2011, "fluency_ppl": 1.834, "ratescore": None,
    "known_sentences": 0.9713, "tokens_per_forward": 1.0, "tokens_per_s": 412.3,
    "ms_per_report": 121.44, "forwards_per_report": 48.2,
}
_FIXED_TABLE = (
    "| system | decoding | reports | CE F1 mi14 | CE F1 ma14 | CE F1 mi5 | mi14 (u=1) | "
    "SemScore | ROUGE-L | BLEU-4 | fluency PPL | RaTEScore | known sent. | tok/fwd | tok/s | "
    "ms/report | fwd/report |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    "| ar | ar | 234 | 0.324 | 0.110 | 0.287 | 0.331 | 0.812 | 0.443 | 0.201 | 1.83 | n/a | "
    "97.1% | 1.00 | 412 | 121.4 | 48.2 |\n"
    "| majority (train) | - | n/a | 0.250 | 0.071 | 0.300 | n/a | n/a | n/a | n/a | n/a | n/a | "
    "n/a | n/a | n/a | n/a | n/a |"
)


def test_the_printed_results_table_is_unchanged_by_intervals():
    baseline = {"ce_f1_micro14": 0.25, "ce_f1_macro14": 0.0714, "ce_f1_micro5": 0.3,
                "ce_f1_macro5": 0.1, "per_label_f1": {}, "positive_labels": []}
    assert format_results_table({"ar": _FIXED_FIGURES}, baseline) == _FIXED_TABLE
    with_ci = {**_FIXED_FIGURES, "num_studies": 173,
               "ci95": {"ce_f1_micro14": [0.29, 0.36], "per_label_f1": {}},
               PAIRED_KEY: {"vs": "teacher", "num_images": 234, "num_units": 173,
                            "figures": {}}}
    baseline_ci = {**baseline, "ci95": {"ce_f1_micro14": [0.2, 0.3], "per_label_f1": {}}}
    assert format_results_table({"ar": with_ci}, baseline_ci) == _FIXED_TABLE


def test_scored_figures_print_the_same_table_with_and_without_intervals():
    rows = {"ar": report_rows(60, 8, correct=0.5), "teacher": report_rows(60, 8, correct=0.6)}
    plain, _, base_plain = _score(rows, _options(bootstrap_samples=0))
    full, _, base_full = _score(rows, _options(compare_to="ar"))
    assert format_results_table(full, base_full) == format_results_table(plain, base_plain)
