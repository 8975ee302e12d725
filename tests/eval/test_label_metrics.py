"""CheXpert label F1 against hand-computed values: TP / FP / FN, the uncertain policy, the
zero-division convention, the majority baseline, shard vectors and the table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from echo_ray.eval.label_metrics import (
    format_f1_table,
    label_f1,
    labels_from_vectors,
    majority_baseline,
)
from echo_ray.text.labeler import label_report, labels_to_vector
from echo_ray.text.labels import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN

P, N, U = POSITIVE, NEGATIVE, UNCERTAIN
CM, ED, EFF = "Cardiomegaly", "Edema", "Pleural Effusion"

# 4 studies; every label not listed is missing (not mentioned).
REFERENCE = [{CM: P, EFF: P}, {CM: P, ED: U}, {ED: P}, {EFF: N, CM: None}]
PREDICTED = [{CM: P, EFF: N}, {CM: N, ED: P}, {ED: U, EFF: P}, {CM: P}]


def test_label_f1_hand_computed_uncertain_negative():
    # Positives (U -> negative): ref CM {0,1}, ED {2}, EFF {0}; pred CM {0,3}, ED {1}, EFF {2}.
    # CM:  TP 1 (s0), FP 1 (s3), FN 1 (s1) -> P 1/2, R 1/2, F1 1/2, support 2
    # ED:  TP 0, FP 1 (s1), FN 1 (s2)      -> F1 0, support 1
    # EFF: TP 0, FP 1 (s2), FN 1 (s0)      -> F1 0, support 1
    # micro: TP 1, FP 3, FN 3 -> 2/(2+6) = 1/4 (the same over the 5 labels, which hold all 3)
    r = label_f1(PREDICTED, REFERENCE)
    cm = r["per_label"][CM]
    assert (cm["tp"], cm["fp"], cm["fn"], cm["support"]) == (1, 1, 1, 2)
    assert (cm["precision"], cm["recall"], cm["f1"]) == (0.5, 0.5, 0.5)
    assert r["per_label"][ED]["f1"] == 0.0 and r["per_label"][ED]["support"] == 1
    assert r["per_label"][EFF]["f1"] == 0.0 and r["per_label"][EFF]["support"] == 1
    assert r["f1_micro14"] == 0.25
    assert r["f1_micro5"] == 0.25
    assert r["f1_macro14"] == pytest.approx(0.5 / 14)
    assert r["f1_macro5"] == pytest.approx(0.5 / 5)
    assert r["num_studies"] == 4
    assert set(r["per_label"]) == set(CHEXPERT_LABELS)


def test_label_f1_uncertain_positive_changes_the_uncertain_labels_only():
    # U -> positive: ED ref {1,2}, pred {1,2} -> TP 2, F1 1. CM and EFF unchanged.
    # micro: TP 1+2+0 = 3, FP 1+0+1 = 2, FN 1+0+1 = 2 -> 6/(6+4) = 0.6
    neg = label_f1(PREDICTED, REFERENCE, uncertain="negative")
    pos = label_f1(PREDICTED, REFERENCE, uncertain="positive")
    ed = pos["per_label"][ED]
    assert (ed["tp"], ed["fp"], ed["fn"], ed["f1"]) == (2, 0, 0, 1.0)
    assert pos["per_label"][CM] == neg["per_label"][CM]
    assert pos["per_label"][EFF] == neg["per_label"][EFF]
    assert pos["f1_micro14"] == pytest.approx(0.6)
    assert pos["f1_macro14"] == pytest.approx(1.5 / 14)
    assert pos["f1_macro5"] == pytest.approx(1.5 / 5)


def test_micro_and_macro_differ_on_imbalanced_labels():
    # 10 studies with Cardiomegaly, all found; one Edema, missed.
    # micro5: TP 10, FP 0, FN 1 -> 20/21; macro5: (1 + 0 + 0 + 0 + 0) / 5 = 0.2
    reference = [{CM: P} for _ in range(10)]
    reference[0][ED] = P
    predicted = [{CM: P} for _ in range(10)]
    r = label_f1(predicted, reference)
    assert r["f1_micro5"] == pytest.approx(20 / 21)
    assert r["f1_macro5"] == pytest.approx(0.2)
    assert r["f1_micro14"] == pytest.approx(20 / 21)
    assert r["f1_macro14"] == pytest.approx(1 / 14)


def test_zero_division_is_zero():
    nothing = [{}, dict.fromkeys(CHEXPERT_LABELS)]  # no positives anywhere
    r = label_f1(nothing, nothing)
    assert all(s["f1"] == s["precision"] == s["recall"] == 0.0 for s in r["per_label"].values())
    assert r["f1_micro14"] == r["f1_macro14"] == r["f1_micro5"] == r["f1_macro5"] == 0.0

    # Predicted no positive: precision 0/0 -> 0. Reference no positive: recall 0/0 -> 0.
    missed = label_f1([{}], [{CM: P}])["per_label"][CM]
    assert (missed["precision"], missed["recall"], missed["f1"]) == (0.0, 0.0, 0.0)
    invented = label_f1([{CM: P}], [{}])["per_label"][CM]
    assert (invented["precision"], invented["recall"], invented["f1"]) == (0.0, 0.0, 0.0)
    # A perfect label among 4 silent competition labels: the silent ones count 0 in macro.
    assert label_f1([{CM: P}], [{CM: P}])["f1_macro5"] == pytest.approx(1 / 5)


def test_label_f1_rejects_bad_inputs():
    with pytest.raises(ValueError, match="3 studies but reference has 2"):
        label_f1([{}, {}, {}], [{}, {}])
    with pytest.raises(ValueError, match="empty"):
        label_f1([], [])
    with pytest.raises(ValueError, match="uncertain="):
        label_f1([{}], [{}], uncertain="ignore")
    with pytest.raises(ValueError, match="unknown label names"):
        label_f1([{"Cardiomegally": P}], [{}])
    with pytest.raises(ValueError, match="Edema = 2"):
        label_f1([{}], [{ED: 2}])
    with pytest.raises(TypeError, match="labels_from_vectors"):
        label_f1([{}], [labels_to_vector({CM: P})])


def test_majority_baseline_picks_the_training_majority():
    # Train (5 studies): CM positive in 3 (majority), EFF in 2 (minority), ED uncertain in 3.
    train = [{CM: P, EFF: P}, {CM: P, EFF: P, ED: U}, {CM: P, ED: U}, {ED: U}, {CM: N}]
    test = [{CM: P, EFF: P}, {ED: P}]
    r = majority_baseline(train, test)
    assert r["majority"][CM] and not r["majority"][EFF] and not r["majority"][ED]
    # CM predicted for both test studies: TP 1, FP 1, FN 0 -> P 1/2, R 1, F1 2/3.
    cm = r["per_label"][CM]
    assert (cm["tp"], cm["fp"], cm["fn"]) == (1, 1, 0)
    assert cm["f1"] == pytest.approx(2 / 3)
    # EFF and ED never predicted: F1 0 although the test set has positives.
    assert r["per_label"][EFF]["f1"] == r["per_label"][ED]["f1"] == 0.0
    # The same as scoring the constant prediction with label_f1.
    constant = [{CM: P}, {CM: P}]
    expected = label_f1(constant, test)
    assert {k: v for k, v in r.items() if k != "majority"} == expected

    # Uncertain as positive: ED is positive in 3 of 5 -> predicted; ED TP 1, FP 1 -> 2/3.
    r_pos = majority_baseline(train, test, uncertain="positive")
    assert r_pos["majority"][ED]
    assert r_pos["per_label"][ED]["f1"] == pytest.approx(2 / 3)


def test_majority_baseline_tie_is_negative_and_empty_train_raises():
    r = majority_baseline([{CM: P}, {}], [{CM: P}])  # 1 of 2: no strict majority
    assert not r["majority"][CM]
    assert r["per_label"][CM]["f1"] == 0.0
    with pytest.raises(ValueError, match="train_reference is empty"):
        majority_baseline([], [{CM: P}])


def test_labels_from_vectors_reads_shard_rows():
    labels = {CM: P, ED: U, EFF: N}
    vector = labels_to_vector(labels)
    assert labels_from_vectors([vector]) == [{**dict.fromkeys(CHEXPERT_LABELS), **labels}]
    # pandas turns null into NaN; floats may be float32 values.
    nan_vector = [math.nan if v is None else v for v in vector]
    assert labels_from_vectors([nan_vector]) == labels_from_vectors([vector])
    assert labels_from_vectors([np.array(nan_vector, dtype=np.float32)]) == labels_from_vectors(
        [vector]
    )
    # Shard rows score like the label dicts they came from.
    rows = [labels_to_vector(r) for r in REFERENCE]
    assert label_f1(PREDICTED, labels_from_vectors(rows)) == label_f1(PREDICTED, REFERENCE)

    with pytest.raises(ValueError, match="study 1 has no label vector"):
        labels_from_vectors([vector, None])
    with pytest.raises(ValueError, match="5 entries, expected 14"):
        labels_from_vectors([[0.0] * 5])
    with pytest.raises(ValueError, match="No Finding = 0.5"):
        labels_from_vectors([[0.5] + [None] * 13])


def test_label_report_output_scores_perfectly_against_itself():
    text = "Moderate cardiomegaly. Small left pleural effusion. No pneumothorax."
    labels = label_report(text)
    r = label_f1([labels], [labels])
    assert r["per_label"][CM]["f1"] == r["per_label"][EFF]["f1"] == 1.0
    assert r["f1_micro14"] == 1.0


def test_format_f1_table_lists_systems_labels_and_summaries():
    results = {
        "majority": majority_baseline(REFERENCE, REFERENCE),
        "ar": label_f1(PREDICTED, REFERENCE),
        "rad": label_f1(REFERENCE, REFERENCE),
    }
    table = format_f1_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["label", "majority", "ar", "rad"]
    assert len({len(line) for line in lines}) == 1  # fixed width
    for name in CHEXPERT_LABELS:
        assert any(line.startswith(name) for line in lines)
    cm_row = next(line for line in lines if line.startswith(CM))
    # majority: CM positive in 2 of 4 train studies (a tie) -> 0; ar 0.5; rad (perfect) 1.
    assert cm_row.split()[-3:] == ["0.000", "0.500", "1.000"]
    micro_row = next(line for line in lines if line.startswith("micro F1 (14)"))
    assert micro_row.split()[-2:] == ["0.250", "1.000"]
    for title in ("macro F1 (14)", "micro F1 (5)", "macro F1 (5)"):
        assert any(line.startswith(title) for line in lines)

    with pytest.raises(ValueError, match="results is empty"):
        format_f1_table({})
    with pytest.raises(ValueError, match="lacks"):
        format_f1_table({"ar": {"f1_micro14": 0.1}})
