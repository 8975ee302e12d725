"""`ReportAPI`, the FastAPI ingress of the Serve app: auth, limits, parsing, routes, errors.

It parses uploads and formats responses, and never touches the model: no torch, no
transformers in this process. A study's files go to `StudyDecoder` (the CPU deployment that
decodes them); a study it cannot prepare is a 422 here, and only a prepared one (the image
at the model's grid, no DICOM bytes) goes on to `ReportModel`. Every error, FastAPI's own
(404, 405, a bad query) included, is `{"error", "message", "request_id"}`
(`schemas.ErrorBody`), and `request_id` is the request's `x-request-id`: the one Serve's
proxy takes from the client or makes, and returns as the response's `x-request-id` header.
`/docs` is Swagger UI from the `fastapi-swagger` package, served here: the page loads
nothing from outside the server.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures of a Serve
# ingress class at runtime, and string annotations there (Request) fail to resolve.
import asyncio
import hmac
import json
import logging
import time
import uuid
from functools import cache
from http import HTTPStatus
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from echo_ray import __version__
from echo_ray.interop.fhir import FHIR_MEDIA_TYPE, diagnostic_report
from echo_ray.interop.signoff import SignoffError, SignoffRequest, sign_off
from echo_ray.serving.options import AppArgs, key_digest
from echo_ray.serving.page import render_review_page
from echo_ray.serving.schemas import (
    PHI_FIELDS,
    REPORT_FIELDS,
    ErrorBody,
    Health,
    ModelList,
    NotReady,
    Ready,
    ReportBody,
    StudyErrorBody,
)

logger = logging.getLogger("echo_ray.serve")

DICOM_MEDIA_TYPE = "application/dicom"
MULTIPART_MEDIA_TYPE = "multipart/form-data"
JSON_MEDIA_TYPE = "application/json"
SSE_MEDIA_TYPE = "text/event-stream"
INGRESS_DEPLOYMENT = "ReportAPI"
REQUEST_ID_HEADER = "x-request-id"  # Serve's (ray.serve._private.constants)
# Swagger UI's files (package fastapi-swagger), served under /docs/.
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "application/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
_ASSET_PACKAGE = "fastapi_swagger.resources"

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
name), or one file as an `application/dicom` body. Authenticate the `/v1` routes with
`Authorization: Bearer <API key>` (Authorize, above). `Accept: application/fhir+json` returns
an HL7 FHIR R4 DiagnosticReport, `Accept: application/dicom` a DICOM Structured Report (a
preliminary, AI-generated Comprehensive SR in the study of the uploaded image);
`POST /v1/reports/signoff` turns a reviewed draft into a final (or cancelled) one. Every
error is `{"error": reason, "message", "request_id"}`, and `request_id` is also the
`x-request-id` response header.
"""

app = FastAPI(
    title="echo-ray", version=__version__, description=_DESCRIPTION,
    docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,  # /docs: see below
    responses={
        404: {"model": ErrorBody, "description": "No such route (`not_found`)."},
        405: {"model": ErrorBody, "description": "Wrong method for the route "
              "(`method_not_allowed`; the `Allow` header lists the right ones)."},
    },
)
# Declares bearer auth in the OpenAPI schema; `ReportAPI._authorize` checks the key.
_BEARER = HTTPBearer(auto_error=False, scheme_name="bearerAuth",
                     description="An API key of the server ($ECHO_RAY_API_KEYS or "
                     "api_keys_file).")
_AUTH = [Depends(_BEARER)]


def _error(status: int, error: str, message: str, description: str = "",
           model: type = ErrorBody) -> dict:
    return {status: {"model": model, "description": description or f"`{error}`: {message}"}}


_E401 = _error(401, "unauthorized", "no key, or not a valid one (also `WWW-Authenticate: "
               "Bearer`).")
_E503 = _error(503, "unavailable", "the model replica is restarting or overloaded; retry "
               "after `Retry-After` seconds.")

# --------------------------------------------------------------------------- the schema


def _binary(description: str) -> dict:
    return {"type": "string", "format": "binary", "description": description}


_REPORT_BODY = {
    "required": True,
    "content": {
        MULTIPART_MEDIA_TYPE: {"schema": {
            "type": "object",
            "properties": {"file": {"type": "array", "items": _binary("A DICOM file."),
                                    "description": "The study's files (any field name)."}},
            "required": ["file"],
        }},
        DICOM_MEDIA_TYPE: {"schema": _binary("One DICOM file.")},
    },
}
_SIGNOFF_BODY = {
    "required": True,
    "content": {JSON_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/SignoffRequest"}}},
}
_FHIR_OBJECT = {"type": "object", "description": "An HL7 FHIR R4 DiagnosticReport."}
_DICOM_SR = _binary("A DICOM Part 10 file: the draft as a Comprehensive SR (preliminary, "
                    "unverified, AI-generated), in the uploaded image's study and patient, "
                    "referencing the reported image (`interop/sr.py`).")


def _openapi() -> dict:
    """FastAPI's schema, plus the models only request bodies name (FastAPI does not read
    them: the routes parse their bodies themselves, after auth)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        _, defs = models_json_schema([(SignoffRequest, "validation")],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi

# ----------------------------------------------------------- errors outside the routes


def accepts(request: Request, media_type: str) -> bool:
    """Whether the request's Accept header names `media_type` itself (parameters such as
    `q` aside; `application/dicom+json` is not `application/dicom`)."""
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip().lower() == media_type for part in accept.split(","))


def request_id_of(request: Request) -> str:
    """This request's id: Serve's `x-request-id` (the client's, or the one Serve's proxy
    added and returns in the response header)."""
    request_id = request.headers.get(REQUEST_ID_HEADER)
    if request_id:
        return request_id
    if getattr(request.state, "request_id", None) is None:
        request.state.request_id = uuid.uuid4().hex
    return request.state.request_id


def error_response(request: Request, status: int, error: str, message: str,
                   headers: dict | None = None, **extra: Any) -> JSONResponse:
    """The project's error body. The id header is set only when the request came without
    one (not through Serve's proxy, which adds it to the response itself)."""
    request_id = request_id_of(request)
    headers = dict(headers or {})
    if REQUEST_ID_HEADER not in request.headers:
        headers[REQUEST_ID_HEADER] = request_id
    body = {"error": error, "message": message, "request_id": request_id, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own errors (404, 405, ...) in the project's format."""
    phrase = HTTPStatus(exc.status_code).phrase
    reason = phrase.lower().replace(" ", "_").replace("-", "_")
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message = f"no route {where}; the routes are listed at /docs"
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        message = f"{where} is not allowed; allowed: {allow}" if allow else f"{where}: {phrase}"
    else:
        message = exc.detail if isinstance(exc.detail, str) else phrase
    return error_response(request, exc.status_code, reason, message, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
    return error_response(request, 422, "invalid_request", "; ".join(problems))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("request %s: %s outside a route", request_id_of(request), type(exc).__name__)
    return error_response(request, 500, "internal", type(exc).__name__)


@cache
def _asset(name: str) -> bytes:
    return resources.files(_ASSET_PACKAGE).joinpath(name).read_bytes()


# ----------------------------------------------------------------------------- the app


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(app)
class ReportAPI:
    """HTTP in front of `StudyDecoder` and `ReportModel`: auth, limits, parsing, response
    formats."""

    def __init__(self, model, decoder, options: dict, key_digests: list[str]) -> None:
        self.model, self.decoder = model, decoder
        args = AppArgs.parse(options)
        self.options = args.serve
        self.key_digests = key_digests
        self.max_bytes = int(self.options.max_upload_mb * 1024 * 1024)
        self._info: dict | None = None  # the model's info(): modes, default, image_size
        self._page: str | None = None

    # -- open routes

    @app.get("/healthz", summary="Liveness: the HTTP ingress answers",
             responses={200: {"model": Health}})
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model replica answers",
             responses={200: {"model": Ready},
                        503: {"model": NotReady, "description": "No model replica answers "
                              "yet (`not_ready`)."}})
    async def readyz(self, request: Request) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.model.info.remote(), timeout=10)
        except Exception as exc:  # no replica yet, or it is loading / dead
            return error_response(request, 503, "not_ready", "no model replica answers yet "
                                  f"({type(exc).__name__}); retry shortly", ready=False)
        return JSONResponse({"ready": True, "model": info["id"]})

    @app.get("/", response_class=HTMLResponse, summary="Review page: upload a study, review "
             "and sign off its draft", responses=_E503)
    async def page(self, request: Request) -> Response:
        return await self._guard(request, self._review_page, auth=False)

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title="echo-ray API",
            swagger_js_url=f"{root}/docs/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # no call to swagger.io
        )

    @app.get("/docs/{name}", include_in_schema=False)
    async def docs_asset(self, request: Request, name: str) -> Response:
        if name not in DOCS_ASSETS:
            return error_response(request, 404, "not_found", f"no docs file {name!r}")
        return Response(_asset(name), media_type=DOCS_ASSETS[name],
                        headers={"Cache-Control": "public, max-age=86400"})

    # -- authenticated routes

    @app.get("/v1/models", summary="The model served, its decoding modes and limits",
             dependencies=_AUTH, responses={200: {"model": ModelList}, **_E401, **_E503})
    async def models(self, request: Request) -> JSONResponse:
        return await self._guard(request, self._models)

    @app.post(
        "/v1/reports",
        summary="Report one study",
        description="Query: `mode` (one of the `modes` of /v1/models), `preview=true` adds the "
        "model's input image (`image_png`) and the reported file at up to 1024 px "
        "(`view_png`) as base64 PNGs, `stream=true` (or `Accept: text/event-stream`) streams "
        "server-sent events: `block` events `{event, block, text}` with the report text so "
        "far after each block, then one `report` event with the response body. `Accept: "
        "application/fhir+json` returns a FHIR R4 DiagnosticReport (status preliminary); "
        "`Accept: application/dicom` returns the draft as a DICOM Structured Report (one "
        "Part 10 file: a preliminary, AI-generated Comprehensive SR in the uploaded study, "
        "not streamed). Errors stay JSON.",
        dependencies=_AUTH,
        openapi_extra={"requestBody": _REPORT_BODY},
        responses={
            200: {"model": ReportBody, "description": "The draft report.", "content": {
                FHIR_MEDIA_TYPE: {"schema": _FHIR_OBJECT},
                DICOM_MEDIA_TYPE: {"schema": _DICOM_SR},
                SSE_MEDIA_TYPE: {"schema": {"type": "string", "description": "Server-sent "
                                            "events (stream=true)."}},
            }},
            **_error(400, "unsupported_mode", "", "`unsupported_mode` (a mode this server "
                     "does not serve; the message names those it does) or `bad_multipart`."),
            **_E401,
            **_error(413, "too_large", "", "`too_large` (over max_upload_mb) or "
                     "`too_many_files` (over max_files)."),
            **_error(406, "not_acceptable", "a DICOM SR (`Accept: application/dicom`) is "
                     "one file, not a stream: ask for it without stream=true."),
            **_error(415, "unsupported_media_type", "send multipart/form-data or "
                     "application/dicom."),
            **_error(422, "", "", "The study could not be reported: `error` is the DICOM or "
                     "study reason (not_dicom, truncated, no_frontal_view, mixed_studies, "
                     "no_files, ...) with `file_errors` and `num_files`; or "
                     "`invalid_request` (a query parameter of the wrong type); or "
                     "`cannot_build_sr` (`Accept: application/dicom` and a draft or header "
                     "a DICOM SR cannot be made of, e.g. a draft without text).",
                     model=StudyErrorBody),
            **_E503,
            **_error(504, "timeout", "no report within request_timeout_s; try again."),
        },
    )
    async def reports(
        self, request: Request, mode: str | None = None, preview: bool = False,
        stream: bool = False,
    ) -> Response:
        stream = stream or accepts(request, SSE_MEDIA_TYPE)
        return await self._guard(request, self._report, mode=mode, preview=preview,
                                 stream=stream)

    @app.post(
        "/v1/reports/signoff",
        summary="Accept or reject a draft: the signed FHIR DiagnosticReport",
        description="Body: the draft as /v1/reports returned it, the radiologist's findings "
        "and impression, `decision` and `signed_by`. Returns an HL7 FHIR R4 "
        "DiagnosticReport: accept -> status final (the signed text, then the unedited "
        "machine draft, which keeps its AIAST label; labels re-read from the signed text); "
        "reject -> status cancelled. Nothing is stored.",
        dependencies=_AUTH,
        openapi_extra={"requestBody": _SIGNOFF_BODY},
        response_class=Response,  # the 200 is FHIR JSON only
        responses={
            200: {"description": "The DiagnosticReport.",
                  "content": {FHIR_MEDIA_TYPE: {"schema": _FHIR_OBJECT}}},
            **_E401,
            **_error(413, "too_large", "the body is over max_upload_mb."),
            **_error(415, "unsupported_media_type", "send application/json."),
            **_error(422, "invalid_signoff", "the body is not a sign-off: the message names "
                     "each field that is missing or wrong."),
        },
    )
    async def signoff(self, request: Request) -> Response:
        return await self._guard(request, self._signoff)

    # -- internals

    @property
    def open(self) -> bool:
        return self.options.insecure and not self.key_digests

    async def _guard(self, request: Request, handler, *, auth: bool = True,
                     **kwargs) -> Response:
        """Auth, then the handler; every failure becomes a JSON error, never a bare 500."""
        request_id = request_id_of(request)
        try:
            if auth:
                self._authorize(request)
            return await handler(request, request_id=request_id, **kwargs)
        except _HTTPError as err:
            headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
            logger.info("request %s: %d %s", request_id, err.status, err.error)
            return error_response(request, err.status, err.error, str(err), headers,
                                  **err.extra)
        except _UNAVAILABLE as exc:  # a replica died or is overloaded: retry later
            logger.warning("request %s: model unavailable (%s)", request_id,
                           type(exc).__name__)
            return error_response(request, 503, "unavailable", "the model is restarting or "
                                  "overloaded; retry shortly", {"Retry-After": "5"})
        except Exception as exc:  # a bug: say so, without input details
            logger.exception("request %s failed", request_id)
            return error_response(request, 500, "internal", type(exc).__name__)

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

    async def _model_info(self) -> dict:
        """The model replicas' `info()`, asked once: every replica loads the same checkpoint
        with the same args (decoding modes, default first; the image size they read)."""
        if self._info is None:
            try:
                self._info = await asyncio.wait_for(self.model.info.remote(), timeout=30)
            except TimeoutError:
                raise _HTTPError(503, "unavailable", "no model replica answers yet; retry "
                                 "shortly") from None
        return self._info

    async def _modes(self) -> tuple[list[str], str]:
        """The decoding modes the model replicas serve (default first) and the default."""
        info = await self._model_info()
        return list(info["modes"]), info["default_decoding"]

    async def _review_page(self, request: Request, request_id: str) -> HTMLResponse:
        if self._page is None:
            modes, _ = await self._modes()
            root = request.scope.get("root_path", "")
            self._page = render_review_page(modes=modes, auth=not self.open, root_path=root)
        return HTMLResponse(self._page)

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
        dicom = accepts(request, DICOM_MEDIA_TYPE)
        if dicom and stream:
            raise _HTTPError(406, "not_acceptable", f"a DICOM SR ({DICOM_MEDIA_TYPE}) is one "
                             "file, not a stream: ask for it without stream=true and without "
                             f"{SSE_MEDIA_TYPE}")
        modes, default = await self._modes()
        decoding = mode or default
        if decoding not in modes:
            raise _HTTPError(400, "unsupported_mode", f"mode {decoding!r} is not served by "
                             f"this model; choose one of {modes}")
        files, names = await self._read_files(request)
        read = time.perf_counter()  # request_timeout_s counts from here: decode + model
        decoded = await self._decode(files, preview, read, keep_header=dicom)
        if stream:
            return await self._stream(decoded, names, decoding, request_id, start, read)
        try:
            result = await asyncio.wait_for(self.model.report.remote(decoded.study, decoding),
                                            timeout=self._time_left(read))
        except TimeoutError:
            raise self._timeout() from None
        self._check(result)
        result.update(decoded.pngs)
        body = self._body(result, names, request_id, start)
        logger.info("request %s: report, %d files, %s, batch %d, %.0f ms", request_id,
                    len(files), decoding, result["batch_size"], body["latency_ms"])
        if dicom:
            return await self._structured_report(result, decoded.source_header)
        if accepts(request, FHIR_MEDIA_TYPE):
            return JSONResponse(diagnostic_report(result), media_type=FHIR_MEDIA_TYPE)
        return JSONResponse(body)

    async def _decode(self, files: list[tuple[str, bytes]], preview: bool, read: float,
                      keep_header: bool = False):
        """The study prepared by `StudyDecoder` (`decoder.DecodedStudy`, with the reported
        file's header when `keep_header`); a study that cannot be reported is a 422 here,
        before the model is asked."""
        info = await self._model_info()
        try:
            decoded = await asyncio.wait_for(
                self.decoder.prepare.remote(files, info["image_size"], preview, keep_header),
                timeout=self._time_left(read),
            )
        except TimeoutError:
            raise self._timeout() from None
        if decoded.study.error is not None:
            self._check(decoded.study.error_row())
        return decoded

    async def _structured_report(self, result: dict, header: bytes | None) -> Response:
        """The draft as a DICOM SR file (`interop.sr`), built in a thread (highdicom is
        imported here, on the first such request). The SR carries the uploaded file's
        patient and study, as any SR of the study must: it goes back to the caller that
        sent them, never to a log."""
        from echo_ray.interop.sr import build_sr, sr_bytes

        try:
            sr = await asyncio.to_thread(build_sr, result, header)
        except ValueError as exc:  # its messages name no patient identifier
            raise _HTTPError(422, "cannot_build_sr", f"no DICOM SR of this draft: {exc}",
                             file_errors=result.get("file_errors", []),
                             num_files=result.get("num_files")) from None
        return Response(sr_bytes(sr), media_type=DICOM_MEDIA_TYPE, headers={
            "Content-Disposition": f'attachment; filename="{sr.SOPInstanceUID}.dcm"'})

    async def _stream(self, decoded, names: dict[str, str], decoding: str, request_id: str,
                      start: float, read: float) -> Response:
        """Server-sent events of a prepared study (a bad one was a plain 4xx already)."""
        events = self.model.options(stream=True).stream.remote(decoded.study, decoding)
        try:
            first = await asyncio.wait_for(events.__anext__(), timeout=self._time_left(read))
        except TimeoutError:
            events.cancel()
            raise self._timeout() from None
        if first["event"] == "report":
            self._check(first)

        async def sse():
            event = first
            while True:
                if event["event"] == "report":
                    event = {"event": "report", **self._body({**event, **decoded.pngs}, names,
                                                             request_id, start)}
                yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                if event["event"] == "report":
                    return
                event = await events.__anext__()

        return StreamingResponse(sse(), media_type=SSE_MEDIA_TYPE)

    async def _signoff(self, request: Request, request_id: str) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE:
            raise _HTTPError(415, "unsupported_media_type", f"send {JSON_MEDIA_TYPE}, not "
                             f"{media_type or 'no Content-Type'}")
        raw = await self._read_body(request)
        try:
            resource = sign_off(json.loads(raw))
        except ValueError as exc:  # JSONDecodeError and SignoffError are ValueErrors
            message = str(exc) if isinstance(exc, SignoffError) else f"not JSON: {exc}"
            raise _HTTPError(422, "invalid_signoff", message) from None
        logger.info("request %s: signoff, %s", request_id, resource["status"])
        return JSONResponse(resource, media_type=FHIR_MEDIA_TYPE)

    def _check(self, result: dict) -> None:
        if result.get("error"):
            raise _HTTPError(422, result["error"], result["message"],
                             file_errors=result["file_errors"], num_files=result["num_files"])

    def _body(self, result: dict, names: dict[str, str], request_id: str,
              start: float) -> dict:
        """The response body (`schemas.ReportBody`) of a model replica's report dict."""
        body = {key: result.get(key) for key in REPORT_FIELDS}
        if self.options.include_phi:
            body.update({key: result.get(key) for key in PHI_FIELDS})
            body["source_file"] = names.get(result.get("source_file"))
        for key in ("image_png", "view_png"):
            if key in result:
                body[key] = result[key]
        body.update(
            request_id=request_id,
            model_latency_ms=round(result["latency_ms"], 2),
            latency_ms=round(1000 * (time.perf_counter() - start), 2),
            batch_size=result["batch_size"],
        )
        return body

    def _time_left(self, since: float) -> float:
        """Seconds left of this request's `request_timeout_s`, which counts from `since`
        (the upload read) over decode and model together."""
        return max(0.0, self.options.request_timeout_s - (time.perf_counter() - since))

    def _timeout(self) -> _HTTPError:
        return _HTTPError(504, "timeout", f"no report within "
                          f"{self.options.request_timeout_s:g} s; try again")

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_bytes:
                raise self._too_large()
        return bytes(body)

    async def _read_files(self, request: Request
                          ) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
        """The uploaded DICOM files as ("fileK", bytes), the K-th file of the request, and
        each "fileK"'s uploaded name (for `include_phi`; never sent to the model)."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in (DICOM_MEDIA_TYPE, MULTIPART_MEDIA_TYPE):
            raise _HTTPError(415, "unsupported_media_type", f"send {MULTIPART_MEDIA_TYPE} "
                             f"or {DICOM_MEDIA_TYPE}, not {media_type or 'no Content-Type'}")
        body = await self._read_body(request)
        if media_type == DICOM_MEDIA_TYPE:
            uploads = [("file1", body)] if body else []
        else:
            uploads = await self._parse_multipart(request.headers, body)
        if not uploads:
            raise _HTTPError(422, "no_files", "the request has no DICOM file")
        if len(uploads) > self.options.max_files:
            raise _HTTPError(413, "too_many_files", f"{len(uploads)} files; at most "
                             f"{self.options.max_files} per study")
        files = [(f"file{i + 1}", data) for i, (_, data) in enumerate(uploads)]
        return files, {f"file{i + 1}": name for i, (name, _) in enumerate(uploads)}

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
        for i, value in enumerate(v for _, v in form.multi_items() if isinstance(v, UploadFile)):
            files.append((value.filename or f"file{i + 1}", await value.read()))
            await value.close()
        return files

    def _too_large(self) -> _HTTPError:
        return _HTTPError(413, "too_large", f"the upload is over "
                          f"{self.options.max_upload_mb:g} MB")
