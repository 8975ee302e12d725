"""Sign-off: a draft accepted (final) or rejected (cancelled) as a FHIR DiagnosticReport that
never reads as the other, validated with fhir.resources."""

import base64
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from echo_ray.interop.fhir import diagnostic_report
from echo_ray.interop.signoff import (
    INLINE_LABEL_URL,
    SignoffError,
    SignoffRequest,
    parse_signoff,
    sign_off,
    signed_text,
)
from echo_ray.text.labeler import label_report

DRAFT_TEXT = "FINDINGS: No pleural effusion. The lungs are clear. IMPRESSION: Normal chest."
# The /v1/reports body as a client received it (abridged: sign-off reads what it needs).
DRAFT = {
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.7", "view_position": "PA",
    "used_file": "file1", "findings": "No pleural effusion. The lungs are clear.",
    "impression": "Normal chest.", "report": DRAFT_TEXT, "labels": label_report(DRAFT_TEXT),
    "sentences": [{"section": "findings", "text": "No pleural effusion.", "confidence": 0.41,
                   "low_confidence": True}],
    "model_id": "dcd", "model_version": "0.1.0", "decoding": "one-step-fused",
    "num_files": 1, "file_errors": [], "request_id": "abc", "image_png": "iVBORw0KGgo=",
}
FINDINGS = "Small left pleural effusion. The lungs are otherwise clear."
IMPRESSION = "Small left pleural effusion."
WHEN = datetime(2026, 11, 30, 9, 15, tzinfo=UTC)


def _request(**changes):
    return {"draft": DRAFT, "findings": FINDINGS, "impression": IMPRESSION,
            "decision": "accept", "signed_by": "Dr. R. Reader", **changes}


def _text(form: dict) -> str:
    return base64.b64decode(form["data"]).decode()


def _codes(resource: dict) -> set[str]:
    return {c["code"] for c in resource.get("meta", {}).get("security", [])}


def test_accept_gives_a_final_report_with_the_edits_beside_the_unedited_draft():
    resource = sign_off(_request(), issued=WHEN)
    DiagnosticReport.model_validate(resource)
    assert resource["status"] == "final"
    assert resource["issued"] == WHEN.isoformat()
    assert resource["resultsInterpreter"] == [{"display": "Dr. R. Reader"}]
    assert resource["conclusion"] == IMPRESSION
    signed, draft = resource["presentedForm"]
    assert _text(signed) == f"FINDINGS: {FINDINGS}\n\nIMPRESSION: {IMPRESSION}"
    assert signed["title"] == "Final report, signed by Dr. R. Reader"
    assert _text(draft) == DRAFT_TEXT  # the machine's text, unedited
    assert "machine draft" in draft["title"].lower() and "dcd" in draft["title"]
    # the AI label stays on the draft's form; the signed resource is clinician asserted
    assert draft["extension"] == [{"url": INLINE_LABEL_URL, "valueCoding": {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "AIAST", "display": "Artificial Intelligence asserted"}}]
    assert "extension" not in signed
    assert _codes(resource) == {"CLINAST"}
    assert "machine draft" not in resource["code"]["text"].lower()
    assert resource["imagingStudy"][0]["identifier"]["value"].endswith(DRAFT["study_instance_uid"])


def test_accepted_labels_are_read_from_the_signed_text_not_the_draft():
    resource = sign_off(_request(), issued=WHEN)
    observations = {o["code"]["text"]: o for o in resource["contained"]}
    assert observations["Pleural Effusion"]["valueCodeableConcept"]["text"] == "present"
    assert DRAFT["labels"]["Pleural Effusion"] == 0.0  # the draft said absent
    assert {o["status"] for o in observations.values()} == {"final"}
    assert {r["reference"] for r in resource["result"]} == {f"#{o['id']}" for o in
                                                            observations.values()}
    expected = {k for k, v in label_report(signed_text(FINDINGS, IMPRESSION)).items()
                if v is not None}
    assert set(observations) == expected


def test_reject_gives_a_cancelled_draft_that_asserts_nothing():
    resource = sign_off(_request(decision="reject"), issued=WHEN)
    DiagnosticReport.model_validate(resource)
    assert resource["status"] == "cancelled"
    assert resource["resultsInterpreter"] == [{"display": "Dr. R. Reader"}]
    (form,) = resource["presentedForm"]
    assert _text(form) == DRAFT_TEXT and "rejected machine draft" in form["title"].lower()
    assert form["extension"][0]["valueCoding"]["code"] == "AIAST"
    assert _codes(resource) == {"AIAST"}
    for key in ("conclusion", "contained", "result"):
        assert key not in resource
    assert "signed" not in form["title"].lower()


def test_a_draft_never_reads_as_final_and_a_final_never_as_a_draft():
    draft = diagnostic_report(DRAFT)
    final = sign_off(_request(), issued=WHEN)
    assert draft["status"] == "preliminary" and final["status"] == "final"
    assert "AIAST" in _codes(draft) and "AIAST" not in _codes(final)
    draft_titles = [f["title"].lower() for f in draft["presentedForm"]]
    assert not any("final" in t or "signed by" in t for t in draft_titles)
    assert final["presentedForm"][0]["title"].startswith("Final report")
    assert final["id"] != draft["id"]


def test_an_unedited_accept_keeps_the_draft_text_as_signed():
    resource = sign_off(_request(findings=DRAFT["findings"], impression=DRAFT["impression"]))
    signed, draft = resource["presentedForm"]
    assert _text(signed) == ("FINDINGS: No pleural effusion. The lungs are clear.\n\n"
                             "IMPRESSION: Normal chest.")
    assert _text(draft) == DRAFT_TEXT
    labels = {o["code"]["text"]: o["valueCodeableConcept"]["text"] for o in resource["contained"]}
    assert labels["Pleural Effusion"] == "absent"


@pytest.mark.parametrize(("changes", "field"), [
    ({"decision": "maybe"}, "decision"),
    ({"decision": None}, "decision"),
    ({"signed_by": "   "}, "signed_by"),
    ({"signed_by": ""}, "signed_by"),
    ({"findings": 3}, "findings"),
    ({"impression": None}, "impression"),
    ({"draft": {"findings": "x"}}, "draft"),
    ({"draft": {"error": "not_dicom", "message": "m", "report": "x"}}, "draft"),
    ({"draft": "FINDINGS: ..."}, "draft"),
    ({"extra": 1}, "extra"),
    ({"findings": " ", "impression": ""}, "nothing to sign"),
])
def test_a_bad_request_names_the_field(changes, field):
    with pytest.raises(SignoffError, match=field):
        sign_off(_request(**changes))


def test_missing_fields_and_non_objects_are_refused():
    body = _request()
    del body["signed_by"]
    with pytest.raises(SignoffError, match="signed_by: Field required"):
        parse_signoff(body)
    with pytest.raises(SignoffError, match="JSON object"):
        parse_signoff([body])


def test_a_reject_needs_no_text_and_signers_are_trimmed():
    request = parse_signoff(_request(decision="reject", findings="", impression="",
                                     signed_by="  Dr. B  "))
    assert isinstance(request, SignoffRequest) and request.signed_by == "Dr. B"
    assert sign_off(request)["resultsInterpreter"] == [{"display": "Dr. B"}]


def test_signed_text_leaves_out_empty_sections():
    assert signed_text("", "Normal.") == "IMPRESSION: Normal."
    assert signed_text(" Clear lungs. ", "") == "FINDINGS: Clear lungs."
