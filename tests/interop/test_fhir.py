"""The FHIR R4 DiagnosticReport of a report dict: identifier, dates, subject, coded results."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from echo_ray.interop.fhir import (
    LABEL_CODES,
    SNOMED,
    VALUE_CODES,
    diagnostic_report,
    patient_reference,
)
from echo_ray.text.labels import CHEXPERT_LABELS

STUDY = "1.2.826.0.1.3680043.8.498.1"
ACSN = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN",
        "display": "Accession ID"}


def _report(**fields) -> dict:
    """A report dict as `report_studies` returns it (the fields FHIR reads)."""
    labels = dict.fromkeys(CHEXPERT_LABELS)
    labels.update({"Pleural Effusion": 1.0, "Pneumothorax": 0.0, "Edema": -1.0,
                   "Support Devices": 1.0})
    return {
        "study_id": "s1", "study_instance_uid": STUDY, "series_instance_uid": None,
        "sop_instance_uid": None, "accession_number": "A20240531-7", "study_date":
        "2024-05-31T14:23:10", "report": "FINDINGS: Moderate effusion. IMPRESSION: Effusion.",
        "findings": "Moderate effusion.", "impression": "Effusion.", "labels": labels,
        "model_id": "tiny", "decoding": "one-step-fused", **fields,
    }


def test_a_report_becomes_a_valid_draft_with_its_accession_number_and_date():
    issued = datetime(2024, 6, 1, 3, 0, tzinfo=UTC)
    resource = diagnostic_report(_report(), issued=issued)
    parsed = DiagnosticReport.model_validate(resource)
    assert parsed.status == "preliminary" and resource["issued"] == issued.isoformat()
    assert resource["identifier"] == [{"type": {"coding": [ACSN]}, "value": "A20240531-7"}]
    # FHIR wants a time zone with a time; DICOM StudyTime has none: the date alone.
    assert resource["effectiveDateTime"] == "2024-05-31"
    assert resource["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{STUDY}"
    assert base64.b64decode(resource["presentedForm"][0]["data"]).decode() == _report()[
        "report"]
    assert "subject" not in resource  # no patient reference unless asked for
    # No accession number, no date: neither element, still valid.
    bare = diagnostic_report(_report(accession_number=None, study_date=None))
    assert "identifier" not in bare and "effectiveDateTime" not in bare
    DiagnosticReport.model_validate(bare)


def test_observations_are_coded_where_a_checked_code_exists():
    resource = diagnostic_report(_report())
    observations = {o["code"]["text"]: o for o in resource["contained"]}
    assert set(observations) == {"Pleural Effusion", "Pneumothorax", "Edema",
                                 "Support Devices"}  # the labels the report mentions
    assert [r["reference"] for r in resource["result"]] == [
        f"#{o['id']}" for o in resource["contained"]]
    effusion = observations["Pleural Effusion"]
    assert effusion["code"]["coding"] == [
        {"system": SNOMED, "code": "60046008", "display": "Pleural effusion"}]
    assert effusion["valueCodeableConcept"] == {
        "coding": [{"system": SNOMED, "code": "52101004", "display": "Present"}],
        "text": "present"}
    assert observations["Pneumothorax"]["code"]["coding"][0]["code"] == "36118008"
    assert observations["Pneumothorax"]["valueCodeableConcept"]["coding"][0]["code"] == (
        "2667000")
    assert observations["Edema"]["valueCodeableConcept"]["text"] == "uncertain"
    # No single concept means "Support Devices": its name only, no invented code.
    assert observations["Support Devices"]["code"] == {"text": "Support Devices"}
    for observation in resource["contained"]:
        Observation.model_validate(observation)
        assert observation["effectiveDateTime"] == "2024-05-31"


def test_code_tables_cover_only_known_labels_and_values():
    assert set(LABEL_CODES) <= set(CHEXPERT_LABELS)
    codes = [code for code, _ in LABEL_CODES.values()]
    assert len(codes) == len(set(codes)) and all(c.isdigit() for c in codes)
    assert set(VALUE_CODES) == {1.0, 0.0, -1.0}
    assert [text for _, _, text in VALUE_CODES.values()] == ["present", "absent", "uncertain"]


def test_subject_only_from_a_template_and_url_encoded():
    assert patient_reference("Patient/{patient_id}", "MRN-4711") == "Patient/MRN-4711"
    # Characters that would change the reference's shape are encoded.
    assert patient_reference("Patient/{patient_id}", "12/34 5?x") == "Patient/12%2F34%205%3Fx"
    assert patient_reference("Patient?identifier=urn:oid:1.2.3|{patient_id}", " 77 ") == (
        "Patient?identifier=urn:oid:1.2.3|77")
    assert patient_reference("Patient/{patient_id}", None) is None
    assert patient_reference("Patient/{patient_id}", "  ") is None
    resource = diagnostic_report(_report(), subject="Patient/MRN-4711")
    assert resource["subject"] == {"reference": "Patient/MRN-4711"}
    assert all(o["subject"] == resource["subject"] for o in resource["contained"])
    DiagnosticReport.model_validate(resource)


def test_the_serving_call_still_works_and_new_parameters_are_keyword_only():
    assert diagnostic_report(_report())["resourceType"] == "DiagnosticReport"
    with pytest.raises(TypeError):
        diagnostic_report(_report(), datetime.now(UTC))  # type: ignore[misc]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="error row"):
        diagnostic_report({"error": "not_dicom"})
    with pytest.raises(ValueError, match="study_date"):
        diagnostic_report(_report(study_date="31/05/2024"))
