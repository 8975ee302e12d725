"""The CheXpert-style labeler on MIMIC-CXR-style radiologist language (snippets written for
these tests)."""

from __future__ import annotations

import pytest
from helpers.report_cases import LABEL_CASES, RADIOLOGIST_CASES, expected

from echo_ray.text.labeler import label_report, labels_to_vector
from echo_ray.text.labels import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN

P, N, U = POSITIVE, NEGATIVE, UNCERTAIN


@pytest.mark.parametrize("text, want", LABEL_CASES, ids=[t[:40] for t, _ in LABEL_CASES])
def test_label_report_on_radiologist_language(text, want):
    assert label_report(text) == want


@pytest.mark.parametrize(
    "text, want",
    [(text, want) for _, text, want in RADIOLOGIST_CASES],
    ids=[f"{category}: {text[:40]}" for category, text, _ in RADIOLOGIST_CASES],
)
def test_label_report_follows_chexpert_rules_on_radiologist_sentences(text, want):
    assert label_report(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("Right upper lobe pneumonia.", expected(PN=P)),
        ("Moderate cardiomegaly.", expected(CM=P)),
        ("Heart size is borderline enlarged.", expected(CM=U)),
    ],
)
def test_without_hierarchy_children_leave_parents_blank(text, want):
    assert label_report(text, hierarchy=False) == want


def test_hierarchy_fills_only_unmentioned_parents():
    # Positive child fills a blank parent ...
    assert label_report("Right upper lobe pneumonia.")["Lung Opacity"] == P
    # ... but never overrides an explicit one, even a negative one.
    labels = label_report("No focal opacity. Mild bibasilar atelectasis.")
    assert labels["Lung Opacity"] == N and labels["Atelectasis"] == P
    labels = label_report("Moderate cardiomegaly. The mediastinum is not widened.")
    assert labels["Enlarged Cardiomediastinum"] == N and labels["Cardiomegaly"] == P
    # Uncertain child, blank parent -> uncertain parent; children never copy parents.
    assert label_report("Possible pneumonia.")["Lung Opacity"] == U
    assert label_report("Patchy opacity at the right base.")["Pneumonia"] is None


def test_mentions_combine_positive_over_uncertain_over_negative():
    text = "No effusion on the right. Possible small left effusion. Small left effusion."
    assert label_report(text)["Pleural Effusion"] == P
    assert label_report("No pneumonia. Pneumonia cannot be excluded.")["Pneumonia"] == U


def test_support_devices_do_not_block_no_finding_but_findings_do():
    assert label_report("PICC line tip in the SVC. Lungs are clear.")["No Finding"] == P
    assert label_report("PICC line tip in the SVC. Small left effusion.")["No Finding"] is None
    assert label_report("Possible small left effusion.")["No Finding"] is None


def test_labeler_reads_findings_and_impression_not_indication():
    report = (
        "INDICATION: ___M with fever, evaluate for pneumonia.\n\n"
        "FINDINGS: The lungs are clear. No pleural effusion.\n\n"
        "IMPRESSION: No acute cardiopulmonary process."
    )
    labels = label_report(report)
    assert labels["Pneumonia"] == N  # implied by "no acute process", not the indication
    assert labels["No Finding"] == P


def test_labels_to_vector_orders_and_validates():
    labels = label_report("Moderate cardiomegaly. Small left effusion.")
    vector = labels_to_vector(labels)
    assert len(vector) == 14 and vector[CHEXPERT_LABELS.index("Cardiomegaly")] == P
    assert labels_to_vector({"Edema": U})[CHEXPERT_LABELS.index("Edema")] == U
    with pytest.raises(ValueError, match="Cardiomegally"):
        labels_to_vector({"Cardiomegally": P})


# ---------------------------------------------------------------------------------------
# Labeler: common phrasing variants (negation, uncertainty, normal statements, both sides)
# ---------------------------------------------------------------------------------------

PHRASING_CASES: list[tuple[str, dict[str, float | None]]] = [
    # Negation cues: "no", "without", "negative for", "no evidence of".
    ("No pleural effusion.", expected(NF=P, EFF=N)),
    ("Without evidence of pneumothorax.", expected(NF=P, PTX=N)),
    ("Lungs are well expanded without pneumothorax.", expected(NF=P, PTX=N)),
    ("Negative for consolidation.", expected(NF=P, CO=N)),
    ("The radiograph is negative for acute fracture.", expected(NF=P, FX=N)),
    ("There is no evidence of pneumothorax.", expected(NF=P, PTX=N)),
    # Uncertainty: hedges before and after the mention; "cannot exclude" is not a negation.
    # An uncertain finding blocks No Finding; a hedged child makes a blank parent uncertain.
    ("Possible small left effusion.", expected(EFF=U)),
    ("Cannot exclude pneumonia.", expected(LO=U, PN=U)),
    ("Pneumonia is possible.", expected(LO=U, PN=U)),
    # The opacity is asserted, only its cause is hedged.
    ("Bibasilar opacities may represent atelectasis.", expected(LO=P, AT=U)),
    ("Retrocardiac opacity could be atelectasis.", expected(LO=P, AT=U)),
    # Normal statements: clear lungs rule out airspace / interstitial disease but promise
    # nothing about the pleura or atelectasis; a normal heart size says nothing of the
    # mediastinum; a normal radiograph is No Finding without naming any label.
    ("The lungs are clear.", expected(NF=P, LO=N, ED=N, CO=N, PN=N)),
    ("Clear lungs.", expected(NF=P, LO=N, ED=N, CO=N, PN=N)),
    ("Heart size is normal.", expected(NF=P, CM=N)),
    ("Normal heart size.", expected(NF=P, CM=N)),
    ("Normal chest radiograph.", expected(NF=P)),
    # Both sides: an effusion on one side is a positive, whatever the other side says.
    ("Bilateral pleural effusions.", expected(EFF=P)),
    ("Right and left pleural effusions.", expected(EFF=P)),
    ("Left effusion; no right effusion.", expected(EFF=P)),
    ("No right effusion. Small left effusion.", expected(EFF=P)),
    ("Small left pleural effusion but no right effusion.", expected(EFF=P)),
    ("No effusion on the right, small effusion on the left.", expected(EFF=P)),
    # A comma before a severity word opens an asserted finding, not a negated list item ...
    ("No pneumothorax, small left effusion.", expected(PTX=N, EFF=P)),
    ("No edema, mild cardiomegaly.", expected(ECM=P, CM=P, ED=N)),
    ("Possible pneumonia, small effusion.", expected(LO=U, PN=U, EFF=P)),
    # ... but "large" and "moderate or large" stay in a negated list, and a trailing
    # "stable" is still the heart's attribute (uncertain, as CheXpert).
    ("No focal consolidation, large effusion or pneumothorax.", expected(NF=P, CO=N, PTX=N, EFF=N)),
    ("No pneumothorax, moderate or large effusion.", expected(NF=P, PTX=N, EFF=N)),
    ("Heart size, stable.", expected(ECM=U, CM=U)),
]


@pytest.mark.parametrize("text, want", PHRASING_CASES, ids=[t[:40] for t, _ in PHRASING_CASES])
def test_label_report_on_phrasing_variants(text, want):
    assert label_report(text) == want


def test_deidentification_marks_neither_split_nor_join_words():
    # "XXXX" and "___" are opaque tokens, glued to a word or not.
    assert label_report("___pneumothorax is unchanged.")["Pneumothorax"] == P
    assert label_report("No XXXX pneumothorax.")["Pneumothorax"] == N
    assert label_report("Dr. ___ was paged. Small left effusion.")["Pleural Effusion"] == P


def test_no_new_is_uncertain_but_no_evidence_of_new_is_negative():
    # CheXpert's pre-negation uncertainty: "no new X" leaves an old X possible; "no
    # evidence of new X" is the negation rule "no evidence of X".
    assert label_report("No new pleural effusion.")["Pleural Effusion"] == U
    assert label_report("No evidence of new pleural effusion.")["Pleural Effusion"] == N


def test_heart_failure_makes_cardiomegaly_uncertain_unless_negated():
    assert label_report("CHF.")["Cardiomegaly"] == U
    assert label_report("Heart size is enlarged, consistent with CHF.")["Cardiomegaly"] == P
    assert label_report("No evidence of CHF.")["Cardiomegaly"] is None
