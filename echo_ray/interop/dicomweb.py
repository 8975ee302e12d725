"""A PACS over DICOMweb: QIDO-RS search, WADO-RS retrieve, STOW-RS store (plain `requests`).

URIs: `dicomweb://HOST:PORT/PATH` is `http://HOST:PORT/PATH`, `dicomwebs://...` is https;
PATH is the DICOMweb root (Orthanc: `/dicom-web`). Credentials never come from the URI (a
`user:password@` URI is refused: a command line is seen by every user of the machine and
lands in shell histories and job logs); they come from the environment, first match wins:

    ECHO_RAY_DICOMWEB_CREDENTIALS=/path/file.json   {"user": .., "password": ..} or {"token": ..}
    ECHO_RAY_DICOMWEB_TOKEN=...                     HTTP bearer token
    ECHO_RAY_DICOMWEB_USER=... + ECHO_RAY_DICOMWEB_PASSWORD=...   HTTP basic auth

They are read once, by `DicomwebClient.from_uri` on the driver, and travel inside the
pickled client to Ray tasks (a worker on another node has not the driver's environment);
they are in no message, log line or repr.

Errors are `DicomwebError` (a `PathError`: the CLI prints its one line and exits 2), saying
what failed and what to do: connection refused, credentials rejected (and which variables
are read), not a DICOMweb root (404), a timeout. Reads (QIDO, WADO) are tried 3 times, 0.5 s
then 1 s apart, on a connection error, a timeout or a 5xx answer; a store is tried once (the
caller records a failed store, and the SR's fixed UID makes a later store idempotent).
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from echo_ray.data.storage import PathError

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
ENV_USER, ENV_PASSWORD = "ECHO_RAY_DICOMWEB_USER", "ECHO_RAY_DICOMWEB_PASSWORD"
ENV_TOKEN, ENV_FILE = "ECHO_RAY_DICOMWEB_TOKEN", "ECHO_RAY_DICOMWEB_CREDENTIALS"
_ENV_HINT = (f"set {ENV_USER} and {ENV_PASSWORD} (basic), {ENV_TOKEN} (bearer) or {ENV_FILE} "
             "(a JSON file with user/password or token)")
_ATTEMPTS = 3
_TIMEOUT_S = (10.0, 120.0)  # connect, read
_PAGE = 1000  # QIDO results per request (limit/offset paging)
_DICOM_JSON = "application/dicom+json"
# Tags of the QIDO answers (DICOM JSON: "GGGGEEEE" -> {"vr", "Value"}).
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, STUDY_DATE = "00080060", "00080020"


class DicomwebError(PathError):
    """A DICOMweb archive or destination that cannot be used: one line, never credentials.
    `status` is the HTTP status when the server answered (else None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def is_dicomweb(uri: str | None) -> bool:
    """Whether `uri` names a DICOMweb server (`dicomweb://` or `dicomwebs://`)."""
    return bool(uri) and uri.split("://", 1)[0] in SCHEMES


def check_dicomweb_archive(uri: str) -> None:
    """The up-front check of `--archive dicomweb://...`: the URI parses, credentials are
    readable, and the server answers one QIDO-RS study search (limit 1).

    Raises:
        DicomwebError: what was wrong and what to do.
    """
    client = DicomwebClient.from_uri(uri)
    client._get("studies", params={"limit": "1"})


def _credentials() -> tuple[str, str | tuple[str, str]] | None:
    """("bearer", token) or ("basic", (user, password)) from the environment, or None."""
    path = os.environ.get(ENV_FILE)
    if path:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise DicomwebError(f"{ENV_FILE} {path}: cannot be read as JSON "
                                f"({type(err).__name__}); expected {{\"user\": ..., "
                                "\"password\": ...} or {\"token\": ...}") from None
        if isinstance(data, dict) and isinstance(data.get("token"), str):
            return "bearer", data["token"]
        if isinstance(data, dict) and isinstance(data.get("user"), str) \
                and isinstance(data.get("password"), str):
            return "basic", (data["user"], data["password"])
        raise DicomwebError(f"{ENV_FILE} {path}: expected a JSON object with \"user\" and "
                            "\"password\", or with \"token\"")
    if os.environ.get(ENV_TOKEN):
        return "bearer", os.environ[ENV_TOKEN]
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if user and password is None or password and not user:
        raise DicomwebError(f"{ENV_USER} and {ENV_PASSWORD} go together: set both, or use "
                            f"{ENV_TOKEN} or {ENV_FILE}")
    if user:
        return "basic", (user, password)
    return None


class DicomwebClient:
    """One DICOMweb server. Picklable (the credentials travel with it, the HTTP sessions
    do not); its repr and every message name only `uri`, the display form. Safe to share
    between threads: each thread has its own HTTP session (connection pool)."""

    def __init__(self, base_url: str, uri: str, auth=None, *, timeout=_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.uri = uri
        self._auth = auth
        self.timeout = timeout
        self._local = threading.local()

    @classmethod
    def from_uri(cls, uri: str) -> DicomwebClient:
        """A client for `dicomweb://HOST:PORT/PATH` (or `dicomwebs://`), credentials from the
        environment (module docstring).

        Raises:
            DicomwebError: not such a URI, credentials in it, or unreadable credentials.
        """
        scheme = uri.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise DicomwebError(f"{uri!r} is not a DICOMweb URI: expected "
                                "dicomweb://HOST:PORT/PATH (or dicomwebs:// for https)")
        parts = urlsplit(uri)
        if parts.username is not None or parts.password is not None:
            shown = f"{scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "") \
                + parts.path
            raise DicomwebError(f"{shown}: credentials in the URI are refused (a command line "
                                f"is visible to other users and kept in logs); {_ENV_HINT}")
        try:
            port = parts.port
        except ValueError:
            raise DicomwebError(f"{uri}: the port is not a number") from None
        if not parts.hostname:
            raise DicomwebError(f"{uri}: no host; expected dicomweb://HOST:PORT/PATH")
        if parts.query or parts.fragment:
            raise DicomwebError(f"{uri}: a DICOMweb root takes no ?query or #fragment")
        netloc = parts.hostname + (f":{port}" if port else "")
        display = f"{scheme}://{netloc}{parts.path.rstrip('/')}"
        return cls(f"{SCHEMES[scheme]}://{netloc}{parts.path}", display, _credentials())

    def __repr__(self) -> str:
        return f"DicomwebClient({self.uri!r})"

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _local=threading.local())

    # --- QIDO-RS / WADO-RS / STOW-RS ---------------------------------------------------------

    def search_studies(self, modalities: Sequence[str] = ("CR", "DX"),
                       since: datetime.date | None = None) -> list[dict]:
        """Studies holding an instance of one of `modalities` (QIDO-RS, one query per
        modality: servers differ on multi-value matching), of StudyDate on or after
        `since`, each once, sorted by StudyInstanceUID: `{"study_uid", "study_date"}`
        (YYYYMMDD or None)."""
        found: dict[str, dict] = {}
        for modality in modalities:
            params = {"ModalitiesInStudy": modality, "includefield": STUDY_DATE}
            if since is not None:
                params["StudyDate"] = f"{since:%Y%m%d}-"
            for item in self._paged("studies", params):
                uid = _value(item, STUDY_UID)
                if uid:
                    found.setdefault(uid, {"study_uid": uid,
                                           "study_date": _value(item, STUDY_DATE)})
        return [found[k] for k in sorted(found)]

    def instances(self, study_uid: str, modalities: Sequence[str] = ("CR", "DX")
                  ) -> list[dict]:
        """Every instance of the study's series of `modalities` (series-level filter; an SR
        or other series is left out): `{"series_uid", "sop_uid", "modality"}`, sorted."""
        out = []
        wanted = {m.upper() for m in modalities}
        for series in self._paged(f"studies/{study_uid}/series", {}):
            series_uid, modality = _value(series, SERIES_UID), _value(series, MODALITY)
            if not series_uid or (modality or "").upper() not in wanted:
                continue
            for item in self._paged(f"studies/{study_uid}/series/{series_uid}/instances", {}):
                sop = _value(item, SOP_UID)
                if sop:
                    out.append({"series_uid": series_uid, "sop_uid": sop,
                                "modality": modality})
        return sorted(out, key=lambda i: (i["series_uid"], i["sop_uid"]))

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """The instance as Part 10 bytes in its stored transfer syntax (WADO-RS,
        `multipart/related; type="application/dicom"; transfer-syntax=*`)."""
        answer = self._get(
            f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
            accept='multipart/related; type="application/dicom"; transfer-syntax=*')
        parts = multipart_parts(answer.headers.get("Content-Type", ""), answer.content)
        if len(parts) != 1:
            raise DicomwebError(f"{self.uri}: WADO-RS answered {len(parts)} parts for one "
                                "instance", answer.status_code)
        return parts[0]

    def store(self, blobs: Sequence[bytes]) -> None:
        """Store Part 10 `blobs` (STOW-RS, one request). Tried once.

        Raises:
            DicomwebError: the request failed, or the server refused an instance (its
                FailedSOPSequence, with the failure reason code).
        """
        if not blobs:
            return
        boundary = uuid.uuid4().hex
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom"
                        b"\r\n\r\n" + blob + b"\r\n" for blob in blobs)
        body += b"--" + boundary.encode() + b"--\r\n"
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        answer = self._request("POST", "studies", attempts=1, data=body,
                               headers={"Content-Type": content_type, "Accept": _DICOM_JSON},
                               what="STOW-RS store")
        failed = []
        try:
            result = answer.json() if answer.content else {}
            failed = (result.get("00081198") or {}).get("Value") or []
        except ValueError:
            pass
        if failed:
            reason = _value(failed[0], "00081197")
            raise DicomwebError(f"{self.uri}: the server refused {len(failed)} of "
                                f"{len(blobs)} instance(s) (failure reason {reason})",
                                answer.status_code)

    # --- HTTP ----------------------------------------------------------------------------

    def _paged(self, path: str, params: dict) -> Iterable[dict]:
        """Every result of a QIDO-RS search, `_PAGE` at a time (limit / offset)."""
        offset = 0
        while True:
            answer = self._get(path, params={**params, "limit": str(_PAGE),
                                             "offset": str(offset)})
            items = answer.json() if answer.content else []
            if not isinstance(items, list):
                raise DicomwebError(f"{self.uri}: QIDO-RS {path} did not answer a JSON list")
            yield from items
            if len(items) < _PAGE:
                return
            offset += len(items)

    def _get(self, path: str, *, params: dict | None = None, accept: str = _DICOM_JSON):
        return self._request("GET", path, attempts=_ATTEMPTS, params=params,
                             headers={"Accept": accept}, what="QIDO-RS search"
                             if accept == _DICOM_JSON else "WADO-RS retrieve")

    def _request(self, method: str, path: str, *, attempts: int, what: str, **kwargs):
        """One request, tried `attempts` times on a connection error, a timeout or a 5xx;
        any failure as a one-line `DicomwebError`."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            if self._auth is not None:
                kind, value = self._auth
                if kind == "basic":
                    session.auth = value
                else:
                    session.headers["Authorization"] = f"Bearer {value}"
        url = f"{self.base_url}/{path}"
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                answer = session.request(method, url, timeout=self.timeout, **kwargs)
            except requests.Timeout:
                if last:
                    raise DicomwebError(f"{self.uri}: {what} timed out after "
                                        f"{self.timeout[1]:.0f} s ({attempts} tries)") from None
            except requests.ConnectionError as err:
                if last:
                    refused = "refused" in str(err).lower()
                    raise DicomwebError(
                        f"{self.uri}: " + ("connection refused: is the PACS running and is "
                                           "the port right?" if refused else
                                           f"cannot connect ({type(err).__name__}): check "
                                           "the host and port")) from None
            except requests.RequestException as err:
                raise DicomwebError(f"{self.uri}: {what} failed ({type(err).__name__})") \
                    from None
            else:
                if answer.status_code < 500 or last:
                    _raise_for_status(self, answer, what)
                    return answer
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")


def _raise_for_status(client: DicomwebClient, answer, what: str) -> None:
    status = answer.status_code
    if status < 400:
        return
    if status in (401, 403):
        given = ("credentials from the environment" if client._auth is not None
                 else "no credentials (none of the variables is set)")
        raise DicomwebError(f"{client.uri}: the server rejected {given} (HTTP {status}); "
                            f"{_ENV_HINT}", status)
    if status == 404 and what == "QIDO-RS search":
        raise DicomwebError(f"{client.uri}: not a DICOMweb root (HTTP 404 for a QIDO-RS "
                            "search): check the path (Orthanc's is /dicom-web)", status)
    if status == 404:
        raise DicomwebError(f"{client.uri}: {what}: no such instance (HTTP 404)", status)
    raise DicomwebError(f"{client.uri}: {what} failed: HTTP {status} {answer.reason}", status)


def _value(item: dict, tag: str):
    """The first value of `tag` in a DICOM JSON object, or None."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a `multipart/related` message (RFC 2046: parts between
    `--boundary` lines, each headers, a blank line, then the body up to CRLF--boundary)."""
    boundary = None
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise DicomwebError(f"WADO-RS answer is not multipart ({content_type.split(';')[0]})")
    delimiter = b"--" + boundary.encode()
    parts = []
    start = body.find(delimiter)
    while start != -1:
        start += len(delimiter)
        if body[start:start + 2] == b"--":  # the close delimiter
            break
        end = body.find(b"\r\n" + delimiter, start)
        if end == -1:
            raise DicomwebError("WADO-RS answer ends inside a part (cut short)")
        chunk = body[start:end]
        head_end = chunk.find(b"\r\n\r\n")
        if head_end == -1:
            raise DicomwebError("WADO-RS answer has a part without headers")
        parts.append(chunk[head_end + 4:])
        start = end + 2
    return parts
