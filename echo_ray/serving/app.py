"""Ray Serve: the HTTP report endpoint.

Two deployments, built by `build_app(args)` (the `import_path` of `serve_config.yaml`):

- `ReportAPI`, the FastAPI ingress: auth (bearer API keys), limits (upload size, files per
  study, request timeout), media types, the review page, OpenAPI. It parses uploads and
  never touches the model.
- `ReportModel`, the model replicas: a `ReportGenerator` (one-step fused decoding by
  default) behind `@serve.batch`, so concurrent studies share one forward per block;
  autoscaled on ongoing requests. Batch size and wait live in `user_config`, so a
  `serve deploy` can change them without restarting replicas.

Routes (README "Serving"): `POST /v1/reports`, `GET /v1/models`, `GET /healthz`,
`GET /readyz`, `GET /` (review page), `GET /docs` and `/openapi.json`.

No work happens at import time: the model loads in each replica's constructor, API keys are
read when the app is built.
"""

# No `from __future__ import annotations`: FastAPI resolves the route signatures of a Serve
# ingress class at runtime, and string annotations there (Request) fail to resolve.
import asyncio
import base64
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
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
from echo_ray.data.storage import model_name
from echo_ray.decode.modes import DECODING_MODES
from echo_ray.interop.fhir import FHIR_MEDIA_TYPE, diagnostic_report

logger = logging.getLogger("echo_ray.serve")

API_KEYS_ENV = "ECHO_RAY_API_KEYS"
DICOM_MEDIA_TYPE = "application/dicom"
MULTIPART_MEDIA_TYPE = "multipart/form-data"
SSE_MEDIA_TYPE = "text/event-stream"
MODEL_DEPLOYMENT = "ReportModel"
INGRESS_DEPLOYMENT = "ReportAPI"
# The report fields an HTTP response carries (the report dict's, less internals).
_RESPONSE_FIELDS = (
    "study_instance_uid", "series_instance_uid", "sop_instance_uid", "view_position",
    "findings", "impression", "report", "labels", "model_id", "model_version", "decoding",
    "num_tokens", "num_forwards", "tokens_per_forward", "num_files", "file_errors",
)
_PHI_FIELDS = ("patient_name", "patient_id", "patient_birth_date", "source_file")


@dataclass(frozen=True)
class ServeOptions:
    """The `args` of `build_app` (and of `serve_config.yaml`'s application).

    Deployment settings here are defaults: a `deployments:` entry in a Serve config
    overrides them (autoscaling, `max_ongoing_requests`, `ray_actor_options`,
    `user_config`).
    """

    checkpoint: str
    """Model directory (a run's `model/`), local or s3://."""
    model_id: str | None = None
    """The id reports carry; default: the run's name (`runs/dcd/model` -> "dcd")."""
    decoding: str = "one-step-fused"
    """Default decoding mode; a request may pick another one of `modes`."""
    modes: tuple[str, ...] = DECODING_MODES
    """Decoding modes requests may ask for."""
    max_new_tokens: int | None = None
    threshold: float = 0.9
    """tau of the multi-step mode."""
    max_batch_size: int = 16
    """Studies decoded together (`@serve.batch`); 1 turns batching off."""
    batch_wait_timeout_s: float = 0.05
    """How long a replica waits for a batch to fill."""
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    """Autoscaling target per model replica."""
    max_ongoing_requests: int = 32
    """Per model replica; must be >= max_batch_size for batches to fill."""
    num_cpus: float = 1.0
    """Per model replica."""
    num_gpus: float = 0.0
    """Per model replica: 1 on a GPU cluster, 0 on CPU."""
    threads: int = 1
    """torch threads per model replica (CPU)."""
    ingress_replicas: int = 1
    max_upload_mb: float = 64.0
    """413 above this body size."""
    max_files: int = 8
    """413 above this many files in one study."""
    request_timeout_s: float = 60.0
    """504 when a report takes longer."""
    api_keys_file: str | None = None
    """One key per line (# comments); keys also come from $ECHO_RAY_API_KEYS."""
    insecure: bool = False
    """Serve without API keys (development on loopback only)."""
    include_phi: bool = False
    """Return patient name / ID / birth date and uploaded file names in reports."""
    s3_endpoint: str | None = None
    modalities: tuple[str, ...] | None = None
    """Accepted DICOM Modality values; None: the radiograph ones (CR, DX, DR, RG)."""

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ValueError(f"unknown echo-ray serve args {unknown}; known: {sorted(names)}")
        if not args.get("checkpoint"):
            raise ValueError("echo-ray serve needs args.checkpoint (a model directory)")
        args = dict(args)
        for key in ("modes", "modalities"):
            if args.get(key) is not None:
                args[key] = tuple(args[key])
        options = cls(**args)
        options.validate()
        return options

    def validate(self) -> None:
        bad = sorted(set(self.modes) - set(DECODING_MODES))
        if bad:
            raise ValueError(f"unknown decoding modes {bad}; choose from {DECODING_MODES}")
        if self.decoding not in self.modes:
            raise ValueError(f"decoding {self.decoding!r} is not one of modes {self.modes}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if self.max_batch_size < 1 or self.max_files < 1 or self.max_upload_mb <= 0:
            raise ValueError("max_batch_size, max_files and max_upload_mb must be positive")


def load_api_keys(options: ServeOptions) -> list[str]:
    """Keys from `options.api_keys_file` and $ECHO_RAY_API_KEYS (comma-separated)."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")]
    if options.api_keys_file:
        lines = Path(options.api_keys_file).read_text().splitlines()
        keys += [line.split("#", 1)[0].strip() for line in lines]
    return [k for k in keys if k]


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# ----------------------------------------------------------------------------- model


@serve.deployment(name=MODEL_DEPLOYMENT)
class ReportModel:
    """A `ReportGenerator` replica; concurrent studies are decoded as one batch."""

    def __init__(self, options: dict) -> None:
        from echo_ray.data.prepare import setup_model_actor
        from echo_ray.data.storage import local_model_dir, resolve_model_dir
        from echo_ray.decode.predictor import ReportGenerator

        opts = ServeOptions.from_args(options)
        device = setup_model_actor(opts.threads, use_gpu=opts.num_gpus > 0)
        loc = resolve_model_dir(opts.checkpoint, s3_endpoint=opts.s3_endpoint, what="checkpoint")
        # an s3:// model is downloaded into this replica's own folder (replicas of one node
        # must not write the same files); a local one is used in place
        self.path = local_model_dir(loc, tempfile.mkdtemp(prefix="echo-serve-model-"))
        kwargs = {"modalities": opts.modalities} if opts.modalities is not None else {}
        self.generator = ReportGenerator.from_checkpoint(
            self.path,
            decoding=opts.decoding,
            threshold=opts.threshold,
            max_new_tokens=opts.max_new_tokens,
            include_phi=opts.include_phi,
            model_id=opts.model_id or model_name(opts.checkpoint),
            **kwargs,
        ).to(device)
        self.options = opts
        self.replica = serve.get_replica_context().replica_tag
        self._set_batching(opts.max_batch_size, opts.batch_wait_timeout_s)
        self.generator.warm_up()  # not in the first request's latency

    def reconfigure(self, config: dict) -> None:
        """`user_config`: {max_batch_size, batch_wait_timeout_s}."""
        self._set_batching(
            int(config.get("max_batch_size", self.options.max_batch_size)),
            float(config.get("batch_wait_timeout_s", self.options.batch_wait_timeout_s)),
        )

    def _set_batching(self, size: int, wait: float) -> None:
        self.max_batch_size, self.batch_wait_timeout_s = size, wait
        self._report_batch.set_max_batch_size(size)
        self._report_batch.set_batch_wait_timeout_s(wait)

    def info(self) -> dict:
        config = self.generator.model.config
        return {
            "id": self.generator.model_id,
            "version": self.generator.model_version,
            "default_decoding": self.options.decoding,
            "modes": list(self.options.modes),
            "block_length": self.generator.model.block_length,
            "image_size": config.image_size,
            "max_new_tokens": self.generator.max_new_tokens or config.max_response_len,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "replica": self.replica,
        }

    async def report(self, files: list[tuple[str, bytes]], decoding: str, preview: bool):
        return await self._report_batch((files, decoding, preview))

    async def stream(self, files: list[tuple[str, bytes]], decoding: str, preview: bool = False):
        """One study alone (no batching), streamed: {"event": "block", "text"} per final
        block, then {"event": "report", ...the report or error dict}."""
        from echo_ray.decode.studies import report_studies

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_text(texts: list[str]) -> None:  # called in the decoding thread
            loop.call_soon_threadsafe(queue.put_nowait, ("block", texts[0]))

        async def decode() -> None:
            try:
                out = await asyncio.to_thread(
                    report_studies, self.generator, [files], decoding=decoding,
                    on_text=on_text, with_image=True,
                )
                queue.put_nowait(("report", out[0]))
            except Exception as exc:  # surfaces in the stream's consumer
                queue.put_nowait(("failed", exc))

        task = asyncio.create_task(decode())
        blocks = 0
        while True:
            kind, value = await queue.get()
            if kind == "block":
                blocks += 1
                yield {"event": "block", "block": blocks, "text": value}
                continue
            await task
            if kind == "failed":
                raise value
            image = value.pop("image", None)
            if image is not None and preview:
                value["image_png"] = _png_base64(image)
            yield {"event": "report", **value, "batch_size": 1, "replica": self.replica}
            return

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _report_batch(self, requests: list[tuple]) -> list[dict]:
        from echo_ray.decode.studies import report_studies

        results: list[dict | None] = [None] * len(requests)
        by_mode: dict[str, list[int]] = {}
        for i, (_, decoding, _) in enumerate(requests):
            by_mode.setdefault(decoding, []).append(i)
        for decoding, idx in by_mode.items():
            studies = [requests[i][0] for i in idx]
            out = await asyncio.to_thread(
                report_studies, self.generator, studies, decoding=decoding, with_image=True
            )
            for i, result in zip(idx, out, strict=True):
                image = result.pop("image", None)
                if image is not None and requests[i][2]:
                    result["image_png"] = _png_base64(image)
                result["batch_size"] = len(idx)
                result["replica"] = self.replica
                results[i] = result
        return results


def _png_base64(image) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- ingress


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
        self.options = ServeOptions.from_args(options)
        self.key_digests = key_digests
        self.max_bytes = int(self.options.max_upload_mb * 1024 * 1024)
        self.page_html = self._render_page()

    def _render_page(self) -> str:
        """The review page with this server's settings: whether it needs a key, and its
        decoding modes, the default first."""
        opts = self.options
        modes = [opts.decoding, *(m for m in opts.modes if m != opts.decoding)]
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
            digest = _digest(key.strip())
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
        decoding = mode or self.options.decoding
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


# ----------------------------------------------------------------------------- app


def build_app(args: dict[str, Any]):
    """The Serve application (Serve's `import_path: echo_ray.serve:build_app`).

    Args:
        args: `ServeOptions` fields (a Serve config's `args:`).

    Raises:
        ValueError: bad args, or no API key configured without `insecure: true`.
    """
    options = ServeOptions.from_args(args)
    if not options.checkpoint.startswith("s3://"):
        options = dataclasses.replace(options, checkpoint=os.path.abspath(options.checkpoint))
    keys = load_api_keys(options)
    if not keys and not options.insecure:
        raise ValueError(
            f"no API keys configured: set ${API_KEYS_ENV} (comma-separated) or args."
            "api_keys_file, or pass insecure: true (--insecure) for local development on "
            "loopback"
        )
    if keys and options.insecure:
        logger.warning("API keys are configured: `insecure` is ignored")
    plain = dataclasses.asdict(options)
    model = ReportModel.options(
        autoscaling_config={
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": 3,
            "downscale_delay_s": 20,
            "look_back_period_s": 15,  # > Serve's 10 s metrics interval
        },
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        user_config={
            "max_batch_size": options.max_batch_size,
            "batch_wait_timeout_s": options.batch_wait_timeout_s,
        },
    ).bind(plain)
    return ReportAPI.options(
        num_replicas=options.ingress_replicas,
        max_ongoing_requests=max(256, 4 * options.max_ongoing_requests),
        ray_actor_options={"num_cpus": 0.1},
    ).bind(model, plain, [_digest(k) for k in keys])
