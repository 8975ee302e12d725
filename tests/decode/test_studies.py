"""Studies in, one report or one error out; the FHIR DiagnosticReport of a report."""

import base64

import numpy as np
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from helpers.tiny_dvlm import trained_model

from echo_ray.decode.predictor import ReportGenerator
from echo_ray.decode.studies import STUDY_ERROR_REASONS, prepare_study, report_studies, view_rank
from echo_ray.interop.fhir import diagnostic_report
from echo_ray.synth.dicom_writer import write_dicom
from echo_ray.text.labels import CHEXPERT_LABELS

pytestmark = pytest.mark.usefixtures("single_thread")

STUDY = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture(scope="module")
def generator():
    return ReportGenerator(trained_model(), model_id="tiny", max_new_tokens=16)


def _dicom(seed: int, view: str | None, study: str = STUDY, **attrs) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4096, (96, 80), dtype=np.uint16)
    attrs = {"Modality": "DX", "StudyInstanceUID": study, "PatientName": "Doe^Jane", **attrs}
    if view is not None:
        attrs["ViewPosition"] = view
    return write_dicom(pixels, attrs=attrs)


def test_view_preference():
    assert [view_rank(v) for v in ("PA", "ap ", None, "", "OBLIQUE")] == [0, 1, 2, 2, 2]
    assert all(view_rank(v) is None for v in ("LL", "RL", "LATERAL", "lat"))


def test_pa_is_chosen_over_ap_and_lateral_whatever_the_order():
    files = [("lat.dcm", _dicom(1, "LL")), ("ap.dcm", _dicom(2, "AP")), ("pa.dcm", _dicom(3, "PA"))]
    for order in (files, files[::-1]):
        study = prepare_study(order, size=64)
        assert study.error is None and study.source_file == "pa.dcm"
        assert study.meta["view_position"] == "PA" and study.image.shape == (64, 64)
        assert study.study_instance_uid == STUDY and study.num_files == 3


def test_broken_best_candidate_falls_back_and_is_reported():
    pa = bytearray(_dicom(3, "PA"))
    broken_pa = bytes(pa[: len(pa) - 4000])  # header intact, pixel data cut short
    study = prepare_study([("pa.dcm", broken_pa), ("ap.dcm", _dicom(2, "AP"))], size=64)
    assert study.error is None and study.source_file == "ap.dcm"
    assert [(e["file"], e["error"]) for e in study.file_errors] == [("pa.dcm", "truncated")]


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ([], "no_files"),
        ([("x.dcm", b"not a dicom file at all" * 10)], "not_dicom"),
        ([("l.dcm", _dicom(1, "LL")), ("r.dcm", _dicom(2, "RL"))], "no_frontal_view"),
        ([("a.dcm", _dicom(1, "PA")), ("b.dcm", _dicom(2, "PA", study="1.2.3.4"))],
         "mixed_studies"),
        ([("a.dcm", b"junk" * 50), ("b.dcm", _dicom(2, "PA", Modality="CT"))],
         "no_usable_image"),
    ],
)
def test_study_errors_name_their_reason(files, reason):
    study = prepare_study(files, size=64, modalities=("DX", "CR"))
    assert study.error == reason and reason in STUDY_ERROR_REASONS
    assert study.image is None and study.message
    assert "Doe" not in study.message


def test_report_studies_keeps_order_and_turns_bad_studies_into_error_rows(generator):
    good = [("pa.dcm", _dicom(3, "PA")), ("lat.dcm", _dicom(4, "LL"))]
    studies = [good, [("bad.dcm", b"\x00" * 300)], [("lat.dcm", _dicom(5, "LL"))], good]
    results = report_studies(generator, studies, study_ids=["s1", "s2", "s3", "s4"])
    assert [r["study_id"] for r in results] == ["s1", "s2", "s3", "s4"]
    assert [r.get("error") for r in results] == [None, "not_dicom", "no_frontal_view", None]
    first = results[0]
    assert first["source_file"] == "pa.dcm" and first["view_position"] == "PA"
    assert first["study_instance_uid"] == STUDY and first["num_files"] == 2
    assert set(first["labels"]) == set(CHEXPERT_LABELS) and first["decoding"] == "one-step-fused"
    assert "patient_name" not in first and "Doe" not in str(results)
    # the same study gives the same report (greedy decoding, batch-independent)
    assert results[3]["report"] == first["report"]
    assert results[1]["file_errors"][0]["file"] == "bad.dcm"


def test_per_call_decoding_mode(generator):
    study = [[("pa.dcm", _dicom(3, "PA"))]]
    ar = report_studies(generator, study, decoding="ar")[0]
    fused = report_studies(generator, study)[0]
    assert ar["decoding"] == "ar" and fused["decoding"] == "one-step-fused"
    assert ar["num_forwards"] > fused["num_forwards"]


def test_fhir_diagnostic_report_validates_and_carries_the_report(generator):
    report = report_studies(generator, [[("pa.dcm", _dicom(3, "PA"))]])[0]
    report["labels"] = dict.fromkeys(CHEXPERT_LABELS)
    report["labels"].update({"Cardiomegaly": 1.0, "Pneumothorax": 0.0, "Edema": -1.0})
    report["impression"] = "Mild cardiomegaly."
    resource = diagnostic_report(report)
    parsed = DiagnosticReport.model_validate(resource)  # required fields: status, code
    assert parsed.status == "preliminary" and resource["resourceType"] == "DiagnosticReport"
    assert resource["code"]["coding"][0] == {
        "system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"
    }
    assert resource["conclusion"] == "Mild cardiomegaly."
    text = base64.b64decode(resource["presentedForm"][0]["data"]).decode()
    assert text == report["report"]
    assert resource["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{STUDY}"
    values = {o["code"]["text"]: o["valueCodeableConcept"]["text"] for o in resource["contained"]}
    assert values == {"Cardiomegaly": "present", "Pneumothorax": "absent", "Edema": "uncertain"}
    assert len(resource["result"]) == 3 and "subject" not in resource
    with pytest.raises(ValueError, match="error row"):
        diagnostic_report({"error": "not_dicom"})


def test_the_view_keeps_the_aspect_ratio_and_is_only_made_when_asked(generator):
    from echo_ray.decode.studies import VIEW_SIZE, view_image

    big = np.random.default_rng(9).integers(0, 4096, (2048, 1536), dtype=np.uint16)
    view = view_image(write_dicom(big, attrs={"Modality": "DX"}))
    assert view.shape == (VIEW_SIZE, 768) and view.dtype == np.float32
    assert 0.0 <= view.min() and view.max() <= 1.0
    small = view_image(_dicom(1, "PA"))
    assert small.shape == (96, 80)  # never enlarged, never letterboxed
    files = [("lat.dcm", _dicom(1, "LL")), ("pa.dcm", _dicom(3, "PA"))]
    (plain,) = report_studies(generator, [files], with_image=True)
    assert "view" not in plain and plain["image"].shape == (112, 112)
    (viewed,) = report_studies(generator, [files], with_view=True)
    np.testing.assert_array_equal(viewed["view"], view_image(files[1][1]))  # the PA file
