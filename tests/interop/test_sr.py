"""The DICOM Structured Report of a draft: same patient and study as the image, the image
referenced, text and coded labels, preliminary and AI-generated, deterministic UIDs, and a
file that pydicom, highdicom and dcmtk's dsrdump all read."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from highdicom.sr import ComprehensiveSR, srread
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage

from echo_ray.decode.studies import prepare_study
from echo_ray.interop.fhir import LABEL_CODES, VALUE_CODES
from echo_ray.interop.sr import (
    SR_MODALITY,
    build_sr,
    sr_bytes,
    sr_uids,
)
from echo_ray.synth.archive import synthesize_archive
from echo_ray.text.labels import CHEXPERT_LABELS

DSRDUMP = shutil.which("dsrdump") or "/usr/bin/dsrdump"
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                 "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime",
                 "AccessionNumber", "ReferringPhysicianName")
LABELS = {"Cardiomegaly": 1.0, "Pleural Effusion": 1.0, "Pneumothorax": 0.0,
          "Pneumonia": -1.0, "No Finding": 0.0}


@pytest.fixture(scope="module")
def headers(tmp_path_factory) -> list[bytes]:
    """The reported file's header of each study of a small synthetic archive (its files
    come in several transfer syntaxes)."""
    root = tmp_path_factory.mktemp("archive")
    synthesize_archive(root, num_studies=2, seed=0, image_size=64)
    out = []
    for folder in sorted({p.parent for p in Path(root).rglob("*.dcm")}):
        files = [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.dcm"))]
        study = prepare_study(files, size=56, keep_header=True)
        assert study.error is None, study.message
        out.append(study.source_header)
    assert len(out) == 2
    return out


def _source(header: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(header))


def _report(source: Dataset, **fields) -> dict:
    """A report dict as `report_studies` writes it about `source`."""
    labels = dict.fromkeys(CHEXPERT_LABELS)
    labels.update(LABELS)
    return {
        "study_id": "s1", "study_instance_uid": source.StudyInstanceUID,
        "series_instance_uid": source.SeriesInstanceUID,
        "sop_instance_uid": source.SOPInstanceUID, "accession_number": None,
        "study_date": None,
        "report": "FINDINGS: The heart is enlarged. Small right effusion. No pneumothorax. "
                  "IMPRESSION: Cardiomegaly. Effusion. Possible pneumonia.",
        "findings": "The heart is enlarged. Small right effusion. No pneumothorax.",
        "impression": "Cardiomegaly. Effusion. Possible pneumonia.",
        "labels": labels, "model_id": "echo-tiny", "model_version": "0.7.1",
        "decoding": "one-step-fused", **fields,
    }


def _items(ds: Dataset, value_type: str | None = None) -> list[Dataset]:
    """Every content item of the tree, depth first (optionally of one value type)."""
    out = []
    for item in ds.get("ContentSequence", []):
        if value_type is None or item.ValueType == value_type:
            out.append(item)
        out += _items(item, value_type)
    return out


def _named(ds: Dataset, meaning: str) -> list[Dataset]:
    return [i for i in _items(ds) if i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def test_the_sr_is_a_preliminary_ai_draft_in_the_source_study_about_the_source_image(headers):
    source = _source(headers[0])
    report = _report(source)
    ds = pydicom.dcmread(io.BytesIO(sr_bytes(build_sr(report, headers[0]))))
    assert ds.SOPClassUID == ComprehensiveSRStorage and ds.Modality == SR_MODALITY
    for keyword in PATIENT_STUDY:  # the Patient and General Study modules, copied
        assert ds.get(keyword) == source.get(keyword), keyword
    assert str(ds.PatientName) and ds.AccessionNumber  # the synthetic header has them
    # A new series and instance of its own, the UIDs of `sr_uids`.
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == sr_uids(report)
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # Preliminary, unverified, partial; said in words too.
    assert (ds.PreliminaryFlag, ds.VerificationFlag, ds.CompletionFlag) == (
        "PRELIMINARY", "UNVERIFIED", "PARTIAL")
    assert "VerifyingObserverSequence" not in ds
    for text in (ds.SeriesDescription, ds.CompletionFlagDescription):
        assert "AI" in text and "not reviewed by a radiologist" in text
    (comment,) = _named(ds, "Comment")
    assert "AI-generated draft" in comment.TextValue and "echo-tiny" in comment.TextValue
    (family,) = _named(ds, "Algorithm Family")
    assert family.ConceptCodeSequence[0].CodeValue == "123110"  # DCM Artificial Intelligence
    # The title: the LOINC code fhir.py's DiagnosticReport carries.
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert ds.ConceptNameCodeSequence[0].CodingSchemeDesignator == "LN"
    # The source image: an IMAGE item and the evidence sequence.
    (image,) = _items(ds, "IMAGE")
    ref = image.ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        source.SOPClassUID, source.SOPInstanceUID)
    (evidence,) = ds.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_findings_impression_and_the_mentioned_labels_are_in_the_tree(headers):
    source = _source(headers[1])
    report = _report(source)
    ds = build_sr(report, headers[1])
    (findings,) = _named(ds, "Finding")
    (impression,) = _named(ds, "Impression")
    assert findings.TextValue == report["findings"]
    assert impression.TextValue == report["impression"]
    (labels,) = _named(ds, "CheXpert labels")
    coded = {}
    for item in labels.ContentSequence:
        assert item.ValueType == "CODE" and item.RelationshipType == "CONTAINS"
        name, value = item.ConceptNameCodeSequence[0], item.ConceptCodeSequence[0]
        coded[name.CodeMeaning] = (name.CodingSchemeDesignator, name.CodeValue,
                                   value.CodingSchemeDesignator, value.CodeValue)
    # Only the mentioned labels (None is left out), each coded as fhir.py codes it.
    expected = {}
    for label, value in LABELS.items():
        meaning = LABEL_CODES[label][1] if label in LABEL_CODES else label
        expected[meaning] = (
            ("SCT", LABEL_CODES[label][0]) if label in LABEL_CODES
            else ("99ECHORAY", f"CHEXPERT{CHEXPERT_LABELS.index(label):02d}")
        ) + ("SCT", VALUE_CODES[value][0])
    assert coded == expected
    assert coded["Pleural effusion"][3] == "52101004"  # present
    assert coded["Pneumothorax"][3] == "2667000"  # absent
    assert coded["Pneumonia"][3] == "64957009"  # uncertain
    schemes = {s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence}
    assert "99ECHORAY" in schemes  # the local scheme is declared
    # No label mentioned: no label container; a findings-only draft has no impression.
    bare = build_sr(_report(source, labels=dict.fromkeys(CHEXPERT_LABELS), impression=""),
                    headers[1])
    assert not _named(bare, "CheXpert labels") and not _named(bare, "Impression")
    assert _named(bare, "Finding")[0].TextValue == report["findings"]


def test_the_model_is_the_device_observer(headers):
    ds = srread(io.BytesIO(sr_bytes(build_sr(_report(_source(headers[0])), headers[0]))))
    values = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in _items(ds)
              if i.RelationshipType == "HAS OBS CONTEXT"}
    assert values["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
    assert values["Device Observer Name"].TextValue == "echo-tiny"
    assert values["Device Observer Model Name"].TextValue == "echo-tiny"
    assert values["Device Observer Serial Number"].TextValue == "0.7.1"
    (version,) = _named(ds, "Algorithm Version")
    assert version.TextValue == "0.7.1"
    assert ds.ManufacturerModelName == "echo-tiny"
    # The device UID is the model's, whatever the image.
    other = build_sr(_report(_source(headers[1])), headers[1])
    uid = values["Device Observer UID"].UID
    assert _named(other, "Device Observer UID")[0].UID == uid
    renamed = build_sr(_report(_source(headers[0]), model_version="0.7.2"), headers[0])
    assert _named(renamed, "Device Observer UID")[0].UID != uid


def test_uids_are_deterministic_per_draft(headers):
    source = _source(headers[0])
    report = _report(source)
    first, again = build_sr(report, headers[0]), build_sr(dict(report), headers[0])
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID, again.SOPInstanceUID) == sr_uids(report)
    for uid in sr_uids(report):
        assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    others = [sr_uids(_report(source, **change)) for change in (
        {"model_version": "0.7.2"}, {"decoding": "ar"}, {"model_id": "echo-base"})]
    assert len({sop for _, sop in others} | {sr_uids(report)[1]}) == 4
    # Another image of the same study, same model: same series, another instance.
    other_image = sr_uids(_report(source, sop_instance_uid="1.2.3.4"))
    assert other_image[0] == sr_uids(report)[0] and other_image[1] != sr_uids(report)[1]
    # A header without a UID the report lacks: the header's are used.
    bare = build_sr(_report(source, study_instance_uid=None, sop_instance_uid=None),
                    headers[0])
    assert bare.SOPInstanceUID == sr_uids(report)[1]


def test_the_file_reads_back_with_highdicom_and_pydicom(headers):
    for header in headers:  # the sources' transfer syntaxes differ; the SR's does not
        source = _source(header)
        blob = sr_bytes(build_sr(_report(source), header))
        assert blob[128:132] == b"DICM"
        sr = ComprehensiveSR.from_dataset(pydicom.dcmread(io.BytesIO(blob)))
        assert sr.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert [e[2] for e in sr.get_evidence()] == [source.SOPInstanceUID]
        root = sr.content[0]
        assert root.name.value == "18748-4" and root.name.scheme_designator == "LN"


def test_non_ascii_text_is_utf8(headers):
    source = _source(headers[0])
    findings = "Opacity 2 cm \u00d7 3 cm; angle 30\u00b0."
    blob = sr_bytes(build_sr(_report(source, findings=findings), headers[0]))
    ds = pydicom.dcmread(io.BytesIO(blob))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert _named(ds, "Finding")[0].TextValue == findings
    assert ds.PatientName == source.PatientName


@pytest.mark.skipif(not Path(DSRDUMP).exists(), reason="dcmtk's dsrdump is not installed "
                    "(Debian package dcmtk)")
def test_dsrdump_reads_the_document_without_a_warning(headers, tmp_path):
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_bytes(build_sr(_report(_source(headers[1])), headers[1])))
    done = subprocess.run([DSRDUMP, "+Pc", "+Pl", str(path)], capture_output=True,
                          text=True, errors="replace", timeout=30)
    assert done.returncode == 0, done.stderr
    assert not [line for line in (done.stdout + done.stderr).splitlines()
                if line.startswith(("E:", "W:", "F:"))], done.stderr
    assert "Comprehensive SR Document" in done.stdout
    assert "Preliminary Flag    : PRELIMINARY" in done.stdout
    assert "Verification Flag   : UNVERIFIED" in done.stdout
    assert '(121071,DCM,"Finding")="The heart is enlarged.' in done.stdout
    assert '(36118008,SCT,"Pneumothorax")=(2667000,SCT,"Absent")' in done.stdout


@pytest.mark.parametrize("change, message", [
    ({"findings": "", "impression": "", "report": "  "}, "has no text"),
    ({"error": "no_frontal_view", "message": "only laterals"}, "error row"),
    ({"model_version": None}, "no model_version"),
    ({"labels": {"Edema": 0.5}}, "label value 0.5"),
    ({"sop_instance_uid": "1.2.3.4"}, "sop_instance_uid is not the source header's"),
])
def test_a_report_it_cannot_use_is_a_value_error(headers, change, message):
    with pytest.raises(ValueError, match=message):
        build_sr(_report(_source(headers[0]), **change), headers[0])


def test_a_header_it_cannot_use_is_a_value_error(headers):
    source = _source(headers[0])
    del source.StudyInstanceUID
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ValueError, match="no StudyInstanceUID") as err:
        build_sr(_report(_source(headers[0])), buffer.getvalue())
    assert str(_source(headers[0]).PatientName) not in str(err.value)  # no PHI in errors
    with pytest.raises(ValueError, match="keep_header=True"):
        build_sr(_report(_source(headers[0])), None)
    with pytest.raises(ValueError, match="not a DICOM file"):
        build_sr(_report(_source(headers[0])), b"not dicom at all")
    with pytest.raises(ValueError, match="no study_instance_uid"):
        sr_uids({"sop_instance_uid": "1.2.3", "model_id": "m"})


def test_type2_attributes_missing_from_the_header_are_written_empty(headers):
    source = _source(headers[0])
    for keyword in ("PatientSex", "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        delattr(source, keyword)
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(sr_bytes(build_sr(_report(source), buffer.getvalue()))))
    assert ds.PatientID == source.PatientID
    assert "AccessionNumber" in ds and ds.AccessionNumber == ""
