"""Sign-off: a radiologist's decision on a machine draft, as the FHIR R4 DiagnosticReport
that records it (`POST /v1/reports/signoff`). A pure transform: nothing is stored.

The request (`SignoffRequest`): the draft (the `/v1/reports` JSON body as the client
received it), the radiologist's `findings` and `impression` (edited or not), `decision`
("accept" or "reject") and `signed_by` (who decides, as the reader typed it).

- accept: status `final`; `conclusion` is the signed impression; `presentedForm[0]` the signed
  text ("FINDINGS: ...", "IMPRESSION: ..."), `presentedForm[1]` the unedited machine draft,
  which keeps the `AIAST` label inline (the DS4P inline security label extension); the
  resource itself carries `CLINAST` (clinician asserted), not `AIAST`, and its contained
  Observations are re-derived from the signed text (`text.labeler.label_report`), status
  `final`; `resultsInterpreter` names the signer; `issued` is the sign-off time.
- reject: status `cancelled`: the machine draft as `interop.fhir.diagnostic_report` writes it
  (`AIAST` on the resource and on its one form), without `conclusion` or Observations (a
  rejected draft asserts nothing), `resultsInterpreter` the reader who rejected it.

So a final report never reads as a machine draft (status, code text, form titles, labels),
and a draft never as a final one.
"""

from __future__ import annotations

import base64
import copy
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from echo_ray.interop.fhir import diagnostic_report
from echo_ray.text.labeler import label_report

DECISIONS = ("accept", "reject")
_SECURITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
AI_ASSERTED = {"system": _SECURITY_SYSTEM, "code": "AIAST",
               "display": "Artificial Intelligence asserted"}
CLINICIAN_ASSERTED = {"system": _SECURITY_SYSTEM, "code": "CLINAST",
                      "display": "clinician asserted"}
# An element's own security label (HL7 FHIR Data Segmentation for Privacy IG).
INLINE_LABEL_URL = (
    "http://hl7.org/fhir/uv/security-label-ds4p/StructureDefinition/extension-inline-sec-label"
)


class SignoffError(ValueError):
    """The sign-off request is unusable; the message names the field and what is wrong."""


class SignoffRequest(BaseModel):
    """The body of `POST /v1/reports/signoff`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    draft: dict[str, Any] = Field(
        description="The /v1/reports JSON body as received (at least its `report` text).")
    findings: str = Field(description="FINDINGS as the radiologist signs them.")
    impression: str = Field(description="IMPRESSION as the radiologist signs it.")
    decision: Literal["accept", "reject"] = Field(
        description="accept: a final report; reject: the draft is cancelled.")
    signed_by: str = Field(min_length=1, description="Who accepts or rejects the draft.")

    @field_validator("signed_by")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name who signs (it is blank)")
        return value.strip()

    @field_validator("draft")
    @classmethod
    def _has_report(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("error"):
            raise ValueError(f"is an error response ({value['error']}), not a report")
        if not isinstance(value.get("report"), str) or not value["report"].strip():
            raise ValueError("has no `report` text: send the /v1/reports body as received")
        return value


def parse_signoff(body: Any) -> SignoffRequest:
    """`body` (decoded JSON) as a `SignoffRequest`.

    Raises:
        SignoffError: naming each field that is missing, extra or wrong.
    """
    if not isinstance(body, Mapping):
        raise SignoffError(f"the body must be a JSON object, not {type(body).__name__}")
    try:
        request = SignoffRequest.model_validate(dict(body))
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        ]
        raise SignoffError("; ".join(problems)) from None
    if request.decision == "accept" and not (request.findings.strip()
                                             or request.impression.strip()):
        raise SignoffError("findings and impression are both empty: nothing to sign")
    return request


def signed_text(findings: str, impression: str) -> str:
    """The signed report's text: "FINDINGS: ..." and "IMPRESSION: ..." (empty ones left
    out), the headers `text.sections.parse_sections` reads."""
    parts = [f"{name}: {body.strip()}" for name, body in
             (("FINDINGS", findings), ("IMPRESSION", impression)) if body.strip()]
    return "\n\n".join(parts)


def sign_off(body: Mapping[str, Any] | SignoffRequest, *, issued: datetime | None = None
             ) -> dict:
    """The FHIR R4 DiagnosticReport (JSON) that records a sign-off (module docstring).

    Args:
        body: the request, decoded JSON or parsed.
        issued: when it was signed (default: now, UTC).

    Raises:
        SignoffError: the request is unusable (`parse_signoff`).
    """
    request = body if isinstance(body, SignoffRequest) else parse_signoff(body)
    issued = issued or datetime.now(UTC)
    draft = request.draft
    try:
        machine = diagnostic_report(draft)
    except ValueError as exc:  # a draft FHIR cannot hold
        raise SignoffError(f"draft: {exc}") from None
    draft_form = {
        **machine["presentedForm"][0],
        "title": f"Unedited machine draft by {draft.get('model_id')} "
                 f"({draft.get('decoding')}); not reviewed",
        "extension": [{"url": INLINE_LABEL_URL, "valueCoding": dict(AI_ASSERTED)}],
    }
    if request.decision == "reject":
        resource = copy.deepcopy(machine)
        resource.update(status="cancelled", presentedForm=[{
            **draft_form, "title": f"Rejected machine draft by {draft.get('model_id')} "
                                   f"({draft.get('decoding')}); not a report",
        }])
        for key in ("conclusion", "contained", "result"):
            resource.pop(key, None)
    else:
        text = signed_text(request.findings, request.impression)
        resource = diagnostic_report({
            **draft, "report": text, "findings": request.findings.strip(),
            "impression": request.impression.strip(), "labels": label_report(text),
        })
        security = [c for c in resource.get("meta", {}).get("security", [])
                    if c.get("code") != AI_ASSERTED["code"]]
        resource["meta"] = {**resource.get("meta", {}),
                            "security": [*security, dict(CLINICIAN_ASSERTED)]}
        resource["code"] = {**resource["code"], "text": "Chest X-ray report"}
        resource["status"] = "final"
        resource["presentedForm"] = [
            {
                "contentType": "text/plain; charset=utf-8",
                "language": "en",
                "title": f"Final report, signed by {request.signed_by}",
                "data": base64.b64encode(text.encode()).decode(),
                "creation": issued.isoformat(),
            },
            draft_form,
        ]
        if request.impression.strip():
            resource["conclusion"] = request.impression.strip()
        else:
            resource.pop("conclusion", None)
        for observation in resource.get("contained", []):
            if observation.get("resourceType") == "Observation":
                observation["status"] = "final"
    resource.update(
        id=str(uuid.uuid4()),
        issued=issued.isoformat(),
        resultsInterpreter=[{"display": request.signed_by}],
    )
    DiagnosticReport.model_validate(resource)  # raises on anything FHIR R4 would reject
    return resource
