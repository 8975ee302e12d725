"""A report dict as an HL7 FHIR R4 DiagnosticReport (JSON), validated with fhir.resources.

The resource (R4; fhir.resources validates it with its R4B models, whose DiagnosticReport
and Observation are R4's):

- status `preliminary`: a machine draft that a radiologist must review; `meta.security`
  carries the HL7 `AIAST` (artificial intelligence asserted) label;
- category RAD (HL7 v2 table 0074), code LOINC 18748-4 "Diagnostic imaging study";
- `identifier`: the study's accession number (type ACSN, HL7 v2 table 0203), when the
  DICOM header has one: the key a RIS files the report under;
- `effectiveDateTime`: the study date (DICOM StudyDate). Only the date: FHIR requires a
  time zone with a time, and DICOM StudyTime is the site's local time without one;
- `imagingStudy`: a logical reference to the DICOM study (`urn:dicom:uid` identifier with
  the StudyInstanceUID as `urn:oid:...`), when the study has one;
- `conclusion`: the impression; `presentedForm`: the whole report as UTF-8 text;
- `result`: one contained Observation per CheXpert label the report mentions (labels it
  does not mention are left out): `code` the finding (SNOMED CT where a code is listed in
  `LABEL_CODES`, the label name as text always), `valueCodeableConcept` present, absent
  or uncertain (SNOMED CT qualifier values, `VALUE_CODES`);
- `issued`: when the report was written;
- `subject`: only when the caller passes one (`patient_reference`); no patient identifier
  otherwise.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from urllib.parse import quote

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

FHIR_MEDIA_TYPE = "application/fhir+json"
SNOMED = "http://snomed.info/sct"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"

# CheXpert label -> the SNOMED CT concept (code, display) its Observation is coded with.
# Each code is checked against a published source, named beside it; a label without a
# code that could be checked keeps its name as text only (`code.text`), never a guess.
LABEL_CODES: dict[str, tuple[str, str]] = {
    # DICOM PS3.16 (pydicom.sr codes.SCT.PulmonaryEdema, CID 3700). CheXpert's Edema is
    # pulmonary edema (the labeler's phrases: edema, vascular congestion, ...).
    "Edema": ("19242006", "Pulmonary edema"),
    # SNOMED CT release extract: 95436008 |Lung consolidation (disorder)|, a parent of
    # 233604007 |Pneumonia (disorder)|.
    "Consolidation": ("95436008", "Lung consolidation"),
    # HL7 Switzerland CH EKM value set ChEkmInvasiveStreptococcusPneumoniaeManifestation:
    # 233604007 Pneumonia (disorder).
    "Pneumonia": ("233604007", "Pneumonia"),
    # DICOM PS3.16 (pydicom.sr codes.SCT.Pneumothorax, CID 6102); NCBI MedGen C0032326.
    "Pneumothorax": ("36118008", "Pneumothorax"),
    # DICOM PS3.16 (pydicom.sr codes.SCT.PleuralEffusion, CID 645).
    "Pleural Effusion": ("60046008", "Pleural effusion"),
    # SNOMED International's concept-model template "Fracture of [bone structure]": its
    # domain is << 125605004 |Fracture of bone (disorder)|.
    "Fracture": ("125605004", "Fracture of bone"),
    # Text only, no code could be checked here: "Cardiomegaly" (pydicom.sr lists it under
    # a code that the same dictionary also names "Enlarged septal foramen of heart", so it
    # is not used), "Atelectasis", "Lung Opacity", "Lung Lesion". Text only, no single
    # concept means the label: "No Finding", "Enlarged Cardiomediastinum", "Pleural
    # Other" (any other pleural finding), "Support Devices" (any line, tube or device).
}
# Label value -> (SNOMED CT qualifier value code, display, the text kept beside it).
# Present and Absent: HL7 mCODE value set "Present Absent" (52101004, 2667000).
# Uncertain: pydicom.sr SNOMED dictionary, 64957009 "Uncertain (qualifier value)".
VALUE_CODES: dict[float, tuple[str, str, str]] = {
    1.0: ("52101004", "Present", "present"),
    0.0: ("2667000", "Absent", "absent"),
    -1.0: ("64957009", "Uncertain", "uncertain"),
}


def patient_reference(template: str, patient_id: str | None) -> str | None:
    """The `subject` reference for a report: `template` ("Patient/{patient_id}") with the
    DICOM PatientID, URL-encoded so that no character of it can change the reference's
    shape; None when the file has no PatientID."""
    if not patient_id or not patient_id.strip():
        return None
    return template.format(patient_id=quote(patient_id.strip(), safe=""))


def diagnostic_report(report: dict, *, issued: datetime | None = None,
                      subject: str | None = None) -> dict:
    """The FHIR R4 DiagnosticReport of a report dict (`ReportGenerator` / `report_studies`).

    Args:
        report: the report dict; `accession_number` and `study_date` are used when present.
        issued: when the report was written (default: now).
        subject: a reference to the patient (`patient_reference`); None leaves it out.

    Raises:
        ValueError: the report dict is an error row (it has no report to convert), or its
            study_date is not an ISO 8601 date.
    """
    if report.get("error"):
        raise ValueError(f"an error row has no report: {report['error']}")
    issued = issued or datetime.now(UTC)
    effective = _study_day(report.get("study_date"))
    common = {
        **({"subject": {"reference": subject}} if subject else {}),
        **({"effectiveDateTime": effective} if effective else {}),
    }
    observations = [
        {
            "resourceType": "Observation",
            "id": f"label-{i}",
            "status": "preliminary",
            "code": _label_concept(name),
            **common,
            "valueCodeableConcept": _value_concept(value),
        }
        for i, (name, value) in enumerate((report.get("labels") or {}).items())
        if value is not None
    ]
    resource = {
        "resourceType": "DiagnosticReport",
        "id": str(uuid.uuid4()),
        "meta": {
            "security": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                    "code": "AIAST",
                    "display": "Artificial Intelligence asserted",
                }
            ]
        },
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "18748-4",
                    "display": "Diagnostic imaging study",
                }
            ],
            "text": "Chest X-ray report (machine draft)",
        },
        **common,
        "issued": issued.isoformat(),
        "conclusion": report.get("impression") or None,
        "presentedForm": [
            {
                "contentType": "text/plain; charset=utf-8",
                "language": "en",
                "title": f"Draft report by {report.get('model_id')} ({report.get('decoding')})",
                "data": base64.b64encode((report.get("report") or "").encode()).decode(),
            }
        ],
    }
    if report.get("accession_number"):
        resource["identifier"] = [
            {
                "type": {
                    "coding": [
                        {"system": IDENTIFIER_TYPE, "code": "ACSN", "display": "Accession ID"}
                    ]
                },
                "value": report["accession_number"],
            }
        ]
    if report.get("study_instance_uid"):
        resource["imagingStudy"] = [
            {
                "identifier": {
                    "system": "urn:dicom:uid",
                    "value": f"urn:oid:{report['study_instance_uid']}",
                },
                "display": "DICOM study",
            }
        ]
    if observations:
        resource["contained"] = observations
        resource["result"] = [{"reference": f"#{o['id']}"} for o in observations]
    resource = {k: v for k, v in resource.items() if v is not None}
    DiagnosticReport.model_validate(resource)  # raises on anything FHIR R4 would reject
    return resource


def _label_concept(name: str) -> dict:
    coded = LABEL_CODES.get(name)
    if coded is None:
        return {"text": name}
    return {"coding": [{"system": SNOMED, "code": coded[0], "display": coded[1]}],
            "text": name}


def _value_concept(value: float) -> dict:
    code, display, text = VALUE_CODES[float(value)]
    return {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": text}


def _study_day(study_date: str | None) -> str | None:
    """The date (YYYY-MM-DD) of a report's `study_date`, None without one."""
    if not study_date:
        return None
    try:
        return datetime.fromisoformat(study_date).date().isoformat()
    except (TypeError, ValueError):
        raise ValueError(f"study_date {study_date!r} is not an ISO 8601 date "
                         "(YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)") from None
