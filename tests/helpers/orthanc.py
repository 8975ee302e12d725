"""A real Orthanc PACS for a test: Debian's `orthanc` and `orthanc-dicomweb` packages, started
from a JSON config on loopback ports in a temp folder (no root, no systemd), stopped by the
test that started it. `make test` installs the packages (with dcmtk) where it runs as root
with apt; elsewhere the tests that need them skip with the reason.

Orthanc here has HTTP basic auth on (user `echo`, password `s3cret-pacs`: what a hospital's
PACS asks of a client), its DICOMweb root at `/dicom-web/`, its own AE title `ORTHANC`, and
knows the modalities a test names (AE title -> host, port) for C-STORE to them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.processes import stop_process_group

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "echo", "s3cret-pacs"
AE_TITLE = "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_orthanc() -> None:
    """Skip, saying why, where Orthanc, its DICOMweb plugin or dcmtk is not installed."""
    missing = [what for what, ok in (
        ("orthanc", Path(ORTHANC).exists()),
        ("orthanc-dicomweb", Path(DICOMWEB_PLUGIN).exists()),
        ("dcmtk", shutil.which("storescu") is not None),
    ) if not ok]
    if missing:
        pytest.skip(f"needs Debian's {', '.join(missing)} (installed by `make test` as root "
                    f"with apt; else `apt-get install orthanc orthanc-dicomweb dcmtk`)")


@dataclass
class Orthanc:
    """A running Orthanc: its ports, credentials and a few REST calls."""

    http_port: int
    dicom_port: int
    folder: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The archive URI `echo-ray report --archive` takes."""
        return f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"

    def env(self) -> dict[str, str]:
        """The credentials as `echo-ray` reads them from the environment."""
        return {"ECHO_RAY_DICOMWEB_USER": USER, "ECHO_RAY_DICOMWEB_PASSWORD": PASSWORD}

    def rest(self, method: str, path: str, body: bytes | None = None,
             content_type: str = "application/json"):
        """One REST call; the JSON answer (or the raw bytes when it is not JSON)."""
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=30) as answer:
            data = answer.read()
        try:
            return json.loads(data)
        except ValueError:
            return data

    def upload(self, path: Path) -> dict:
        """Any DICOM file stored through the REST API (`POST /instances`), whatever its
        transfer syntax."""
        return self.rest("POST", "/instances", path.read_bytes(), "application/dicom")

    def storescu(self, *paths: Path, calling: str = "STORESCU") -> subprocess.CompletedProcess:
        """dcmtk's storescu to this Orthanc (DIMSE C-STORE)."""
        return storescu("127.0.0.1", self.dicom_port, AE_TITLE, *paths, calling=calling)

    def instances_of_modality(self, modality: str) -> list[dict]:
        """Every stored instance of `modality` with its tags (`/tools/find`)."""
        return self.rest("POST", "/tools/find", json.dumps({
            "Level": "Instance", "Query": {"Modality": modality}, "Expand": True}).encode())

    def file(self, instance_id: str) -> bytes:
        return self.rest("GET", f"/instances/{instance_id}/file")

    def stop(self) -> None:
        stop_process_group(self.proc, timeout=30)


# storescu proposes uncompressed syntaxes unless told otherwise: the option that proposes a
# compressed file's own transfer syntax (an uncompressed file needs none).
_PROPOSE = {
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs", "1.2.840.10008.1.2.4.70": "-xs",
}


def storescu(host: str, port: int, called: str, *paths: Path, calling: str = "STORESCU"
             ) -> subprocess.CompletedProcess:
    """dcmtk's storescu, one association per transfer syntax among `paths`, each proposing
    that syntax, so JPEG-LS, JPEG 2000, RLE and deflated files are sent as they are. The
    result of the first call that failed, else of the last."""
    import pydicom

    groups: dict[str | None, list[Path]] = {}
    for path in paths:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_PROPOSE.get(syntax), []).append(path)
    done = None
    for option, group in groups.items():
        done = subprocess.run(["storescu", "-aet", calling, "-aec", called,
                               *([option] if option else []), host, str(port),
                               *map(str, group)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return done
    return done


def start_orthanc(folder: Path, modalities: dict[str, tuple[str, int]] | None = None
                  ) -> Orthanc:
    """Orthanc with the DICOMweb plugin on free loopback ports, its storage in `folder`;
    returns once its REST API answers (60 s at most)."""
    require_orthanc()
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "echo-ray-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "DicomModalities": {name: [name, host, port]
                            for name, (host, port) in (modalities or {}).items()},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        "StableAge": 1,
        "HttpTimeout": 60,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen([ORTHANC, str(folder / "config.json")], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "LANG": "C.UTF-8"})
    log.close()
    server = Orthanc(http_port, dicom_port, folder, proc)
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({proc.returncode}):\n"
                               + (folder / "orthanc.log").read_text(errors="replace")[-3000:])
        try:
            server.rest("GET", "/system")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.time() > deadline:
                server.stop()
                raise RuntimeError("Orthanc did not answer within 60 s:\n"
                                   + (folder / "orthanc.log").read_text(errors="replace")[-3000:])
            time.sleep(0.3)
