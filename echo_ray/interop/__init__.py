"""interop: what other hospital systems read and speak.

- fhir.py: a report as an HL7 FHIR R4 DiagnosticReport (JSON), validated
- signoff.py: a radiologist's accept / reject of a draft as the DiagnosticReport that
  records it (final or cancelled), a pure transform
- sr.py: a report as a DICOM Structured Report (highdicom), preliminary and AI-generated,
  about the source image
- dicomweb.py: a PACS over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store),
  credentials from the environment or a file
- dimse.py: C-STORE of datasets to a DICOM node (pynetdicom)
- destinations.py: one `store` for both kinds of destination URI

May import text/ and data/ and the standard-library, FHIR (pydantic), DICOM (pydicom,
highdicom, pynetdicom) and HTTP (requests) packages: no torch, no ray.
"""
