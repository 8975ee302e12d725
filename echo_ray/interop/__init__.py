"""interop: report formats that other hospital systems read.

- fhir.py: a report as an HL7 FHIR R4 DiagnosticReport (JSON), validated
  (DICOM Structured Reports will live beside it)

May import only text/ and the standard-library and FHIR packages: no torch, no ray.
"""
