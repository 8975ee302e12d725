"""`ReportAPI`, the FastAPI ingress of the Serve app: auth, limits, parsing, routes.

It parses uploads and formats responses, and never touches the model: no torch, no
transformers in this process.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures of a Serve
# ingress class at runtime, and string annotations there (Request) fail to resolve.
import asyncio
import hmac
import json
import logging
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from echo_ray import __version__
from echo_ray.interop.fhir import FHIR_MEDIA_TYPE, diagnostic_report
from echo_ray.serving.options import AppArgs, key_digest

logger = logging.getLogger("echo_ray.serve")

DICOM_MEDIA_TYPE = "application/dicom"
MULTIPART_MEDIA_TYPE = "multipart/form-data"
SSE_MEDIA_TYPE = "text/event-stream"
INGRESS_DEPLOYMENT = "ReportAPI"
# The report fields an HTTP response carries (the report dict's, less internals).
_RESPONSE_FIELDS = (
    "study_instance_uid", "series_instance_uid", "sop_instance_uid", "view_position",
    "findings", "impression", "report", "labels", "model_id", "model_version", "decoding",
    "num_tokens", "num_forwards", "tokens_per_forward", "num_files", "file_errors",
)
_PHI_FIELDS = ("patient_name", "patient_id", "patient_birth_date", "source_file")


# Model-side failures that are not the request's fault and pass: 503 + Retry-After.
_UNAVAILABLE = (
    RayActorError,
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)


class _HTTPError(Exception):
    def __init__(self, status: int, error: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.error, self.extra = status, error, extra


_DESCRIPTION = """Draft chest X-ray reports from DICOM studies (echo-ray).

Send one study per request: one or more DICOM files as `multipart/form-data` (any field
name), or one file as an `application/dicom` body. Authenticate with
`Authorization: Bearer <API key>`. `Accept: application/fhir+json` returns an HL7 FHIR R4
DiagnosticReport. Bad input gets 4xx with `{"error": reason, "message": ...}`.
"""

app = FastAPI(title="echo-ray", version=__version__, description=_DESCRIPTION)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(app)
class ReportAPI:
    """HTTP in front of `ReportModel`: auth, limits, parsing, response formats."""

    def __init__(self, model, options: dict, key_digests: list[str]) -> None:
        self.model = model
        args = AppArgs.parse(options)
        self.options, self.default_decoding = args.serve, args.config.decoding.mode
        self.key_digests = key_digests
        self.max_bytes = int(self.options.max_upload_mb * 1024 * 1024)
        self.page_html = self._render_page()

    def _render_page(self) -> str:
        """The review page with this server's settings: whether it needs a key, and its
        decoding modes, the default first."""
        opts = self.options
        default = self.default_decoding
        modes = [default, *(m for m in opts.modes if m != default)]
        html = resources.files("echo_ray.serving").joinpath("review_page.html").read_text()
        html = html.replace("{{MODES}}", json.dumps(modes))
        return html.replace("{{AUTH}}", "false" if self.open else "true")

    # -- open routes

    @app.get("/healthz", summary="Liveness: the HTTP ingress answers")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model replica answers")
    async def readyz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as exc:  # no replica yet, or it is loading / dead
            return JSONResponse({"ready": False, "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"ready": True, "model": info["id"]})

    @app.get("/", response_class=HTMLResponse, summary="Review page: upload a DICOM")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html)

    # -- authenticated routes

    @app.get("/v1/models", summary="The model served, its decoding modes and limits")
    async def models(self, request: Request) -> JSONResponse:
        return await self._guard(request, self._models)

    @app.post(
        "/v1/reports",
        summary="Report one study",
        description="Query: `mode` (a decoding mode of /v1/models), `preview=true` adds the "
        "model's input image as a base64 PNG (`image_png`), `stream=true` (or `Accept: "
        "text/event-stream`) streams server-sent events: `block` events with the report text "
        "so far after each block, then one `report` event with the response fields.",
    )
    async def reports(
        self, request: Request, mode: str | None = None, preview: bool = False,
        stream: bool = False,
    ) -> Response:
        stream = stream or SSE_MEDIA_TYPE in request.headers.get("accept", "")
        return await self._guard(request, self._report, mode=mode, preview=preview,
                                 stream=stream)

    # -- internals

    @property
    def open(self) -> bool:
        return self.options.insecure and not self.key_digests

    async def _guard(self, request: Request, handler, **kwargs) -> Response:
        """Auth, then the handler; every failure becomes a JSON error, never a bare 500."""
        request_id = uuid.uuid4().hex[:16]
        try:
            self._authorize(request)
            return await handler(request, request_id=request_id, **kwargs)
        except _HTTPError as err:
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            body = {"error": err.error, "message": str(err), "request_id": request_id}
            logger.info("request %s: %d %s", request_id, err.status, err.error)
            return JSONResponse({**body, **err.extra}, status_code=err.status, headers=headers)
        except _UNAVAILABLE as exc:  # a replica died or is overloaded: retry later
            logger.warning("request %s: model unavailable (%s)", request_id,
                           type(exc).__name__)
            return JSONResponse(
                {"error": "unavailable", "message": "the model is restarting or overloaded; "
                 "retry shortly", "request_id": request_id},
                status_code=503, headers={"Retry-After": "5"},
            )
        except Exception as exc:  # a bug: say so, without input details
            logger.exception("request %s failed", request_id)
            return JSONResponse(
                {"error": "internal", "message": f"{type(exc).__name__}", "request_id": request_id},
                status_code=500,
            )

    def _authorize(self, request: Request) -> None:
        if self.open:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            digest = key_digest(key.strip())
            if any(hmac.compare_digest(digest, d) for d in self.key_digests):
                return
        raise _HTTPError(401, "unauthorized", "a valid API key is required (Authorization: "
                         "Bearer <key>)")

    async def _models(self, request: Request, request_id: str) -> JSONResponse:
        info = await self.model.info.remote()
        info.pop("replica", None)
        limits = {
            "max_upload_mb": self.options.max_upload_mb,
            "max_files": self.options.max_files,
            "request_timeout_s": self.options.request_timeout_s,
        }
        return JSONResponse({"data": [{**info, "limits": limits}]})

    async def _report(
        self, request: Request, request_id: str, mode: str | None, preview: bool, stream: bool
    ) -> Response:
        start = time.perf_counter()
        decoding = mode or self.default_decoding
        if decoding not in self.options.modes:
            raise _HTTPError(400, "unsupported_mode", f"mode {decoding!r} is not served; "
                             f"choose one of {list(self.options.modes)}")
        files = await self._read_files(request)
        if stream:
            return await self._stream(files, decoding, preview, request_id, start)
        try:
            result = await asyncio.wait_for(
                self.model.report.remote(files, decoding, preview),
                timeout=self.options.request_timeout_s,
            )
        except TimeoutError:
            raise self._timeout() from None
        self._check(result)
        body = self._body(result, request_id, start)
        logger.info("request %s: report, %d files, %s, batch %d, %.0f ms", request_id,
                    len(files), decoding, result["batch_size"], body["latency_ms"])
        if FHIR_MEDIA_TYPE in request.headers.get("accept", ""):
            return JSONResponse(diagnostic_report(result), media_type=FHIR_MEDIA_TYPE)
        return JSONResponse(body)

    async def _stream(self, files, decoding: str, preview: bool, request_id: str,
                      start: float) -> Response:
        """Server-sent events; a bad study is still a plain 4xx (checked before streaming)."""
        events = self.model.options(stream=True).stream.remote(files, decoding, preview)
        try:
            first = await asyncio.wait_for(events.__anext__(),
                                           timeout=self.options.request_timeout_s)
        except TimeoutError:
            events.cancel()
            raise self._timeout() from None
        if first["event"] == "report":
            self._check(first)

        async def sse():
            event = first
            while True:
                if event["event"] == "report":
                    event = {"event": "report", **self._body(event, request_id, start)}
                yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                if event["event"] == "report":
                    return
                event = await events.__anext__()

        return StreamingResponse(sse(), media_type=SSE_MEDIA_TYPE)

    def _check(self, result: dict) -> None:
        if result.get("error"):
            raise _HTTPError(422, result["error"], result["message"],
                             file_errors=result["file_errors"])

    def _body(self, result: dict, request_id: str, start: float) -> dict:
        fields = _RESPONSE_FIELDS + (_PHI_FIELDS if self.options.include_phi else ())
        body = {key: result.get(key) for key in fields}
        if "image_png" in result:
            body["image_png"] = result["image_png"]
        body.update(
            request_id=request_id,
            model_latency_ms=round(result["latency_ms"], 2),
            latency_ms=round(1000 * (time.perf_counter() - start), 2),
            batch_size=result["batch_size"],
        )
        return body

    def _timeout(self) -> _HTTPError:
        return _HTTPError(504, "timeout", f"no report within "
                          f"{self.options.request_timeout_s:g} s; try again")

    async def _read_files(self, request: Request) -> list[tuple[str, bytes]]:
        """The uploaded DICOM files as (name, bytes); names are "file1".. unless PHI is on."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in (DICOM_MEDIA_TYPE, MULTIPART_MEDIA_TYPE):
            raise _HTTPError(415, "unsupported_media_type", f"send {MULTIPART_MEDIA_TYPE} "
                             f"or {DICOM_MEDIA_TYPE}, not {media_type or 'no Content-Type'}")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_bytes:
                raise self._too_large()
        if media_type == DICOM_MEDIA_TYPE:
            files = [("file1", bytes(body))] if body else []
        else:
            files = await self._parse_multipart(request.headers, bytes(body))
        if not files:
            raise _HTTPError(422, "no_files", "the request has no DICOM file")
        if len(files) > self.options.max_files:
            raise _HTTPError(413, "too_many_files", f"{len(files)} files; at most "
                             f"{self.options.max_files} per study")
        return files

    async def _parse_multipart(self, headers: Headers, body: bytes) -> list[tuple[str, bytes]]:
        async def stream():
            yield body

        parser = MultiPartParser(headers, stream(), max_files=self.options.max_files + 1)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            if "files" in str(exc).lower():  # python-multipart's max_files refusal
                raise _HTTPError(413, "too_many_files", f"at most {self.options.max_files} "
                                 "files per study") from None
            raise _HTTPError(400, "bad_multipart", f"could not parse the form: {exc}") from None
        files = []
        for i, (_, value) in enumerate(
            (k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)
        ):
            name = value.filename if self.options.include_phi and value.filename else f"file{i+1}"
            files.append((name, await value.read()))
            await value.close()
        return files

    def _too_large(self) -> _HTTPError:
        return _HTTPError(413, "too_large", f"the upload is over "
                          f"{self.options.max_upload_mb:g} MB")

