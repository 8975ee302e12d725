"""MIMIC-CXR section parsing, the findings text of a report and sentence splitting."""

from __future__ import annotations

import pytest
from helpers.report_cases import MIMIC_REPORT

from echo_ray.text.sections import findings_text, parse_sections, split_sentences


def test_parse_sections_mimic_report():
    sections = parse_sections(MIMIC_REPORT)
    assert list(sections) == [
        "wet_read",
        "examination",
        "indication",
        "comparison",
        "findings",
        "impression",
        "recommendations",
        "addendum",
    ]
    assert "final report" not in " ".join(sections).lower()
    assert sections["wet_read"].endswith("No pneumothorax.")  # separator line dropped
    assert sections["indication"] == "___ year old man with dyspnea  // ? effusion"
    assert sections["findings"].startswith("Heart size is mildly enlarged.")
    assert "rib fracture" not in sections["findings"]
    # Both addenda are kept, in order, under one key and never merged into the findings.
    assert sections["addendum"] == (
        "On review, there is also a healed right rib fracture.\n\n"
        "The PICC line was not included on the image."
    )
    assert split_sentences(sections["impression"]) == [
        "Small left pleural effusion with adjacent atelectasis.",
        "Mild cardiomegaly.",
    ]


@pytest.mark.parametrize(
    "text, want",
    [
        (
            "FINDINGS: Lungs are clear. IMPRESSION: Normal chest.",
            {"findings": "Lungs are clear.", "impression": "Normal chest."},
        ),
        (
            "Findings:\nLungs clear.\n\nImpression\nNo acute process.",
            {"findings": "Lungs clear.", "impression": "No acute process."},
        ),
        (
            "findings: lungs clear.\nconclusion: no acute process.",
            {"findings": "lungs clear.", "impression": "no acute process."},
        ),
        (
            "REASON FOR EXAMINATION: cough.\nCLINICAL HISTORY: ___.\n"
            "FINDINGS AND IMPRESSION: Clear.",
            {"indication": "cough.", "history": "___.", "impression": "Clear."},
        ),
        (
            "CHEST, PA AND LATERAL:\nHeart normal.\nIMPRESSION: Normal.",
            {"findings": "Heart normal.", "impression": "Normal."},
        ),
        (
            "EXAM: Chest.\nFINDINGS:\n\nIMPRESSION: No pneumothorax.",
            {"examination": "Chest.", "impression": "No pneumothorax."},
        ),
        (
            "Heart size normal. The patient has a history: unknown.",
            {"full_report": "Heart size normal. The patient has a history: unknown."},
        ),
        ("", {}),
    ],
)
def test_parse_sections_header_variants(text, want):
    assert parse_sections(text) == want


def test_findings_text_falls_back_to_impression_then_text():
    assert findings_text("FINDINGS: A. IMPRESSION: B.") == "A."
    assert findings_text("INDICATION: cough.\nIMPRESSION: Clear lungs.") == "Clear lungs."
    assert findings_text("Heart size is normal.") == "Heart size is normal."
    # Only administrative sections: their text is all there is.
    assert findings_text("INDICATION: cough.\n\nHeart normal.") == "cough.\n\nHeart normal."
    assert findings_text("COMPARISON: ___.\nNOTE: Lungs are clear.") == "Lungs are clear."


@pytest.mark.parametrize(
    "text, want",
    [
        (
            "Findings were discussed with Dr. ___ at 3 pm. A 1.5 cm nodule is seen.",
            ["Findings were discussed with Dr. ___ at 3 pm.", "A 1.5 cm nodule is seen."],
        ),
        (
            "1. Small left effusion. 2. No pneumothorax.",
            ["Small left effusion.", "No pneumothorax."],
        ),
        (
            "1.  Small left effusion\n2.  No pneumothorax\n3.  Stable moderate\ncardiomegaly",
            ["Small left effusion", "No pneumothorax", "Stable moderate cardiomegaly"],
        ),
        (
            "There is a small left pleural effusion with\nadjacent atelectasis.  No pneumothorax.",
            [
                "There is a small left pleural effusion with adjacent atelectasis.",
                "No pneumothorax.",
            ],
        ),
        (
            "Atelectasis vs. pneumonia. Clinical correlation, e.g. fever?",
            ["Atelectasis vs. pneumonia.", "Clinical correlation, e.g. fever?"],
        ),
        ("Heart normal.\n\nLungs clear", ["Heart normal.", "Lungs clear"]),
        ("1) effusion 2) pneumothorax", ["effusion", "pneumothorax"]),
        ("Dr. ___. ___. No effusion.", ["Dr. ___.", "No effusion."]),
        ("  \n ", []),
    ],
)
def test_split_sentences(text, want):
    assert split_sentences(text) == want


def test_sentence_spans_locate_each_sentence_in_its_section():
    from echo_ray.text.sections import sentence_spans

    text = ("FINDINGS: Heart size is normal.  There is a small\nleft effusion.\n"
            "IMPRESSION: 1. Small effusion. 2. No pneumothorax.")
    spans = sentence_spans(text)
    assert [(k, s) for k, s, _, _ in spans] == [
        ("findings", "Heart size is normal."),
        ("findings", "There is a small left effusion."),
        ("impression", "Small effusion."),
        ("impression", "No pneumothorax."),
    ]
    assert text[spans[1][2] : spans[1][3]] == "There is a small\nleft effusion."
    assert all(" ".join(text[a:b].split()) == s for _, s, a, b in spans)
    # no header: the report is its findings; nothing gives nothing
    assert [k for k, *_ in sentence_spans("Lungs clear. No effusion.")] == ["findings"] * 2
    assert sentence_spans("") == []
