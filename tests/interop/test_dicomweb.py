"""The DICOMweb client against a real Orthanc (QIDO-RS, WADO-RS, STOW-RS, credentials,
errors), and against a scripted HTTP server for what Orthanc cannot show (bearer tokens,
retries on 5xx)."""

from __future__ import annotations

import datetime
import io
import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from helpers.orthanc import PASSWORD, USER, free_port, start_orthanc

from echo_ray.interop.destinations import DestinationError, store_instances
from echo_ray.interop.dicomweb import (
    ENV_FILE,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    DicomwebClient,
    DicomwebError,
    check_dicomweb_archive,
    is_dicomweb,
    multipart_parts,
)
from echo_ray.synth.archive import synthesize_archive

_ENV = (ENV_USER, ENV_PASSWORD, ENV_TOKEN, ENV_FILE)


@pytest.fixture(autouse=True)
def _no_credentials(monkeypatch):
    """No test sees the developer's own DICOMweb credentials."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc holding a small synthetic archive (stored with storescu, mixed syntaxes);
    yields (server, {SOPInstanceUID: header of the source file})."""
    root = tmp_path_factory.mktemp("archive")
    synthesize_archive(root, num_studies=4, seed=3, image_size=56, lateral_fraction=0.5)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        files = sorted(root.rglob("*.dcm"))
        sent = server.storescu(*files)
        assert sent.returncode == 0, sent.stderr
        headers = {}
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            headers[ds.SOPInstanceUID] = ds
        yield server, headers
    finally:
        server.stop()


def _client(server, monkeypatch) -> DicomwebClient:
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return DicomwebClient.from_uri(server.dicomweb)


def test_uris_and_a_uri_with_credentials_is_refused():
    assert is_dicomweb("dicomweb://h:1/x") and is_dicomweb("dicomwebs://h/x")
    assert not is_dicomweb("/data/archive") and not is_dicomweb("s3://b/x")
    client = DicomwebClient.from_uri("dicomwebs://pacs.example:8443/dicom-web/")
    assert client.base_url == "https://pacs.example:8443/dicom-web"
    assert client.uri == "dicomwebs://pacs.example:8443/dicom-web"
    assert DicomwebClient.from_uri("dicomweb://h:80/x").base_url == "http://h:80/x"
    with pytest.raises(DicomwebError) as err:
        DicomwebClient.from_uri("dicomweb://echo:hunter2pw@127.0.0.1:8042/dicom-web")
    message = str(err.value)
    assert "hunter2pw" not in message and "echo:" not in message
    assert "credentials in the URI are refused" in message and ENV_PASSWORD in message
    with pytest.raises(DicomwebError, match="not a DICOMweb URI"):
        DicomwebClient.from_uri("http://127.0.0.1:8042/dicom-web")


def test_search_with_and_without_since(pacs, monkeypatch):
    server, headers = pacs
    client = _client(server, monkeypatch)
    studies = client.search_studies(("CR", "DX"))
    dates = {h.StudyInstanceUID: h.StudyDate for h in headers.values()}
    assert [s["study_uid"] for s in studies] == sorted(dates)  # each once, sorted
    assert {s["study_uid"]: s["study_date"] for s in studies} == dates
    assert client.search_studies(("CT",)) == []
    cut = sorted(set(dates.values()))[len(set(dates.values())) // 2]
    since = datetime.date(int(cut[:4]), int(cut[4:6]), int(cut[6:]))
    later = client.search_studies(("CR", "DX"), since=since)
    assert [s["study_uid"] for s in later] == sorted(k for k, d in dates.items() if d >= cut)
    assert 0 < len(later) < len(studies)


def test_instances_and_retrieve_give_the_stored_files(pacs, monkeypatch):
    server, headers = pacs
    client = _client(server, monkeypatch)
    stored = {}
    for modality in ("CR", "DX"):
        for item in server.instances_of_modality(modality):
            stored[item["MainDicomTags"]["SOPInstanceUID"]] = item["ID"]
    listed = [(study["study_uid"], i) for study in client.search_studies()
              for i in client.instances(study["study_uid"])]
    assert sorted(i["sop_uid"] for _, i in listed) == sorted(headers) == sorted(stored)
    syntaxes = set()
    for study_uid, item in listed:
        source = headers[item["sop_uid"]]
        assert (item["series_uid"], item["modality"]) == (source.SeriesInstanceUID,
                                                          source.Modality)
        data = client.retrieve_instance(study_uid, item["series_uid"], item["sop_uid"])
        assert data == server.file(stored[item["sop_uid"]])  # byte for byte, not transcoded
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.StudyInstanceUID == study_uid and "PixelData" in ds
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
    assert len(syntaxes) >= 2  # the archive's mixed transfer syntaxes came back as stored
    # A series of another modality is no instance of the study's radiographs.
    assert client.instances(listed[0][0], ("CT",)) == []


def test_store_adds_an_instance(pacs, monkeypatch):
    server, headers = pacs
    client = _client(server, monkeypatch)
    study = client.search_studies()[0]["study_uid"]
    item = client.instances(study)[0]
    ds = pydicom.dcmread(io.BytesIO(client.retrieve_instance(
        study, item["series_uid"], item["sop_uid"])))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    client.store([buffer.getvalue()])
    assert ds.SOPInstanceUID in {i["sop_uid"] for i in client.instances(study)}
    # The same through destinations, and a second store of the same instance is harmless.
    store_instances(server.dicomweb, [buffer.getvalue()])
    assert [i["sop_uid"] for i in client.instances(study)].count(ds.SOPInstanceUID) == 1


def test_credentials_from_a_file(pacs, tmp_path, monkeypatch):
    server, _ = pacs
    secret = tmp_path / "pacs.json"
    secret.write_text(json.dumps({"user": USER, "password": PASSWORD}))
    monkeypatch.setenv(ENV_FILE, str(secret))
    check_dicomweb_archive(server.dicomweb)
    secret.write_text(json.dumps({"user": USER}))
    with pytest.raises(DicomwebError, match="expected a JSON object"):
        check_dicomweb_archive(server.dicomweb)


def test_wrong_or_no_password_is_one_line_without_the_password(pacs, monkeypatch):
    server, _ = pacs
    with pytest.raises(DicomwebError) as err:
        check_dicomweb_archive(server.dicomweb)  # no credentials at all
    assert "HTTP 401" in str(err.value) and "no credentials" in str(err.value)
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, "wrong-Pa55word")
    with pytest.raises(DicomwebError) as err:
        check_dicomweb_archive(server.dicomweb)
    message = str(err.value)
    assert "rejected" in message and "\n" not in message
    assert ENV_USER in message and ENV_TOKEN in message and ENV_FILE in message
    client = DicomwebClient.from_uri(server.dicomweb)
    for shown in (message, repr(err.value), repr(client), str(client.__dict__.get("uri"))):
        assert "wrong-Pa55word" not in shown
    with pytest.raises(DestinationError) as err:
        store_instances(server.dicomweb, [b"x"])
    assert "rejected" in str(err.value) and "wrong-Pa55word" not in str(err.value)
    monkeypatch.delenv(ENV_PASSWORD)
    with pytest.raises(DicomwebError, match="go together"):
        DicomwebClient.from_uri(server.dicomweb)


def test_not_a_dicomweb_root_and_connection_refused(pacs, monkeypatch):
    server, _ = pacs
    _client(server, monkeypatch)
    with pytest.raises(DicomwebError, match="not a DICOMweb root .*HTTP 404"):
        check_dicomweb_archive(server.dicomweb.replace("/dicom-web", "/nowhere"))
    with pytest.raises(DicomwebError, match="connection refused: is the PACS running"):
        check_dicomweb_archive(f"dicomweb://127.0.0.1:{free_port()}/dicom-web")
    with pytest.raises(DestinationError, match="expected dicomweb"):
        store_instances("ftp://x/y", [b"x"])


class _Scripted(BaseHTTPRequestHandler):
    """Answers from `server.script` (a list of status codes, the last repeated) and records
    each request's Authorization header."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.seen.append(self.headers.get("Authorization"))
        status = self.server.script.pop(0) if len(self.server.script) > 1 else \
            self.server.script[0]
        body = b"[]"
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.seen, server.script = [], [200]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_bearer_token_and_retries_on_server_errors(scripted, monkeypatch):
    uri = f"dicomweb://127.0.0.1:{scripted.server_address[1]}/dw"
    monkeypatch.setenv(ENV_TOKEN, "tok-123")
    monkeypatch.setenv(ENV_USER, "someone")  # the token wins
    monkeypatch.setenv(ENV_PASSWORD, "pw")
    client = DicomwebClient.from_uri(uri)
    assert client.search_studies(("DX",)) == []
    assert scripted.seen == ["Bearer tok-123"]
    assert "tok-123" not in repr(client)
    # Pickled (as Ray ships it to a task), it still authenticates; no open session travels.
    again = pickle.loads(pickle.dumps(client))
    scripted.script = [503, 502, 200]
    assert again.search_studies(("DX",)) == [] and len(scripted.seen) == 4
    scripted.script = [503]
    with pytest.raises(DicomwebError, match="HTTP 503"):
        again.search_studies(("DX",))
    assert len(scripted.seen) == 7  # 3 tries


def test_multipart_parts():
    body = (b"preamble\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--XyZ"
            b"\r\nContent-Type: application/dicom\r\n\r\nsec\r\n--ond\r\n\r\n--XyZ--\r\n")
    assert multipart_parts('multipart/related; type="application/dicom"; boundary="XyZ"',
                           body) == [b"first", b"sec\r\n--ond\r\n"]
    with pytest.raises(DicomwebError, match="cut short"):
        multipart_parts("multipart/related; boundary=XyZ", body[:40])
    with pytest.raises(DicomwebError, match="not multipart"):
        multipart_parts("application/dicom", body)


def test_package_layers():
    """interop imports neither ray nor torch (a fresh interpreter proves it)."""
    import subprocess
    import sys

    code = ("import sys, echo_ray.interop.dicomweb, echo_ray.interop.destinations, "
            "echo_ray.batch.sources; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    assert done.stdout.strip() == "[]"
