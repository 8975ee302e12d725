"""A report dict as an HL7 FHIR R4 DiagnosticReport (JSON), validated with fhir.resources.

The resource (R4; fhir.resources validates it with its R4B models, whose DiagnosticReport
and Observation are R4's):

- status `preliminary`: a machine draft that a radiologist must review; `meta.security`
  carries the HL7 `AIAST` (artificial intelligence asserted) label;
- category RAD (HL7 v2 table 0074), code LOINC 18748-4 "Diagnostic imaging study";
- `imagingStudy`: a logical reference to the DICOM study (`urn:dicom:uid` identifier with
  the StudyInstanceUID as `urn:oid:...`), when the study has one;
- `conclusion`: the impression; `presentedForm`: the whole report as UTF-8 text;
- `result`: one contained Observation per CheXpert label the report mentions (present,
  uncertain or absent; labels it does not mention are left out);
- `issued`: when the report was written; no patient identifiers (no `subject`).
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

FHIR_MEDIA_TYPE = "application/fhir+json"
_LABEL_VALUES = {1.0: "present", -1.0: "uncertain", 0.0: "absent"}


def diagnostic_report(report: dict, *, issued: datetime | None = None) -> dict:
    """The FHIR R4 DiagnosticReport of a report dict (`ReportGenerator` / `report_studies`).

    Raises:
        ValueError: the report dict is an error row (it has no report to convert).
    """
    if report.get("error"):
        raise ValueError(f"an error row has no report: {report['error']}")
    issued = issued or datetime.now(UTC)
    observations = [
        {
            "resourceType": "Observation",
            "id": f"label-{i}",
            "status": "preliminary",
            "code": {"text": name},
            "valueCodeableConcept": {"text": _LABEL_VALUES[float(value)]},
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
