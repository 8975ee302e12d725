"""The HTTP endpoint on a real Ray Serve (the session's local Ray), a tiny checkpoint."""

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from helpers.tiny_dvlm import trained_model
from PIL import Image

from echo_ray.config.schema import RADIOGRAPH_MODALITIES, EchoConfig, ServeConfig
from echo_ray.data.storage import model_name
from echo_ray.decode.modes import trained_modes
from echo_ray.decode.studies import prepare_study
from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.serving.app import build_app
from echo_ray.serving.options import AppArgs, app_args, load_api_keys, served_modes
from echo_ray.serving.schemas import ErrorBody, ModelList, ReportBody, StudyErrorBody
from echo_ray.synth.dicom_writer import write_dicom
from echo_ray.text.labels import CHEXPERT_LABELS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "test-key-1"
FILE_KEY = "file-key-2"
STUDY = "1.2.826.0.1.3680043.8.498.7"
ACCESSION = "ACC-7781"
# Every app here: one decoder replica on a quarter CPU (the module's apps fit 4 logical CPUs).
DECODER = {"decoder_num_cpus": 0.25, "decoder_max_replicas": 1}


def _dicom(seed: int, view: str | None = "PA", study: str = STUDY, **attrs) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4096, (96, 80), dtype=np.uint16)
    attrs = {"Modality": "DX", "StudyInstanceUID": study, "PatientName": "Doe^Jane",
             "PatientID": "MRN-000123", "AccessionNumber": ACCESSION, "StudyDate": "20260102",
             "StudyTime": "101500", **attrs}
    if view is not None:
        attrs["ViewPosition"] = view
    return write_dicom(pixels, attrs=attrs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_checkpoint(trained_model(), tmp_path_factory.mktemp("run") / "model"))


@pytest.fixture(scope="module")
def server(ray_cluster, checkpoint, tmp_path_factory, monkeypatch_module):
    """The app on loopback: keys from the environment and a file, small limits."""
    from ray import serve

    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# ops keys\n{FILE_KEY}  # rotated monthly\n\n")
    monkeypatch_module.setenv("ECHO_RAY_API_KEYS", f"{KEY}, other-key")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({
        "checkpoint": checkpoint, "api_keys_file": str(keys_file), "num_cpus": 0.25,
        "max_new_tokens": 16, "max_replicas": 1, "max_upload_mb": 0.25, "max_files": 3,
        "batch_wait_timeout_s": 0.5, "max_batch_size": 8, **DECODER,
    })
    serve.run(app, name="echo-ray", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    yield url
    serve.shutdown()


def _post(url, data=None, files=None, key=KEY, content_type="application/dicom", params=None,
          **headers):
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if data is not None and content_type is not None:
        headers["Content-Type"] = content_type
    return requests.post(f"{url}/v1/reports", data=data, files=files, headers=headers,
                         params=params, timeout=60)


# ----------------------------------------------------------------------------- options


def test_build_app_refuses_to_start_without_keys_unless_insecure(monkeypatch, checkpoint):
    monkeypatch.delenv("ECHO_RAY_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="no API keys configured"):
        build_app({"checkpoint": checkpoint})
    build_app({"checkpoint": checkpoint, "insecure": True})  # the explicit dev flag
    with pytest.raises(ValueError, match="unknown echo-ray serve args"):
        build_app({"checkpoint": checkpoint, "insecure": True, "max_batch": 4})
    with pytest.raises(ValueError, match="unknown decoding modes"):
        AppArgs.parse({"checkpoint": "x", "modes": ["ar", "beam"]})
    with pytest.raises(ValueError, match="at least one mode"):
        AppArgs.parse({"checkpoint": "x", "modes": []})
    with pytest.raises(ValueError, match="http_options"):
        AppArgs.parse({"checkpoint": "x", "port": 9000})
    with pytest.raises(ValueError, match="decoding.threshold"):
        AppArgs.parse({"checkpoint": "x", "threshold": 2.0})


def test_served_modes_are_the_checkpoints_unless_the_server_names_them():
    def served(stage, **args):
        return served_modes(AppArgs.parse({"checkpoint": "x", **args}).config,
                            trained_modes(stage))

    assert served("dcd") == (["one-step-fused", "one-step"], "one-step-fused")
    assert served("dcd", decoding="one-step") == (["one-step", "one-step-fused"], "one-step")
    # decoding.mode (one-step-fused by default) is not a RAD teacher's: its first mode is
    assert served("rad") == (["multi-step"], "multi-step")
    assert served("ar", decoding="ar") == (["ar"], "ar")
    assert served(None)[0] == ["one-step-fused", "ar", "multi-step", "one-step"]
    # an explicit list wins over the checkpoint's, its default first
    assert served("dcd", modes=["ar", "multi-step"], decoding="multi-step") == (
        ["multi-step", "ar"], "multi-step")
    assert served("ar", modes=["one-step"]) == (["one-step"], "one-step")
    # `echo-ray serve` passes None (the checkpoint's) or the list through its args
    config = EchoConfig()
    assert app_args(config, "x")["modes"] is None
    config.serve.modes = ("ar",)
    assert AppArgs.parse(app_args(config, "x")).serve.modes == ("ar",)


def test_keys_come_from_the_environment_and_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ECHO_RAY_API_KEYS", " a, b ,,")
    keys = tmp_path / "k"
    keys.write_text("c\n# comment\n d # note\n")
    serve = AppArgs.parse({"checkpoint": "x", "api_keys_file": str(keys)}).serve
    assert load_api_keys(serve) == list("abcd")


def test_the_ingress_module_does_not_import_torch():
    """The ingress replica imports these modules only to parse and route, the decoder
    replicas to read DICOM: no torch, no transformers (hundreds of MB per process); the
    model replicas import them."""
    code = (
        "import sys, echo_ray.serving.ingress, echo_ray.serving.decoder, "
        "echo_ray.serving.app; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _deployments(app) -> dict:
    """A built (not yet run) Serve app's deployments by name: the ingress and every
    deployment bound into it."""
    from ray.serve.deployment import Application

    found, todo = {}, [app]
    while todo:
        deployment = todo.pop()._bound_deployment
        found[deployment.name] = deployment
        args = (*deployment.init_args, *deployment.init_kwargs.values())
        todo += [a for a in args if isinstance(a, Application)]
    return found


def test_the_decoder_is_a_cpu_deployment_that_scales_on_its_own(checkpoint):
    """DICOM decode runs in `StudyDecoder` replicas ahead of the model: CPU only, with an
    autoscaling config of its own (serve.decoder_*), not the model's."""
    app = build_app({"checkpoint": checkpoint, "insecure": True, "min_replicas": 1,
                     "max_replicas": 3, "target_ongoing_requests": 8,
                     "decoder_min_replicas": 2, "decoder_max_replicas": 6,
                     "decoder_num_cpus": 0.5})
    deployments = _deployments(app)
    assert set(deployments) == {"ReportAPI", "StudyDecoder", "ReportModel"}
    decoder, model = deployments["StudyDecoder"], deployments["ReportModel"]
    scaling = decoder._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 6)
    assert scaling.target_ongoing_requests == 1.0  # one study per decoder CPU
    assert scaling.look_back_period_s > 10  # Serve's metrics interval
    assert decoder.ray_actor_options["num_cpus"] == 0.5
    assert not decoder.ray_actor_options.get("num_gpus")
    assert decoder.max_ongoing_requests >= scaling.target_ongoing_requests
    assert decoder._deployment_config.user_config is None
    model_scaling = model._deployment_config.autoscaling_config
    assert (model_scaling.max_replicas, model_scaling.target_ongoing_requests) == (3, 8)
    # the ingress is bound to both: it asks the decoder first, then the model
    bound = [a._bound_deployment.name for a in deployments["ReportAPI"].init_args[:2]]
    assert bound == ["ReportModel", "StudyDecoder"]


def test_the_decoder_hands_the_header_to_the_ingress_only_when_asked():
    """The header of the reported file (for a DICOM SR) comes back beside the prepared
    study, never inside it: the model replica gets no patient identifiers."""
    from echo_ray.serving.decoder import StudyDecoder

    decoder = StudyDecoder.func_or_class({"checkpoint": "x"})
    files = [("file1", _dicom(2, "LL")), ("file2", _dicom(3))]
    plain = decoder._prepare(files, 56, False, False)
    kept = decoder._prepare(files, 56, True, True)
    assert plain.source_header is None and plain.study.source_header is None
    assert kept.study.source_header is None and kept.study.source_data is None
    header = pydicom.dcmread(io.BytesIO(kept.source_header))
    assert header.ViewPosition == "PA" and "PixelData" not in header  # the chosen file's
    assert set(kept.pngs) == {"image_png", "view_png"}
    bad = decoder._prepare([("file1", _dicom(8, "LL"))], 56, False, True)
    assert bad.study.error == "no_frontal_view" and bad.source_header is None


def test_model_id_is_the_run_name():
    assert model_name("/x/runs/dcd/model") == "dcd"
    assert model_name("s3://bucket/runs/echo/model/") == "echo"
    assert model_name("/ckpts/student-v3") == "student-v3"


# ----------------------------------------------------------------------------- routes


def test_open_routes_and_auth(server):
    assert requests.get(f"{server}/healthz").json() == {"status": "ok"}
    assert requests.get(f"{server}/readyz").json()["ready"] is True
    spec = requests.get(f"{server}/openapi.json").json()
    assert {"/v1/reports", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])
    page = requests.get(f"{server}/")
    assert page.status_code == 200 and 'id="file"' in page.text and "const AUTH = true" in page.text
    assert 'const MODES = ["one-step-fused", "ar", "multi-step", "one-step"];' in page.text
    for key in (None, "wrong-key", ""):
        r = requests.get(f"{server}/v1/models",
                         headers={} if key is None else {"Authorization": f"Bearer {key}"})
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert _post(server, _dicom(1), key="wrong").status_code == 401
    for key in (KEY, "other-key", FILE_KEY):
        r = requests.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    model = r.json()["data"][0]
    assert model["id"] == "run0"  # the run's name: tmp_path_factory's run0/model
    assert model["default_decoding"] == "one-step-fused" and "ar" in model["modes"]
    assert model["limits"]["max_files"] == 3 and model["max_batch_size"] == 8
    # a checkpoint that records no training stage: every mode, the default first
    assert model["modes"] == ["one-step-fused", "ar", "multi-step", "one-step"]
    assert sorted(model["trained_modes"]) == sorted(model["modes"])
    ModelList.model_validate(r.json())


def _local_refs(html: str) -> list[str]:
    """The URLs an HTML page loads (src, href, Swagger UI's `url:`)."""
    return re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)


def test_docs_load_swagger_ui_from_the_server_only(server):
    page = requests.get(f"{server}/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    refs = _local_refs(page.text)
    assert len(refs) == 4, refs  # css, favicon, js, the schema
    assert "//" not in "".join(refs) and all(ref.startswith("/") for ref in refs)
    assert not re.search(r"https?://", page.text)  # no CDN, no validator, nothing outside
    kinds = {}
    for ref in refs:
        r = requests.get(f"{server}{ref}")
        assert r.status_code == 200, ref
        kinds[r.headers["content-type"].split(";")[0]] = r.content
    js = kinds["application/javascript"]
    assert b"SwaggerUIBundle" in js and len(js) > 500_000  # the whole bundle
    assert b".swagger-ui" in kinds["text/css"]
    assert kinds["image/png"][:4] == b"\x89PNG"
    assert json.loads(kinds["application/json"])["openapi"].startswith("3.")
    # no CDN-backed page is left: ReDoc is off, unknown asset names are a 404
    for path in ("/redoc", "/docs/oauth2-redirect.html", "/docs/x.js"):
        r = requests.get(f"{server}{path}")
        assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_openapi_declares_bodies_auth_responses_and_errors(server):
    spec = requests.get(f"{server}/openapi.json").json()
    schemas, paths = spec["components"]["schemas"], spec["paths"]
    bearer = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    v1 = [(path, method, op) for path, ops in paths.items() for method, op in ops.items()
          if path.startswith("/v1/")]
    assert {(p, m) for p, m, _ in v1} == {("/v1/models", "get"), ("/v1/reports", "post"),
                                          ("/v1/reports/signoff", "post")}
    for path, _, op in v1:
        assert op["security"] == [{"bearerAuth": []}], path
        assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"}
    for path in ("/healthz", "/readyz", "/"):
        assert "security" not in paths[path]["get"]
    report = paths["/v1/reports"]["post"]
    body = report["requestBody"]["content"]
    assert body["application/dicom"]["schema"]["format"] == "binary"
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["items"]["format"] == \
        "binary"
    ok = report["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ReportBody"}
    assert {"application/fhir+json", "application/dicom", "text/event-stream"} <= set(ok)
    assert ok["application/dicom"]["schema"]["format"] == "binary"
    errors = {"400", "401", "404", "405", "406", "413", "415", "422", "503", "504"}
    assert errors <= set(report["responses"])
    for code in errors:
        ref = report["responses"][code]["content"]["application/json"]["schema"]["$ref"]
        assert ref.split("/")[-1] in ("ErrorBody", "StudyErrorBody"), code
    assert {"query": {"mode", "preview", "stream"}} == {
        "query": {p["name"] for p in report["parameters"]}}
    signoff = paths["/v1/reports/signoff"]["post"]
    assert signoff["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SignoffRequest"}
    assert list(signoff["responses"]["200"]["content"]) == ["application/fhir+json"]
    assert {"401", "415", "422"} <= set(signoff["responses"])
    request = schemas["SignoffRequest"]
    assert set(request["required"]) == {"draft", "findings", "impression", "decision",
                                        "signed_by"}
    assert request["properties"]["decision"]["enum"] == ["accept", "reject"]
    models = paths["/v1/models"]["get"]["responses"]
    assert models["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelList"}
    assert "503" in models
    # the response models are the ones the tests check real bodies against
    assert set(schemas["ReportBody"]["properties"]) == set(ReportBody.model_fields)
    assert {"used_file", "sentences", "accession_number", "study_date", "view_png"} <= set(
        schemas["ReportBody"]["properties"])
    assert set(schemas["Sentence"]["properties"]) == {"section", "text", "confidence",
                                                      "low_confidence"}
    assert set(schemas["ErrorBody"]["required"]) == {"error", "message", "request_id"}
    assert set(schemas["StudyErrorBody"]["properties"]) >= {"file_errors", "num_files"}


def _one_id(r) -> str:
    """The response's single x-request-id (Serve's proxy sets it; nothing may add a second)."""
    values = r.raw.headers.getlist("x-request-id")
    assert len(values) == 1 and "," not in values[0], values
    return values[0]


def test_every_error_is_in_the_project_format_with_the_header_request_id(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (requests.get(f"{server}/nowhere"), 404, "not_found"),
        (requests.post(f"{server}/v1/nope", headers=auth), 404, "not_found"),
        (requests.delete(f"{server}/v1/reports", headers=auth), 405, "method_not_allowed"),
        (requests.get(f"{server}/v1/reports", headers=auth), 405, "method_not_allowed"),
        (requests.post(f"{server}/healthz"), 405, "method_not_allowed"),
        (_post(server, _dicom(1), params={"preview": "maybe"}), 422, "invalid_request"),
        (requests.get(f"{server}/v1/models"), 401, "unauthorized"),
        (_post(server, b"x", content_type="text/plain"), 415, "unsupported_media_type"),
        (_post(server, _dicom(1), params={"mode": "beam"}), 400, "unsupported_mode"),
        (_post(server, b"\x00" * 400), 422, "not_dicom"),
    ]
    ids = set()
    for r, status, error in cases:
        body = r.json()
        assert (r.status_code, body["error"]) == (status, error), (r.request.url, body)
        model = StudyErrorBody if status == 422 and error != "invalid_request" else ErrorBody
        model.model_validate(body)
        assert body["message"] and body["request_id"] == _one_id(r)
        ids.add(body["request_id"])
    assert len(ids) == len(cases)  # one id per request
    assert "POST" in cases[2][0].headers["allow"]
    assert "preview" in cases[5][0].json()["message"]
    assert "detail" not in cases[0][0].json()
    # a caller's own id (e.g. from its gateway) is the one in the header and the body
    traced = _post(server, _dicom(1), key="wrong", **{"x-request-id": "trace-4711"})
    assert traced.status_code == 401 and traced.json()["request_id"] == "trace-4711"
    assert _one_id(traced) == "trace-4711"
    ok = _post(server, _dicom(1))
    assert ok.status_code == 200 and ok.json()["request_id"] == _one_id(ok)


def test_report_of_a_study(server):
    files = [("file", ("lateral.dcm", _dicom(2, "LL"))), ("file", ("front.dcm", _dicom(3)))]
    r = _post(server, files=files, content_type=None)
    assert r.status_code == 200, r.text
    body = r.json()
    ReportBody.model_validate(body)  # the OpenAPI schema's model, closed to extra fields
    assert body["study_instance_uid"] == STUDY and body["view_position"] == "PA"
    assert body["num_files"] == 2 and body["file_errors"] == []
    assert body["used_file"] == "file2"  # the second upload, the frontal one
    assert (body["accession_number"], body["study_date"]) == (ACCESSION, "2026-01-02T10:15:00")
    # (the tiny model's text may hold no sentence; decode tests check the confidences)
    for sentence in body["sentences"]:
        assert 0 <= sentence["confidence"] <= 1 and sentence["section"] in (
            "findings", "impression", "report")
        assert sentence["text"] in body["report"]
    assert set(body["labels"]) == set(CHEXPERT_LABELS)
    assert body["decoding"] == "one-step-fused" and body["num_forwards"] >= 2
    assert body["num_tokens"] <= 16 and body["latency_ms"] >= body["model_latency_ms"] > 0
    assert "<|" not in body["report"] and "image_png" not in body and "view_png" not in body
    # no patient identifiers and no uploaded file names unless configured
    assert "Doe" not in r.text and "MRN-000123" not in r.text and "front.dcm" not in r.text
    single = _post(server, _dicom(3))
    assert single.status_code == 200 and single.json()["report"] == body["report"]


def test_decoding_mode_per_request_and_preview(server):
    ar = _post(server, _dicom(4), params={"mode": "ar", "preview": "true"})
    fused = _post(server, _dicom(4))
    assert ar.status_code == 200 and ar.json()["decoding"] == "ar"
    assert ar.json()["num_forwards"] > fused.json()["num_forwards"]
    assert base64.b64decode(ar.json()["image_png"])[:8] == b"\x89PNG\r\n\x1a\n"
    image, view = (Image.open(io.BytesIO(base64.b64decode(ar.json()[k])))
                   for k in ("image_png", "view_png"))
    assert image.size == (112, 112)  # the model's input (the tiny preset's image size)
    assert view.size == (80, 96) and view.mode == "L"  # the file's own 96 x 80 pixels
    # the image the model read, pixel for pixel (8-bit), and the reader's view of the file
    read = prepare_study([("file1", _dicom(4))], size=112, modalities=RADIOGRAPH_MODALITIES,
                         with_view=True)
    for png, expected in ((image, read.image), (view, read.view)):
        assert np.array_equal(np.asarray(png),
                              (np.clip(expected, 0, 1) * 255).round().astype(np.uint8))
    bad = _post(server, _dicom(4), params={"mode": "beam"})
    assert bad.status_code == 400 and bad.json()["error"] == "unsupported_mode"
    assert "one-step-fused" in bad.json()["message"]  # it names the modes served


def test_fhir_diagnostic_report(server):
    r = _post(server, _dicom(5), Accept="application/fhir+json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    resource = r.json()
    parsed = DiagnosticReport.model_validate(resource)  # status and code are required
    assert parsed.status == "preliminary" and parsed.code.coding[0].code == "18748-4"
    assert resource["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{STUDY}"
    assert "subject" not in resource and "Doe" not in r.text


def _sr_items(ds) -> list:
    """Every content item of an SR's tree, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out += [item, *_sr_items(item)]
    return out


def test_dicom_structured_report(server):
    """`Accept: application/dicom`: the draft as one DICOM SR file, in the uploaded file's
    patient and study, about the uploaded image, with the JSON body's draft and UIDs; a
    stream of it is refused before any work."""
    from highdicom.sr import ComprehensiveSR

    from echo_ray.interop.sr import sr_uids

    upload = _dicom(5, SOPInstanceUID="1.2.826.0.1.3680043.8.498.75", PatientSex="F")
    source = pydicom.dcmread(io.BytesIO(upload), stop_before_pixels=True)
    r = _post(server, upload, Accept="application/dicom")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom" and r.content[128:132] == b"DICM"
    sr = pydicom.dcmread(io.BytesIO(r.content))
    ComprehensiveSR.from_dataset(sr)  # highdicom reads it back
    assert sr.Modality == "SR" and sr.SOPInstanceUID in r.headers["content-disposition"]
    for keyword in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID",
                    "AccessionNumber", "StudyDate", "StudyTime"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert (sr.PreliminaryFlag, sr.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    body = _post(server, upload).json()  # the same study as JSON: the same draft
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == sr_uids(body)
    text = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in _sr_items(sr)}
    assert text["Device Observer Name"].TextValue == body["model_id"] == "run0"
    assert text["Algorithm Version"].TextValue == body["model_version"]
    findings = body["findings"].strip() or (body["report"].strip()
                                            if not body["impression"].strip() else "")
    if findings:
        assert text["Finding"].TextValue == findings
    if body["impression"].strip():
        assert text["Impression"].TextValue == body["impression"].strip()
    assert "Finding" in text or "Impression" in text
    streamed = _post(server, upload, Accept="application/dicom", params={"stream": "true"})
    assert streamed.status_code == 406 and streamed.json()["error"] == "not_acceptable"
    assert "stream" in streamed.json()["message"]
    ErrorBody.model_validate(streamed.json())


def _signoff(url, body, key=KEY, content_type="application/json"):
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{url}/v1/reports/signoff", data=data, headers=headers, timeout=60)


def test_signoff_accepts_or_rejects_a_draft_as_a_fhir_report(server):
    draft = _post(server, _dicom(15), params={"preview": "true"}).json()
    edited = {"draft": draft, "findings": "Small left pleural effusion.",
              "impression": "Left pleural effusion.", "decision": "accept",
              "signed_by": "Dr. R. Reader"}
    r = _signoff(server, edited)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/fhir+json"
    final = r.json()
    assert DiagnosticReport.model_validate(final).status == "final"
    signed, machine = final["presentedForm"]
    assert base64.b64decode(signed["data"]).decode() == (
        "FINDINGS: Small left pleural effusion.\n\nIMPRESSION: Left pleural effusion.")
    assert base64.b64decode(machine["data"]).decode() == draft["report"]  # kept, unedited
    assert machine["extension"][0]["valueCoding"]["code"] == "AIAST"
    assert final["conclusion"] == "Left pleural effusion."
    assert final["resultsInterpreter"] == [{"display": "Dr. R. Reader"}]
    labels = {o["code"]["text"]: o["valueCodeableConcept"]["text"] for o in final["contained"]}
    assert labels == {"Pleural Effusion": "present"}  # read from the signed text
    assert final["identifier"][0]["value"] == ACCESSION
    rejected = _signoff(server, {**edited, "decision": "reject"})
    assert rejected.status_code == 200 and rejected.json()["status"] == "cancelled"
    # auth as the other /v1 routes, and a bad body is a 422 in the project's format
    assert _signoff(server, edited, key=None).status_code == 401
    assert _signoff(server, edited, key="wrong").json()["error"] == "unauthorized"
    bad_cases = [
        ({**edited, "decision": "approve"}, "decision"),
        ({**edited, "signed_by": " "}, "signed_by"),
        ({**edited, "draft": {"error": "not_dicom", "message": "m"}}, "draft"),
        ({k: v for k, v in edited.items() if k != "findings"}, "findings"),
        (b"{not json", "not JSON"),
    ]
    for body, field in bad_cases:
        bad = _signoff(server, body)
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_signoff", bad.text
        assert field in bad.json()["message"] and bad.json()["request_id"] == _one_id(bad)
    wrong_type = _signoff(server, edited, content_type="text/plain")
    assert (wrong_type.status_code, wrong_type.json()["error"]) == (415,
                                                                    "unsupported_media_type")
    assert "Doe" not in r.text and "MRN-000123" not in r.text


def test_a_server_offers_the_modes_its_checkpoint_was_trained_for(server, tmp_path_factory):
    """Checkpoints that record their stage: a RAD teacher is served in multi-step only (its
    default, though decoding.mode says one-step-fused); an AR model started with an explicit
    list offers that list."""
    from ray import serve

    def checkpoint_of(stage: str) -> str:
        config = EchoConfig()
        config.train.stage = stage
        folder = tmp_path_factory.mktemp(stage) / "model"
        return str(save_checkpoint(trained_model(), folder, config))

    common = {"num_cpus": 0.25, "max_new_tokens": 16, "max_replicas": 1, **DECODER}
    serve.run(build_app({**common, "checkpoint": checkpoint_of("rad")}), name="rad",
              route_prefix="/rad")
    serve.run(build_app({**common, "checkpoint": checkpoint_of("ar"),
                         "modes": ["ar", "multi-step"]}), name="ar", route_prefix="/ar")
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        for name, modes, default, trained in (
            ("rad", ["multi-step"], "multi-step", ["multi-step"]),
            ("ar", ["ar", "multi-step"], "ar", ["ar"]),
        ):
            url = f"{server}/{name}"
            model = requests.get(f"{url}/v1/models", headers=auth).json()["data"][0]
            assert (model["modes"], model["default_decoding"], model["trained_modes"]) == (
                modes, default, trained), name
            page = requests.get(f"{url}/")
            assert f"const MODES = {json.dumps(modes)};" in page.text
            plain = _post(url, _dicom(16))
            assert plain.status_code == 200 and plain.json()["decoding"] == default
            bad = _post(url, _dicom(16), params={"mode": "one-step-fused"})
            assert (bad.status_code, bad.json()["error"]) == (400, "unsupported_mode")
            assert all(m in bad.json()["message"] for m in modes)
        assert _post(f"{server}/ar", _dicom(16), params={"mode": "multi-step"}).json()[
            "decoding"] == "multi-step"  # the explicit list: not a mode it was trained for
    finally:
        serve.delete("rad")
        serve.delete("ar")


def test_streaming_sends_the_report_block_by_block(server):
    r = _post(server, _dicom(12), Accept="text/event-stream")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = []
    for chunk in r.text.strip().split("\n\n"):
        kind, data = chunk.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        events.append((kind[len("event: "):], json.loads(data[len("data: "):])))
    *blocks, (last, report) = events
    assert last == "report" and blocks and all(kind == "block" for kind, _ in blocks)
    assert [b["block"] for _, b in blocks] == list(range(1, len(blocks) + 1))
    plain = _post(server, _dicom(12)).json()
    assert report["report"] == plain["report"] and report["batch_size"] == 1
    assert report.pop("event") == "report"
    ReportBody.model_validate(report)  # the same body as a plain request's
    assert set(report) == set(plain) and report["sentences"] == plain["sentences"]
    assert report["request_id"] == _one_id(r)
    for _, block in blocks:  # each block's text is the start of the final report
        assert report["report"].startswith(block["text"])
    assert blocks[-1][1]["text"] == report["report"]
    with_image = _post(server, _dicom(12), params={"stream": "true", "preview": "true"})
    last = with_image.text.strip().split("\n\n")[-1].split("\n")[1][len("data: "):]
    assert base64.b64decode(json.loads(last)["image_png"])[:4] == b"\x89PNG"
    assert base64.b64decode(json.loads(last)["view_png"])[:4] == b"\x89PNG"
    bad = _post(server, b"\x00" * 400, params={"stream": "true"})
    assert bad.status_code == 422 and bad.json()["error"] == "not_dicom"


def test_the_model_replica_gets_prepared_studies_only(server):
    """The decoder reads the DICOM files: a study it cannot prepare is a 4xx and never
    reaches the model replica, a good one reaches it as a `PreparedStudy` without its DICOM
    bytes, and the replica refuses DICOM bytes outright."""
    from ray import serve

    model = serve.get_deployment_handle("ReportModel", app_name="echo-ray")

    def studies() -> int:  # the studies the (one) model replica was given
        return model.stats.remote().result()["studies"]

    before = studies()
    bad = [
        ({"data": b"\x00" * 400}, "not_dicom"),
        ({"data": _truncated()}, "truncated"),
        ({"data": _dicom(8, "LL")}, "no_frontal_view"),
        ({"data": _dicom(17, Modality="CT")}, "non_radiograph_modality"),
        ({"files": [("f", ("a", _dicom(9))), ("f", ("b", _dicom(10, study="1.2.3")))],
          "content_type": None}, "mixed_studies"),
        ({"data": b"\x00" * 400, "params": {"stream": "true"}}, "not_dicom"),
        ({"data": _dicom(8, "LL"), "Accept": "application/fhir+json"}, "no_frontal_view"),
        ({"data": _dicom(8, "LL"), "Accept": "application/dicom"}, "no_frontal_view"),
    ]
    for kwargs, error in bad:
        r = _post(server, **kwargs)
        assert (r.status_code, r.json()["error"]) == (422, error), r.text
    assert studies() == before  # not one of them reached the model
    assert _post(server, _dicom(16)).status_code == 200
    assert studies() == before + 1
    read = prepare_study([("file1", _dicom(16))], size=112)
    assert read.source_data is not None
    for given in ([("file1", _dicom(16))], read):  # DICOM bytes, in any form: refused
        with pytest.raises(Exception, match="PreparedStudy without its DICOM bytes"):
            model.report.remote(given, "one-step-fused").result()
    assert studies() == before + 1
    assert model.report.remote(read.shipped(), "one-step-fused").result()["used_file"] == \
        "file1"


def _truncated() -> bytes:
    data = _dicom(6)
    return data[: len(data) - 5000]


BAD_INPUTS = [
    # (name, kwargs for _post, status, error)
    ("wrong media type", {"data": b"hello", "content_type": "text/plain"}, 415,
     "unsupported_media_type"),
    ("no media type", {"data": b"hello", "content_type": None}, 415, "unsupported_media_type"),
    ("empty body", {"data": b""}, 422, "no_files"),
    ("not dicom", {"data": b"\x89PNG" + b"\x00" * 400}, 422, "not_dicom"),
    ("truncated dicom", {"data": _truncated()}, 422, "truncated"),
    ("not a radiograph", {"data": _dicom(7, Modality="CT")}, 422, "non_radiograph_modality"),
    ("lateral only", {"data": _dicom(8, "LL")}, 422, "no_frontal_view"),
    ("two studies", {"files": [("f", ("a", _dicom(9))), ("f", ("b", _dicom(10, study="1.2.3")))],
                     "content_type": None}, 422, "mixed_studies"),
    ("too large", {"data": b"\x00" * 300_000}, 413, "too_large"),
    ("too many files", {"files": [("f", (f"{i}", _dicom(i))) for i in range(4)],
                        "content_type": None}, 413, "too_many_files"),
    ("broken multipart", {"data": b"--xyz\r\nContent-Disposition: form-data\r\n\r\nabc",
                          "content_type": "multipart/form-data; boundary=nope"}, None, None),
]


@pytest.mark.parametrize(("name", "kwargs", "status", "error"), BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx_and_the_next_request_succeeds(server, name, kwargs, status,
                                                                  error):
    r = _post(server, **kwargs)
    body = r.json()
    if status is None:  # a form that parses to nothing or fails to parse: a 4xx, never 500
        assert r.status_code in (400, 422) and body["error"] in ("bad_multipart", "no_files")
    else:
        assert (r.status_code, body["error"]) == (status, error), body
    assert body["message"] and "Doe" not in r.text
    assert _post(server, _dicom(11)).status_code == 200


def test_timeout_phi_on_request_and_the_insecure_dev_mode(server, checkpoint, monkeypatch):
    """Two more apps on the same Serve: a 504 when no report comes in time; with
    include_phi and insecure (no keys), identifiers and file names come back, no key needed."""
    from ray import serve

    monkeypatch.delenv("ECHO_RAY_API_KEYS")
    common = {"checkpoint": checkpoint, "num_cpus": 0.25, "max_new_tokens": 16,
              "max_replicas": 1, "insecure": True, **DECODER}
    # a lone request waits 2 s for its batch to fill: longer than the 0.5 s allowed
    serve.run(build_app({**common, "batch_wait_timeout_s": 2.0, "request_timeout_s": 0.5}),
              name="slow", route_prefix="/slow")
    serve.run(build_app({**common, "include_phi": True, "decoding": "ar",
                         "modes": ["one-step-fused", "ar"]}), name="dev", route_prefix="/dev")
    try:
        slow = _post(f"{server}/slow", _dicom(13), key=None)
        assert slow.status_code == 504 and slow.json()["error"] == "timeout"
        files = [("file", ("front.dcm", _dicom(13)))]
        dev = _post(f"{server}/dev", files=files, content_type=None, key=None)
        assert dev.status_code == 200, dev.text
        body = dev.json()
        assert body["patient_name"] == "Doe^Jane" and body["patient_id"] == "MRN-000123"
        assert body["source_file"] == "front.dcm" and body["used_file"] == "file1"
        ReportBody.model_validate(body)
        docs = requests.get(f"{server}/dev/docs").text  # under a route prefix
        refs = _local_refs(docs)
        assert refs and all(ref.startswith("/dev/") for ref in refs), refs
        assert all(requests.get(f"{server}{ref}").status_code == 200 for ref in refs)
        page = requests.get(f"{server}/dev/")
        assert "const AUTH = false" in page.text  # the page hides its key field
        assert 'const MODES = ["ar", "one-step-fused"];' in page.text  # its default first
    finally:
        serve.delete("slow")
        serve.delete("dev")


def test_a_model_in_s3_is_served(server, checkpoint, s3_endpoint):
    """A replica downloads an s3:// run folder's model into its own folder and serves it:
    the same report as the local copy of the same weights, the run's name as model id."""
    import boto3
    from ray import serve

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="models")
    for path in Path(checkpoint).rglob("*"):
        if path.is_file():
            key = f"runs/dcd/model/{path.relative_to(checkpoint).as_posix()}"
            s3.upload_file(str(path), "models", key)
    serve.run(build_app({"checkpoint": "s3://models/runs/dcd", "s3_endpoint": s3_endpoint,
                         "num_cpus": 0.25, "max_new_tokens": 16, "max_replicas": 1,
                         **DECODER}),
              name="s3", route_prefix="/s3")
    try:
        remote, local = _post(f"{server}/s3", _dicom(21)), _post(server, _dicom(21))
        assert remote.status_code == 200, remote.text
        assert remote.json()["model_id"] == "dcd"
        assert remote.json()["report"] == local.json()["report"]
    finally:
        serve.delete("s3")


def test_no_patient_identifiers_in_the_serve_logs(server):
    """The apps above saw DICOMs with a patient name and ID: none reached a log line of
    the default app (the dev app, which returns them, logs the same lines without them)."""
    assert _post(server, _dicom(14)).status_code == 200
    logs = Path(_session_dir()) / "logs"
    text = "".join(f.read_text(errors="replace") for f in logs.rglob("*")
                   if f.is_file() and ("serve" in f.name.lower() or "worker" in f.name))
    assert "ReportAPI" in text  # the replicas' logs are there
    assert "Doe^Jane" not in text and "MRN-000123" not in text


def _session_dir() -> str:
    """This cluster's session folder (no public API gives it to a driver)."""
    import ray

    return ray._private.worker.global_worker.node.get_session_dir_path()


def test_concurrent_requests_are_batched(server):
    results = [None] * 8

    def call(i):
        results[i] = _post(server, _dicom(20 + i))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    assert max(r.json()["batch_size"] for r in results) > 1


def test_a_killed_replica_is_replaced_and_the_service_answers_again(server):
    import ray

    def replicas():  # Serve names its replica actors SERVE_REPLICA::<app>#<deployment>#<id>
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::echo-ray#ReportModel#")}

    (victim,) = replicas()
    statuses, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                statuses.append(_post(server, _dicom(30)).status_code)
            except requests.RequestException:
                statuses.append(-1)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        alive = replicas()
        if alive and victim not in alive:
            break
        time.sleep(0.5)
    else:
        pytest.fail("no replacement replica within 90 s")
    # the service answers again: wait for success from the new replica, then a clean run
    deadline = time.time() + 60
    while _post(server, _dicom(31)).status_code != 200:
        assert time.time() < deadline, "the service did not answer after the replica restart"
        time.sleep(0.5)
    n = len(statuses)
    time.sleep(2.0)
    stop.set()
    for w in workers:
        w.join()
    assert statuses[n:] and all(s == 200 for s in statuses[n:]), statuses[n:]
    # requests caught by the kill were told to retry (503), none got a 500
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert requests.get(f"{server}/readyz").json()["ready"] is True


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_review_page_in_headless_chromium(server, tmp_path):
    """The review page on the real app: type the key, choose a DICOM, submit: the draft
    streams in, then its sections, the study's identity, the image the model read and the
    larger view; accept signs it (FHIR final); a wrong key clears the study and shows the
    401. The page itself is tested in depth against a stub API in test_review_page.py."""
    sync_api = pytest.importorskip("playwright.sync_api")
    dicom = tmp_path / "study.dcm"
    dicom.write_bytes(_dicom(40))
    shot = tmp_path / "review_page.png"
    auth = {"Authorization": f"Bearer {KEY}"}
    model = requests.get(f"{server}/v1/models", headers=auth, timeout=30).json()["data"][0]
    expected = _post(server, _dicom(40)).json()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(server)
        assert page.locator("#submit").is_disabled()
        modes = page.eval_on_selector_all("#mode option", "els => els.map(e => e.textContent)")
        default = model["default_decoding"]
        assert modes == [f"server default ({default})",
                         *(m for m in model["modes"] if m != default)]
        page.fill("#key", KEY)
        page.set_input_files("#file", str(dicom))
        page.click("#submit")
        page.wait_for_function("['draft', 'error'].includes("
                               "document.getElementById('review-state').dataset.state)",
                               timeout=30_000)
        assert page.locator("#error").is_hidden()
        assert page.inner_text("#review-state").startswith("DRAFT, not reviewed")
        assert page.get_attribute("#model-image", "src").startswith("data:image/png;base64,")
        natural = page.evaluate("document.getElementById('model-image').naturalWidth")
        assert natural == 112  # the tiny preset's image size: the model's input was shown
        page.wait_for_function("!document.getElementById('viewer-empty').checkVisibility()")
        findings = expected["findings"] or ("" if expected["impression"] else expected["report"])
        assert page.evaluate("document.getElementById('findings').textContent") == findings
        assert page.evaluate("document.getElementById('impression').textContent") == \
            (expected["impression"] or "")
        assert page.inner_text("#study-uid") == STUDY
        assert page.inner_text("#study-view") == "PA"
        assert page.inner_text("#files li[data-status=used] .file-name") == "study.dcm"
        status = page.inner_text("#status")  # the page streams: blocks, then the report
        assert default in status and "blocks streamed" in status
        assert " 0 blocks" not in status
        page.fill("#signed-by", "Dr Test")
        page.click("#accept")
        page.wait_for_function("['final', 'rejected'].includes(document.getElementById("
                               "'review-state').dataset.state) || "
                               "!document.getElementById('signoff-error').hidden")
        assert page.locator("#signoff-error").is_hidden()
        assert page.inner_text("#review-state").startswith("Final, signed by Dr Test")
        assert "status: final" in page.inner_text("#signoff-result")
        page.screenshot(path=str(shot), full_page=True)
        # a wrong key: the server's error, and nothing of the study left on the page
        page.fill("#key", "wrong")
        page.click("#submit")
        page.wait_for_function("document.getElementById('error').textContent.includes('401')")
        assert page.get_attribute("#model-image", "src") is None
        assert page.inner_text("#study-uid") == "—"
        assert page.evaluate("document.getElementById('findings').textContent") == ""
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("ECHO_RAY_SCREENSHOT_DIR"):  # to look at it: README "Serving"
        shutil.copy(shot, os.environ["ECHO_RAY_SCREENSHOT_DIR"])


def test_serve_config_and_cluster_yaml_are_valid_for_ray():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "echo_ray.serving.app:build_app"
    AppArgs.parse(app.args)  # every arg is a known option
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"ReportModel", "StudyDecoder", "ReportAPI"}
    model = deployments["ReportModel"]
    assert model.user_config["max_batch_size"] <= model.max_ongoing_requests
    assert model.autoscaling_config["min_replicas"] <= model.autoscaling_config["max_replicas"]
    decoder = deployments["StudyDecoder"]  # CPU only, scaled on its own
    assert decoder.autoscaling_config["min_replicas"] <= decoder.autoscaling_config[
        "max_replicas"]
    assert not decoder.ray_actor_options.num_gpus
    # The defaults are the file's, and one replica of each deployment fits a 2-core machine
    # (a decoder of 1 CPU beside a model of 1 left the ingress unschedulable there: the
    # README's `echo-ray serve` never became ready).
    defaults = ServeConfig()
    assert model.ray_actor_options.num_cpus == defaults.num_cpus
    assert decoder.ray_actor_options.num_cpus == defaults.decoder_num_cpus
    ingress = deployments["ReportAPI"].ray_actor_options.num_cpus
    assert defaults.num_cpus + defaults.decoder_num_cpus + ingress <= 2

    cluster = prepare_config(yaml.safe_load((root / "cluster.yaml").read_text()))
    validate_config(cluster)
    assert cluster["available_node_types"]["gpu"]["min_workers"] == 0
    setup = " ".join(cluster["setup_commands"])
    assert "torch==2.13.0" in setup and "-c constraints.txt" in setup


def test_serve_command_refuses_unsafe_starts(monkeypatch, capsys, checkpoint):
    from echo_ray.cli import build_parser, command_config, main

    monkeypatch.delenv("ECHO_RAY_API_KEYS", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--checkpoint", checkpoint, "--insecure", "--host", "0.0.0.0"])
    assert exc.value.code == 2 and "refused on 0.0.0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--checkpoint", checkpoint])
    assert exc.value.code == 2 and "no API keys configured" in capsys.readouterr().err
    args = build_parser("serve").parse_args(
        ["--checkpoint", checkpoint, "--max-batch-size", "4", "--batch-wait-ms", "20"])
    parsed = AppArgs.parse(app_args(command_config("serve", args), checkpoint))
    assert (parsed.serve.max_batch_size, parsed.serve.batch_wait_timeout_s) == (4, 0.02)
    assert parsed.config.decoding == command_config("serve", args).decoding
