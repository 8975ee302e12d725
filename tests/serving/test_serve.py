"""The HTTP endpoint on a real Ray Serve (the session's local Ray), a tiny checkpoint."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from helpers.tiny_dvlm import trained_model

from echo_ray.data.storage import model_name
from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.serving.app import build_app
from echo_ray.serving.options import AppArgs, app_args, load_api_keys
from echo_ray.synth.dicom_writer import write_dicom
from echo_ray.text.labels import CHEXPERT_LABELS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY = "test-key-1"
FILE_KEY = "file-key-2"
STUDY = "1.2.826.0.1.3680043.8.498.7"


def _dicom(seed: int, view: str | None = "PA", study: str = STUDY, **attrs) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4096, (96, 80), dtype=np.uint16)
    attrs = {"Modality": "DX", "StudyInstanceUID": study, "PatientName": "Doe^Jane",
             "PatientID": "MRN-000123", **attrs}
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
        "batch_wait_timeout_s": 0.5, "max_batch_size": 8,
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
    with pytest.raises(ValueError, match="is not one of modes"):
        AppArgs.parse({"checkpoint": "x", "modes": ["ar"]})
    with pytest.raises(ValueError, match="http_options"):
        AppArgs.parse({"checkpoint": "x", "port": 9000})
    with pytest.raises(ValueError, match="decoding.threshold"):
        AppArgs.parse({"checkpoint": "x", "threshold": 2.0})


def test_keys_come_from_the_environment_and_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ECHO_RAY_API_KEYS", " a, b ,,")
    keys = tmp_path / "k"
    keys.write_text("c\n# comment\n d # note\n")
    serve = AppArgs.parse({"checkpoint": "x", "api_keys_file": str(keys)}).serve
    assert load_api_keys(serve) == list("abcd")


def test_the_ingress_module_does_not_import_torch():
    """The ingress replica imports these modules only to parse and route: no torch, no
    transformers (hundreds of MB per ingress process); the model replicas import them."""
    code = (
        "import sys, echo_ray.serving.ingress, echo_ray.serving.app; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


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


def test_report_of_a_study(server):
    files = [("file", ("lateral.dcm", _dicom(2, "LL"))), ("file", ("front.dcm", _dicom(3)))]
    r = _post(server, files=files, content_type=None)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["study_instance_uid"] == STUDY and body["view_position"] == "PA"
    assert body["num_files"] == 2 and body["file_errors"] == []
    assert set(body["labels"]) == set(CHEXPERT_LABELS)
    assert body["decoding"] == "one-step-fused" and body["num_forwards"] >= 2
    assert body["num_tokens"] <= 16 and body["latency_ms"] >= body["model_latency_ms"] > 0
    assert "<|" not in body["report"] and "image_png" not in body
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
    bad = _post(server, _dicom(4), params={"mode": "beam"})
    assert bad.status_code == 400 and bad.json()["error"] == "unsupported_mode"


def test_fhir_diagnostic_report(server):
    r = _post(server, _dicom(5), Accept="application/fhir+json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/fhir+json"
    resource = r.json()
    parsed = DiagnosticReport.model_validate(resource)  # status and code are required
    assert parsed.status == "preliminary" and parsed.code.coding[0].code == "18748-4"
    assert resource["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{STUDY}"
    assert "subject" not in resource and "Doe" not in r.text


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
    for _, block in blocks:  # each block's text is the start of the final report
        assert report["report"].startswith(block["text"])
    assert blocks[-1][1]["text"] == report["report"]
    with_image = _post(server, _dicom(12), params={"stream": "true", "preview": "true"})
    last = with_image.text.strip().split("\n\n")[-1].split("\n")[1][len("data: "):]
    assert base64.b64decode(json.loads(last)["image_png"])[:4] == b"\x89PNG"
    bad = _post(server, b"\x00" * 400, params={"stream": "true"})
    assert bad.status_code == 422 and bad.json()["error"] == "not_dicom"


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
              "max_replicas": 1, "insecure": True}
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
        assert body["source_file"] == "front.dcm"
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
                         "num_cpus": 0.25, "max_new_tokens": 16, "max_replicas": 1}),
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
    """Type the key, choose a DICOM, click: the image and the report appear, Copy works."""
    sync_api = pytest.importorskip("playwright.sync_api")
    dicom = tmp_path / "study.dcm"
    dicom.write_bytes(_dicom(40))
    shot = tmp_path / "review_page.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(server)
        assert page.locator("#submit").is_disabled()
        modes = page.eval_on_selector_all("#mode option", "els => els.map(e => e.textContent)")
        assert modes == ["server default (one-step-fused)", "ar", "multi-step", "one-step"]
        page.fill("#key", KEY)
        page.set_input_files("#file", str(dicom))
        page.click("#submit")
        # block events fill the report first; the final event enables Copy and sets the image
        page.wait_for_function("!document.getElementById('copy').disabled "
                               "|| document.getElementById('error').textContent !== ''",
                               timeout=30_000)
        assert page.locator("#error").inner_text() == ""
        assert page.get_attribute("#image", "src").startswith("data:image/png;base64,")
        natural = page.evaluate("document.getElementById('image').naturalWidth")
        assert natural == 112  # the tiny preset's image size: the model's input was shown
        report = page.input_value("#report")
        assert report == _post(server, _dicom(40)).json()["report"]
        status = page.inner_text("#status")  # the page streams: blocks, then the report
        assert "one-step-fused" in status and "blocks streamed" in status
        assert " 0 blocks" not in status
        page.click("#copy")
        page.wait_for_function("document.getElementById('copied').textContent === 'copied'")
        page.screenshot(path=str(shot), full_page=True)
        # a wrong key shows the server's error on the page
        page.fill("#key", "wrong")
        page.click("#submit")
        page.wait_for_function("document.getElementById('error').textContent.includes('401')")
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
    assert set(deployments) == {"ReportModel", "ReportAPI"}
    model = deployments["ReportModel"]
    assert model.user_config["max_batch_size"] <= model.max_ongoing_requests
    assert model.autoscaling_config["min_replicas"] <= model.autoscaling_config["max_replicas"]

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
