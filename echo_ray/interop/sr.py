"""A report dict as a DICOM Structured Report (highdicom): the draft a PACS stores beside
the image it was written from.

The document is a Comprehensive SR (SOP class 1.2.840.10008.5.1.4.1.1.88.33) in the
source image's study: its Patient and General Study modules are copied from the reported
file's header (`PreparedStudy.source_header`), in a new series of its own. Its flags say
what it is: PreliminaryFlag PRELIMINARY, VerificationFlag UNVERIFIED, CompletionFlag
PARTIAL, and the CompletionFlagDescription and SeriesDescription say "AI-generated draft,
not reviewed by a radiologist". The content tree (the shape of DICOM TID 2000 "Basic
Diagnostic Imaging Report", without claiming the template):

    CONTAINER  (LN 18748-4, "Diagnostic Imaging Report": fhir.py's code)
      HAS CONCEPT MOD   CODE  Language of Content Item and Descendants = English
      HAS OBS CONTEXT   the model as the device observer (TID 1002/1004): Observer Type
                        Device, Device Observer UID (of model id and version), Name (model
                        id), Manufacturer (echo-ray), Model Name (model id), Serial Number
                        (model version)
      HAS CONCEPT MOD   Algorithm Identification (TID 4019): name (model id), version
                        (model version), family DCM 123110 "Artificial Intelligence",
                        parameters (the decoding mode)
      CONTAINS  TEXT    Comment (DCM 121106): the AI-generated-draft statement
      CONTAINS  IMAGE   Source Image (DCM 121324): the reported image (its SOP class and
                        instance; also in the Current Requested Procedure Evidence Sequence)
      CONTAINS  CONTAINER Findings (LN 59776-5)
                  CONTAINS  TEXT  Finding (DCM 121071): the findings text
      CONTAINS  CONTAINER Impressions (LN 19005-8)
                  CONTAINS  TEXT  Impression (DCM 121073): the impression
      CONTAINS  CONTAINER CheXpert labels (99ECHORAY CHEXPERT)
                  CONTAINS  CODE  one per label the text mentions: concept the finding,
                            value present / absent / uncertain

A section without text is left out; a report with neither findings nor impression keeps
its whole text as the finding. The labels are coded as `fhir.py` codes its Observations:
the finding in SNOMED CT where `fhir.LABEL_CODES` has a checked code, else in the local
scheme `99ECHORAY` (declared in the Coding Scheme Identification Sequence; code
CHEXPERTnn, nn the label's place in `text.labels.CHEXPERT_LABELS`, meaning the label
name); the value with `fhir.VALUE_CODES` (SNOMED CT qualifier values).

UIDs are deterministic (`sr_uids`): the same draft of the same image by the same model
version and decoding is the same SOP instance, so a store that is repeated replaces, never
adds. The header holds patient identifiers: nothing here logs it or puts it in an error
message. Imports pydicom and highdicom only (no torch, no ray).
"""

from __future__ import annotations

import io
import json
import uuid

import pydicom
from pydicom.dataset import Dataset

from echo_ray import __version__
from echo_ray.interop.fhir import LABEL_CODES, VALUE_CODES
from echo_ray.text.labels import CHEXPERT_LABELS

SR_MODALITY = "SR"
MANUFACTURER = "echo-ray"
# The series of an SR lists after the images' series in a PACS viewer.
SR_SERIES_NUMBER = 999
DRAFT_STATEMENT = "AI-generated draft, not reviewed by a radiologist"
SERIES_DESCRIPTION = "AI draft report (not reviewed by a radiologist)"
# The private coding scheme of the labels without a checked SNOMED CT code (DICOM PS3.16:
# a designator starting "99" is a local scheme).
LOCAL_SCHEME = "99ECHORAY"
# Header attributes every SR copies (highdicom reads them; Type 2: may be empty).
_TYPE2_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                   "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                   "ReferringPhysicianName")
# The source image's identity: an SR cannot reference the image without them.
_REQUIRED_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                      "SOPClassUID")
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "echo-ray:interop:sr")


def _uid(*parts: object) -> str:
    """A "2.25." UID (DICOM PS3.5 B.2) of a UUID v5 of `parts`."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, json.dumps(parts)).int}"


def sr_uids(report: dict) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR of `report`, deterministic: the
    series of the study's drafts by one model version and decoding, and the instance of
    the draft of its reported image (`sop_instance_uid`). The same draft stored twice is
    the same instance; another model version or decoding is another series and instance.

    Raises:
        ValueError: the report has no study_instance_uid or sop_instance_uid (not the
            report of a DICOM file), or is an error row.
    """
    if report.get("error"):
        raise ValueError(f"an error row has no report: {report['error']}")
    missing = [k for k in ("study_instance_uid", "sop_instance_uid") if not report.get(k)]
    if missing:
        raise ValueError(f"the report has no {' or '.join(missing)}: a Structured Report "
                         "is about a DICOM image, and this report was not written from one")
    model = (report.get("model_id"), report.get("model_version"), report.get("decoding"))
    series = _uid("series", report["study_instance_uid"], *model)
    instance = _uid("instance", report["study_instance_uid"], report["sop_instance_uid"],
                    *model)
    return series, instance


def build_sr(report: dict, source_header: bytes) -> Dataset:
    """The Comprehensive SR of a report dict (module docstring), about its source image.

    Args:
        report: a report dict of `decode.studies` (`findings`, `impression`, `report`,
            `labels`, `model_id`, `model_version`, `decoding`, `study_instance_uid`,
            `sop_instance_uid`, ...). Missing UIDs are taken from the header.
        source_header: the reported file's header as Part 10 bytes
            (`PreparedStudy.source_header`, `prepare_study(..., keep_header=True)`).

    Returns:
        A highdicom `ComprehensiveSR` (a pydicom `Dataset`); `sr_bytes` gives its file.

    Raises:
        ValueError: an error row, a report without text or without model_id /
            model_version, a header that is not DICOM or lacks the image's UIDs, or a
            report of another study or image than the header's.
    """
    from highdicom.sr import ComprehensiveSR

    if report.get("error"):
        raise ValueError(f"an error row has no report: {report['error']}")
    findings = (report.get("findings") or "").strip()
    impression = (report.get("impression") or "").strip()
    if not findings and not impression:
        findings = (report.get("report") or "").strip()
    if not findings and not impression:
        raise ValueError("the report has no text (findings, impression and report are "
                         "empty): there is no draft to put in a Structured Report")
    for key in ("model_id", "model_version"):
        if not report.get(key):
            raise ValueError(f"the report has no {key}: the SR names the model that wrote "
                             "the draft")
    header = _read_header(source_header)
    report = _with_header_uids(report, header)
    series_uid, instance_uid = sr_uids(report)
    sr = ComprehensiveSR(
        evidence=[header],
        content=_content(report, findings, impression, header),
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
        record_evidence=True,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=str(report["model_id"])[:64],
        software_versions=__version__,
        coding_schemes=[_local_scheme()],
        specific_character_set=_character_set(report, header),
    )
    sr.CompletionFlagDescription = DRAFT_STATEMENT
    return sr


def sr_bytes(ds: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file (preamble, file meta, explicit VR little endian)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------- internals


def _read_header(source_header: bytes) -> Dataset:
    """The source header as a Dataset with the attributes highdicom copies (absent Type 2
    ones added empty). Errors never quote the header's values."""
    if not source_header:
        raise ValueError("no source header: prepare the study with keep_header=True to "
                         "build its Structured Report")
    try:
        header = pydicom.dcmread(io.BytesIO(bytes(source_header)), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on garbage
        raise ValueError(f"the source header is not a DICOM file ({type(exc).__name__}): "
                         "pass PreparedStudy.source_header") from None
    missing = [k for k in _REQUIRED_KEYWORDS if not str(header.get(k) or "").strip()]
    if missing:
        raise ValueError(f"the source header has no {', '.join(missing)}: an SR must "
                         "reference its image's study, series and instance")
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _character_set(report: dict, header: Dataset):
    """The source's Specific Character Set when the report's text is ASCII (a subset of
    every character set), else UTF-8 (ISO_IR 192), which holds the text and the names
    copied from the header alike."""
    texts = [report.get(k) for k in ("findings", "impression", "report", "model_id",
                                     "model_version", "decoding")]
    if all(str(t or "").isascii() for t in texts):
        return header.get("SpecificCharacterSet")
    return "ISO_IR 192"


def _with_header_uids(report: dict, header: Dataset) -> dict:
    """`report` with the header's study and image UIDs; a report of another study or
    image than the header's is refused (its SR would file the draft under the wrong
    image)."""
    out = dict(report)
    for key, keyword in (("study_instance_uid", "StudyInstanceUID"),
                         ("sop_instance_uid", "SOPInstanceUID")):
        value = str(header.get(keyword)).strip()
        if out.get(key) and out[key] != value:
            raise ValueError(f"the report's {key} is not the source header's: build the SR "
                             "from the header of the file the report was written from")
        out[key] = value
    return out


def _content(report: dict, findings: str, impression: str, header: Dataset) -> Dataset:
    from highdicom.sr import (
        AlgorithmIdentification,
        CodeContentItem,
        CodedConcept,
        ContainerContentItem,
        DeviceObserverIdentifyingAttributes,
        ImageContentItem,
        LanguageOfContentItemAndDescendants,
        ObservationContext,
        ObserverContext,
        RelationshipTypeValues,
        TextContentItem,
    )
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    model_id, version = str(report["model_id"]), str(report["model_version"])
    decoding = report.get("decoding")
    root = ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    items = list(LanguageOfContentItemAndDescendants(
        CodedConcept("en", "RFC5646", "English")))
    device = DeviceObserverIdentifyingAttributes(
        uid=_uid("device", model_id, version),
        name=model_id[:64],
        manufacturer_name=MANUFACTURER,
        model_name=model_id[:64],
        serial_number=version[:64],
    )
    items += ObservationContext(
        observer_device_context=ObserverContext(codes.DCM.Device, device))
    items += AlgorithmIdentification(
        name=model_id, version=version, manufacturer=MANUFACTURER,
        family=codes.DCM.ArtificialIntelligence,
        parameters=[f"decoding={decoding}"] if decoding else None,
    )
    statement = (f"{DRAFT_STATEMENT}: a preliminary report written by the model "
                 f"{model_id} (version {version}"
                 f"{f', decoding {decoding}' if decoding else ''}). A radiologist must review "
                 "it before it is used.")
    items.append(TextContentItem(name=codes.DCM.Comment, value=statement,
                                 relationship_type=contains))
    items.append(ImageContentItem(
        name=codes.DCM.SourceImage,
        referenced_sop_class_uid=str(header.SOPClassUID),
        referenced_sop_instance_uid=str(header.SOPInstanceUID),
        relationship_type=contains,
    ))
    for heading, concept, text in ((codes.LN.Findings, codes.DCM.Finding, findings),
                                   (codes.LN.Impressions, codes.DCM.Impression, impression)):
        if text:
            section = ContainerContentItem(name=heading, relationship_type=contains)
            section.ContentSequence = [TextContentItem(name=concept, value=text,
                                                       relationship_type=contains)]
            items.append(section)
    observations = [
        CodeContentItem(name=_label_concept(name), value=_value_concept(value),
                        relationship_type=contains)
        for name, value in (report.get("labels") or {}).items()
        if value is not None
    ]
    if observations:
        labels = ContainerContentItem(
            name=CodedConcept("CHEXPERT", LOCAL_SCHEME, "CheXpert labels"),
            relationship_type=contains)
        labels.ContentSequence = observations
        items.append(labels)
    root.ContentSequence = items
    return root


def _label_concept(name: str):
    from highdicom.sr import CodedConcept

    coded = LABEL_CODES.get(name)
    if coded is not None:
        return CodedConcept(coded[0], "SCT", coded[1])
    if name not in CHEXPERT_LABELS:
        raise ValueError(f"unknown label {name!r}; the labels are {list(CHEXPERT_LABELS)}")
    return CodedConcept(f"CHEXPERT{CHEXPERT_LABELS.index(name):02d}", LOCAL_SCHEME, name)


def _value_concept(value: float):
    from highdicom.sr import CodedConcept

    try:
        code, display, _ = VALUE_CODES[float(value)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"label value {value!r} is not 1.0, 0.0, -1.0 or None") from None
    return CodedConcept(code, "SCT", display)  # fhir.py's codes are SNOMED CT


def _local_scheme():
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="echo-ray CheXpert labels",
        responsible_organization=MANUFACTURER)
