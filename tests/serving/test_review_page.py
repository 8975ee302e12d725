"""The review page (`GET /`) in headless Chromium against a stub of the HTTP API.

The stub (http.server on loopback, started here) answers as the contract says: streamed
`block` events then a `report` event, a 422 with `file_errors`, a 200 with a per-file error,
sentences with one of low confidence, and a sign-off that returns a FHIR DiagnosticReport.
Screenshots of the key states go to $ECHO_RAY_SCREENSHOT_DIR (docs/review_page for the
committed ones), else to a temporary folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echo_ray.serving.page import render_review_page

KEY = "stub-key"
MODES = ["one-step-fused", "one-step"]
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.111", "1.2.826.0.1.3680043.8.498.222"
GOOD_A, GOOD_B, NOT_DICOM = b"DICM-STUDY-A", b"DICM-STUDY-B", b"plain text, no DICOM"
LOW = "There is a small left pleural effusion."
EDIT = " Edited by the reader."

needs_browser = pytest.mark.skipif(shutil.which("chromium") is None,
                                   reason="Debian chromium not installed")


def _png(rows: int, columns: int, seed: int) -> str:
    """A grayscale PNG (base64): a diagonal ramp with a bright disc, deterministic."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    img = (yy + xx) * 200 // (rows + columns)
    img[(yy - rows // 2) ** 2 + (xx - columns // 3) ** 2 < (rows // 6) ** 2] = 230 - 40 * seed
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8), mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _labels(**values) -> dict:
    names = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
             "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
             "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
    return {n: values.get(n.replace(" ", "_")) for n in names}


def _sentence(section: str, text: str, confidence: float) -> dict:
    return {"section": section, "text": text, "confidence": confidence,
            "low_confidence": confidence < 0.5}


def _report(study: str) -> dict:
    """A /v1/reports body (with preview images) for study A or B."""
    if study == "A":
        # whitespace as a model writes it: the sentences' text is normalised, still found
        findings = "The heart size is normal.  There is a small  left pleural\neffusion. " \
            "No pneumothorax."
        impression = "Small left pleural effusion."
        body = {
            "study_instance_uid": STUDY_A, "view_position": "PA", "accession_number": "ACC-0042",
            "study_date": "2024-03-05T14:30:00", "findings": findings, "impression": impression,
            "sentences": [_sentence("findings", "The heart size is normal.", 0.97),
                          _sentence("findings", LOW, 0.41),
                          _sentence("findings", "No pneumothorax.", 0.83),
                          _sentence("impression", impression, 0.66)],
            "labels": _labels(Pleural_Effusion=1.0, Pneumothorax=0.0, Cardiomegaly=0.0,
                              Support_Devices=-1.0),
            "image_png": _png(112, 112, 0), "view_png": _png(300, 240, 0),
        }
    else:
        findings = "Lungs are clear. Cardiomediastinal silhouette within normal limits."
        impression = "No acute cardiopulmonary process."
        body = {
            "study_instance_uid": STUDY_B, "view_position": "AP", "accession_number": None,
            "study_date": "2023-11-20", "findings": findings, "impression": impression,
            "sentences": [_sentence("findings", "Lungs are clear.", 0.95),
                          _sentence("findings", "Cardiomediastinal silhouette within normal "
                                    "limits.", 0.91),
                          _sentence("impression", impression, 0.93)],
            "labels": _labels(No_Finding=1.0),
            "image_png": _png(112, 112, 1), "view_png": _png(200, 260, 1),
        }
    return {**body, "series_instance_uid": body["study_instance_uid"] + ".1",
            "sop_instance_uid": body["study_instance_uid"] + ".1.1",
            "report": f"FINDINGS: {body['findings']}\n\nIMPRESSION: {body['impression']}",
            "model_id": "stub", "model_version": "0.0.0", "decoding": "one-step-fused",
            "num_tokens": 40, "num_forwards": 5, "tokens_per_forward": 8.0,
            "request_id": "req-" + study, "model_latency_ms": 1.0, "latency_ms": 2.0,
            "batch_size": 1}


class Stub:
    """The API the page talks to, with what it was sent. `gate` holds study B's stream
    after its first blocks until the test sets it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.held_done = threading.Event()  # a held stream has ended
        self.signoffs: list[dict] = []
        self.requests: list[str] = []
        self.url = ""


def _parts(body: bytes, content_type: str) -> list[bytes]:
    boundary = re.search(r"boundary=\"?([^\";]+)", content_type).group(1).encode()
    return [p for p in body.split(b"--" + boundary)[1:-1]]


def _handler(stub: Stub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _json(self, status: int, body: dict, media_type="application/json") -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", media_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", str(body.get("request_id", "r")))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            stub.requests.append(self.path)
            if self.path != "/":
                return self._json(404, {"error": "not_found", "message": self.path,
                                        "request_id": "r404"})
            html = render_review_page(modes=MODES, auth=True).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def do_POST(self) -> None:
            stub.requests.append(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._json(401, {"error": "unauthorized", "message": "a valid API key "
                                        "is required", "request_id": "r401"})
            if self.path == "/v1/reports/signoff":
                return self._signoff(json.loads(body))
            assert self.path.startswith("/v1/reports?") and "stream=true" in self.path
            parts = _parts(body, self.headers["Content-Type"])
            file_errors = [{"file": f"file{i + 1}", "error": "not_dicom",
                            "message": "no DICOM preamble"}
                           for i, p in enumerate(parts) if NOT_DICOM in p]
            good = [(i, "A" if GOOD_A in p else "B") for i, p in enumerate(parts)
                    if GOOD_A in p or GOOD_B in p]
            if not good:
                return self._json(422, {"error": "no_usable_image", "message": "no file of the "
                                        "study could be read", "request_id": "r422",
                                        "file_errors": file_errors, "num_files": len(parts)})
            index, study = good[0]
            report = {**_report(study), "num_files": len(parts), "file_errors": file_errors,
                      "used_file": f"file{index + 1}"}
            self._stream(report, hold=study == "B")

        def _stream(self, report: dict, hold: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            text = report["report"]
            try:
                for block in (1, 2):
                    event = {"event": "block", "block": block,
                             "text": text[: len(text) * block // 3]}
                    self.wfile.write(f"event: block\ndata: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                if hold:
                    stub.gate.wait(60)
                event = {"event": "report", **report}
                self.wfile.write(f"event: report\ndata: {json.dumps(event)}\n\n".encode())
            except (BrokenPipeError, ConnectionResetError):  # the page moved on
                pass
            finally:
                if hold:
                    stub.held_done.set()

        def _signoff(self, payload: dict) -> None:
            stub.signoffs.append(payload)
            accept = payload["decision"] == "accept"
            fhir = {"resourceType": "DiagnosticReport", "status": "final" if accept
                    else "cancelled", "conclusion": payload["impression"],
                    "resultsInterpreter": [{"display": payload["signed_by"]}],
                    "issued": "2026-01-02T03:04:05Z",
                    "presentedForm": [{"contentType": "text/plain", "data": base64.b64encode(
                        payload["findings"].encode()).decode()}]}
            self._json(200, fhir, media_type="application/fhir+json")

    return Handler


@pytest.fixture(scope="module")
def stub():
    state = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    state.gate.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if shutil.which("chromium") is None:
        pytest.skip("Debian chromium not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """shot(page, name): a full-page screenshot, <dir>/<name>.png."""
    out = Path(os.environ.get("ECHO_RAY_SCREENSHOT_DIR") or tmp_path_factory.mktemp("shots"))
    out.mkdir(parents=True, exist_ok=True)

    def shot(page, name: str) -> Path:
        path = out / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000
        return path

    return shot


@pytest.fixture
def open_page(browser, stub):
    """open_page(width=1280) -> a fresh tab on the page, the key typed in. Requests to
    anywhere but the stub are refused and listed in `open_page.outside`."""
    contexts, outside = [], []

    def refuse(route):
        outside.append(route.request.url)
        route.abort()

    def open_(width: int = 1280, key: bool = True):
        context = browser.new_context(viewport={"width": width, "height": 900},
                                      accept_downloads=True)
        contexts.append(context)
        context.route(re.compile(r"^(?!" + re.escape(stub.url) + r"[/?]|data:|blob:).*"),
                      refuse)
        page = context.new_page()
        page.goto(stub.url)
        if key:
            page.fill("#key", KEY)
        return page

    open_.outside = outside
    yield open_
    for context in contexts:
        context.close()


def _submit(page, *files: tuple[str, bytes]) -> None:
    page.set_input_files("#file", files=[
        {"name": name, "mimeType": "application/dicom", "buffer": data} for name, data in files])
    page.click("#submit")


def _wait_state(page, state: str) -> None:
    page.wait_for_function(f"document.getElementById('review-state').dataset.state === '{state}'")


def _canvas(page) -> str:
    return page.evaluate("document.getElementById('viewer').toDataURL()")


def _canvas_blank(page) -> bool:
    return page.evaluate("""() => {
        const c = document.getElementById('viewer');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 4; i < d.length; i += 4)
            if (d[i] !== d[0] || d[i + 1] !== d[1] || d[i + 2] !== d[2]) return false;
        return c.width > 0;
    }""")


def _text(page) -> str:
    """All text on the page, form values and the document's title included."""
    return page.evaluate("""() => document.title + '\\n' + document.body.innerText + '\\n' +
        [...document.querySelectorAll('input, select')].map(e => e.value).join('\\n')""")


def _nothing_of_study_a(page) -> None:
    text = _text(page).lower()
    for fragment in ("pleural effusion", "heart size", STUDY_A, "acc-0042", "2024-03-05"):
        assert fragment.lower() not in text, fragment
    assert page.get_attribute("#model-image", "src") is None
    assert page.locator("#model-image").is_hidden()
    assert _canvas_blank(page)
    assert page.locator("#labels li").count() == 0
    assert page.locator("#download").is_hidden()


# ----------------------------------------------------------------------------- rendering


def test_render_review_page_fills_in_the_server_settings():
    html = render_review_page(modes=["one-step-fused", "one-step"], auth=False)
    assert "{{" not in html
    assert 'const MODES = ["one-step-fused", "one-step"];' in html
    assert "const AUTH = false;" in html
    assert "const AUTH = true;" in render_review_page(modes=["ar"], auth=True)
    assert 'const ROOT = "";' in html  # API calls under the app's route prefix
    assert 'const ROOT = "/dev";' in render_review_page(modes=["ar"], auth=True,
                                                         root_path="/dev/")
    # a value cannot close the script element
    hostile = render_review_page(modes=["</script><script>alert(1)</script>"], auth=True)
    assert "</script><script>alert" not in hostile and "\\u003c/script\\u003e" in hostile
    with pytest.raises(ValueError, match="at least one decoding mode"):
        render_review_page(modes=[], auth=True)
    # self-contained: nothing fetched from anywhere else
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"<link\b|<script\s+src|@import|url\(", html)


@needs_browser
def test_page_asks_only_its_server_offers_its_modes_and_remembers_the_key(open_page, stub):
    page = open_page(key=False)
    modes = page.eval_on_selector_all("#mode option", "els => els.map(e => e.textContent)")
    assert modes == ["server default (one-step-fused)", "one-step"]
    assert page.locator("#submit").is_disabled()
    assert page.input_value("#key") == ""
    page.fill("#key", KEY)
    page.reload()
    assert page.input_value("#key") == KEY  # remembered for this tab
    page.click("#forget-key")
    assert page.input_value("#key") == ""
    page.reload()
    assert page.input_value("#key") == ""
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#key", KEY)
    _submit(page, ("a.dcm", GOOD_A))
    _wait_state(page, "draft")
    page.wait_for_function("!document.getElementById('viewer-empty').checkVisibility()")
    assert open_page.outside == []
    # every form control has a label; every clickable control is a real button
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select')]
        .filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)""")
    assert unlabelled == []
    assert page.evaluate("document.querySelectorAll('[onclick], div[tabindex], span[tabindex]')"
                         ".length") == 0


@needs_browser
def test_report_shows_identity_confidence_and_neutral_labels(open_page, shots):
    page = open_page()
    _submit(page, ("chest_pa.dcm", GOOD_A))
    _wait_state(page, "draft")
    page.wait_for_function("!document.getElementById('viewer-empty').checkVisibility()")
    report = _report("A")
    # study identity and the file list
    assert page.inner_text("#study-view") == "PA"
    assert page.inner_text("#study-uid") == STUDY_A
    assert page.inner_text("#study-accession") == "ACC-0042"
    assert page.inner_text("#study-date") == "2024-03-05 14:30:00"
    assert page.inner_text("#files li[data-status=used] .file-name") == "chest_pa.dcm"
    # the draft is a draft, in two editable sections holding the API's text exactly
    assert page.inner_text("#review-state").startswith("DRAFT, not reviewed")
    assert "DRAFT" in page.title()
    for section in ("findings", "impression"):
        assert page.evaluate(f"document.getElementById('{section}').textContent") == \
            report[section]
        assert page.get_attribute(f"#{section}", "contenteditable") in ("plaintext-only", "true")
    # every sentence shaded by its confidence; the low one flagged by a mark, not colour alone
    spans = page.eval_on_selector_all("#findings .sentence, #impression .sentence", """els =>
        els.map(e => [e.textContent, e.className, e.dataset.lowConfidence,
                      getComputedStyle(e, '::before').content])""")
    assert [s[0] for s in spans] == ["The heart size is normal.",
                                     "There is a small  left pleural\neffusion.",
                                     "No pneumothorax.", report["impression"]]
    assert [s[1].split()[1] for s in spans] == ["conf-0", "conf-3", "conf-1", "conf-2"]
    low = [s for s in spans if s[2] == "true"]
    assert len(low) == 1 and "pleural\neffusion" in low[0][0] and "⚠" in low[0][3]
    assert "Low confidence" in low[0][3]  # the mark's accessible text
    assert all("⚠" not in s[3] for s in spans if s[2] != "true")
    flags = page.inner_text("#findings-flags")
    assert "Low confidence (0.41)" in flags and LOW in flags
    assert page.locator("#legend").is_visible()
    # labels: neutral chips, the value in words, never green
    chips = page.eval_on_selector_all("#labels .chip", """els => els.map(e => {
        const s = getComputedStyle(e);
        return [e.textContent, s.backgroundColor, s.color, s.borderTopColor]; })""")
    assert [c[0] for c in chips] == ["Pleural Effusion: present", "Support Devices: uncertain",
                                     "Cardiomegaly: absent", "Pneumothorax: absent"]
    assert len({c[1] for c in chips}) == 1  # one background for every value
    for _, *colours in chips:
        for colour in colours:
            r, g, b = (int(v) for v in re.findall(r"\d+", colour)[:3])
            assert not (g >= max(r, b) and g - min(r, b) > 8), colours  # no green tint
        r, g, b = (int(v) for v in re.findall(r"\d+", colours[0])[:3])
        assert max(r, g, b) - min(r, g, b) <= 8, colours[0]  # a grey or white background
    assert "not a diagnosis" in page.inner_text("#labels-caption")
    # the model's input, and the larger view on the canvas
    assert page.evaluate("document.getElementById('model-image').naturalWidth") == 112
    assert not _canvas_blank(page)
    assert "(file1)" in page.inner_text("#files")
    shots(page, "draft_report")


@needs_browser
def test_a_new_study_clears_the_old_one_everywhere(open_page, stub, shots):
    page = open_page()
    _submit(page, ("chest_pa.dcm", GOOD_A))
    _wait_state(page, "draft")
    page.wait_for_function("!document.getElementById('viewer-empty').checkVisibility()")
    assert not _canvas_blank(page)
    # a bad file next: the error shows, and nothing of the previous study is left
    _submit(page, ("scan-0001.dcm", NOT_DICOM))
    _wait_state(page, "error")
    error = page.inner_text("#error")
    assert "422 no_usable_image" in error and "r422" in error
    item = page.inner_text("#files li")
    assert "scan-0001.dcm" in item and "not_dicom" in item and "no DICOM preamble" in item
    _nothing_of_study_a(page)
    assert page.locator("#accept").is_disabled() and page.locator("#reject").is_disabled()
    shots(page, "error_after_a_good_study")
    # while a new report streams, the old study is gone (study B is held after two blocks)
    _submit(page, ("chest_pa.dcm", GOOD_A))
    _wait_state(page, "draft")
    page.fill("#signed-by", "Dr Reader")
    stub.gate.clear()
    try:
        _submit(page, ("portable_ap.dcm", GOOD_B))
        page.wait_for_function("document.getElementById('status').textContent.includes('block 2')")
        assert page.inner_text("#review-state").startswith("Writing a draft")
        assert "Lungs are clear" in page.inner_text("#stream-text")
        _nothing_of_study_a(page)
        assert page.inner_text("#study-uid") == "—"
        assert page.inner_text("#findings") == "" and page.inner_text("#impression") == ""
        assert page.locator("#error").is_hidden()
        assert page.locator("#accept").is_disabled()
        shots(page, "streaming_a_new_study")
    finally:
        stub.gate.set()
    _wait_state(page, "draft")
    assert page.inner_text("#study-uid") == STUDY_B
    assert page.inner_text("#study-accession") == "not in the DICOM"
    assert page.locator("#stream-box").is_hidden()
    text = _text(page).lower()
    assert "pleural effusion" not in text and STUDY_A not in text


@needs_browser
def test_a_late_answer_never_lands_on_the_next_study(open_page, stub):
    page = open_page()
    stub.gate.clear()
    stub.held_done.clear()
    try:
        _submit(page, ("portable_ap.dcm", GOOD_B))  # held by the stub after two blocks
        page.wait_for_function("document.getElementById('status').textContent.includes('block 2')")
        _submit(page, ("chest_pa.dcm", GOOD_A))
        _wait_state(page, "draft")
    finally:
        stub.gate.set()
    assert stub.held_done.wait(30)  # B's report has been sent (or refused by the closed tab)
    page.evaluate("fetch('/').then(r => r.text())")  # one more round trip through the page
    assert page.inner_text("#study-uid") == STUDY_A
    assert "Lungs are clear" not in _text(page)


@needs_browser
def test_per_file_errors_show_the_users_file_names(open_page, shots):
    page = open_page()
    _submit(page, ("notes.txt", NOT_DICOM), ("chest_pa.dcm", GOOD_A))
    _wait_state(page, "draft")
    items = page.eval_on_selector_all(
        "#files li", "els => els.map(e => [e.dataset.status, e.textContent])")
    assert items[0][0] == "error" and "notes.txt" in items[0][1] and "(file1)" in items[0][1]
    assert "not_dicom: no DICOM preamble" in items[0][1]
    assert items[1][0] == "used" and "chest_pa.dcm" in items[1][1]
    assert "1 could not be read" in page.inner_text("#files-summary")
    assert page.locator("#error").is_hidden()  # the study itself was reported
    shots(page, "per_file_error")


@needs_browser
def test_edit_then_accept_signs_a_final_report_and_edits_reopen_it(open_page, stub, shots):
    page = open_page()
    _submit(page, ("chest_pa.dcm", GOOD_A))
    _wait_state(page, "draft")
    page.click("#findings")
    page.keyboard.press("Control+End")
    page.keyboard.type(EDIT)
    findings = _report("A")["findings"] + EDIT
    assert page.evaluate("document.getElementById('findings').textContent") == findings
    assert page.get_attribute("#findings", "data-edited") == "true"
    assert page.locator("#findings .sentence").count() == 0  # no shading for the edited text
    assert page.locator("#findings-edited").is_visible()
    assert "Edited by you" in page.inner_text("#findings-flags")
    assert page.locator("#impression .sentence").count() == 1  # the other section keeps it
    assert page.locator("#labels-stale").is_visible()
    assert page.inner_text("#review-state").startswith("DRAFT, not reviewed")
    # no name, no sign-off
    count = len(stub.signoffs)
    page.click("#accept")
    assert "Signed by" in page.inner_text("#signoff-error")
    assert len(stub.signoffs) == count
    page.fill("#signed-by", "Dr Ada Reader")
    page.click("#accept")
    _wait_state(page, "final")
    assert page.inner_text("#review-state").startswith("Final, signed by Dr Ada Reader")
    assert "status: final" in page.inner_text("#signoff-result")
    assert len(stub.signoffs) == count + 1
    sent = stub.signoffs[-1]
    assert sent["decision"] == "accept" and sent["signed_by"] == "Dr Ada Reader"
    assert sent["findings"] == findings and sent["impression"] == _report("A")["impression"]
    assert sent["draft"]["study_instance_uid"] == STUDY_A
    assert sent["draft"]["findings"] == _report("A")["findings"]  # the machine draft, unedited
    assert sent["draft"]["sentences"] == _report("A")["sentences"]
    assert "event" not in sent["draft"] and "view_png" not in sent["draft"]
    with page.expect_download() as download:
        page.click("#download")
    fhir = json.loads(Path(download.value.path()).read_text())
    assert fhir["status"] == "final" and fhir["resultsInterpreter"][0]["display"] == "Dr Ada Reader"
    assert download.value.suggested_filename == "echo-ray-report-final.fhir.json"
    shots(page, "signed_final")
    # an edit after sign-off makes it a draft again
    page.click("#impression")
    page.keyboard.press("Control+End")
    page.keyboard.type(" Recommend follow-up.")
    _wait_state(page, "draft")
    assert page.inner_text("#review-state").startswith("DRAFT, not reviewed")
    assert page.locator("#download").is_hidden()
    assert "sign it off again" in page.inner_text("#signoff-result")
    # revert brings back the machine draft with its shading
    page.click("#findings-revert")
    assert page.evaluate("document.getElementById('findings').textContent") == \
        _report("A")["findings"]
    assert page.locator("#findings .sentence").count() == 3


@needs_browser
def test_reject_cancels_the_draft(open_page, stub, shots):
    page = open_page()
    _submit(page, ("chest_pa.dcm", GOOD_A))
    _wait_state(page, "draft")
    page.fill("#signed-by", "Dr Ada Reader")
    page.click("#reject")
    _wait_state(page, "rejected")
    assert page.inner_text("#review-state").startswith("Rejected by Dr Ada Reader")
    assert "status: cancelled" in page.inner_text("#signoff-result")
    assert stub.signoffs[-1]["decision"] == "reject"
    assert "Final" not in page.inner_text("#review-state")
    shots(page, "rejected")


@needs_browser
def test_zoom_pan_and_window_level_change_the_canvas(open_page):
    page = open_page()
    _submit(page, ("chest_pa.dcm", GOOD_A))
    _wait_state(page, "draft")
    page.wait_for_function("!document.getElementById('viewer-empty').checkVisibility()")
    fit = _canvas(page)
    page.click("#zoom-in")
    assert _canvas(page) != fit and page.inner_text("#zoom-level") == "125%"
    page.click("#view-reset")
    assert _canvas(page) == fit
    page.locator("#viewer").scroll_into_view_if_needed()
    box = page.locator("#viewer").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.wheel(0, -300)  # wheel up: zoom in
    page.wait_for_function("document.getElementById('zoom-level').textContent !== '100%'")
    assert _canvas(page) != fit
    page.click("#view-reset")
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 30, steps=4)  # drag: pan
    page.mouse.up()
    assert _canvas(page) != fit
    page.click("#view-reset")
    assert _canvas(page) == fit
    # keyboard on the canvas
    page.focus("#viewer")
    page.keyboard.type("+")
    page.keyboard.press("ArrowLeft")
    assert _canvas(page) != fit
    page.keyboard.press("0")
    assert _canvas(page) == fit
    # window/level: the slider by keyboard, a shift-drag, and reset
    page.focus("#window-width")
    for _ in range(40):
        page.keyboard.press("ArrowLeft")
    assert page.inner_text("#window-width-out") == "216"
    narrowed = _canvas(page)
    assert narrowed != fit
    page.click("#wl-reset")
    assert _canvas(page) == fit
    page.keyboard.down("Shift")
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx - 80, cy + 40, steps=4)
    page.mouse.up()
    page.keyboard.up("Shift")
    assert page.input_value("#window-width") == "176"
    assert page.input_value("#window-center") == "168"
    assert _canvas(page) != fit
    page.focus("#viewer")
    page.keyboard.press("r")
    assert _canvas(page) == fit


@needs_browser
def test_tablet_width_has_no_horizontal_overflow(open_page, shots):
    page = open_page(width=768)
    _submit(page, ("notes.txt", NOT_DICOM), ("a-long-file-name-" * 6 + ".dcm", GOOD_A))
    _wait_state(page, "draft")
    page.fill("#signed-by", "Dr Ada Reader")
    widths = page.evaluate("[document.documentElement.scrollWidth, "
                           "document.documentElement.clientWidth]")
    assert widths[0] <= widths[1]
    wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
        .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
        .map(e => e.id || e.tagName)""")
    assert wide == []
    shots(page, "tablet_768px")


@needs_browser
def test_keyboard_only_review(open_page, stub):
    page = open_page(key=False)
    # listen before any key press: the listener turns on file-chooser interception, which
    # must be in place when Space opens the chooser (an `expect_file_chooser` opened right
    # before the key press raced it on a loaded machine)
    choosers = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    order = []
    for _ in range(4):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["key", "forget-key", "file", "mode"]  # submit: disabled until files
    ring = page.evaluate("[getComputedStyle(document.activeElement).outlineStyle, "
                         "getComputedStyle(document.activeElement).outlineWidth]")
    assert ring == ["solid", "3px"]  # the focused control shows it
    for _ in range(3):
        page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "key"
    page.keyboard.type(KEY)
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    page.keyboard.press("Space")
    for _ in range(300):  # up to 30 s
        if choosers:
            break
        page.wait_for_timeout(100)
    assert len(choosers) == 1, "Space on the focused file input opened no file chooser"
    choosers[0].set_files(files=[{"name": "chest_pa.dcm", "mimeType": "application/dicom",
                                  "buffer": GOOD_A}])
    page.keyboard.press("Tab")
    page.keyboard.press("ArrowDown")  # the second mode
    assert page.input_value("#mode") == MODES[1]
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "submit"
    page.keyboard.press("Enter")
    _wait_state(page, "draft")
    assert page.inner_text("#study-uid") == STUDY_A
    assert f"mode={MODES[1]}" in [r for r in stub.requests if r.startswith("/v1/reports?")][-1]
    # on to sign-off with Tab alone: every control on the way is reachable
    seen = []
    while page.evaluate("document.activeElement.id") != "signed-by" and len(seen) < 60:
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id"))
    assert seen[-1] == "signed-by"
    for control in ("zoom-in", "window-width", "viewer", "findings", "impression"):
        assert control in seen
    page.keyboard.type("Dr Key Board")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "accept"
    page.keyboard.press("Enter")
    _wait_state(page, "final")
    assert stub.signoffs[-1]["signed_by"] == "Dr Key Board"
