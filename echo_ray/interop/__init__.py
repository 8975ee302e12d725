"""interop: report formats that other hospital systems read.

- fhir.py: a report as an HL7 FHIR R4 DiagnosticReport (JSON), validated
  (DICOM Structured Reports will live beside it)
- signoff.py: a radiologist's accept / reject of a draft as the DiagnosticReport that
  records it (final or cancelled), a pure transform

May import only text/ and the standard-library and FHIR packages (pydantic, which
fhir.resources is built on, included): no torch, no ray.
"""
