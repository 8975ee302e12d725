"""Ray Serve: the HTTP report endpoint.

Three deployments, built by `build_app(args)` (the `import_path` of `serve_config.yaml`):

- `ReportAPI` (`ingress.py`), the FastAPI ingress: auth (bearer API keys), limits (upload
  size, files per study, request timeout), media types, the review page, OpenAPI. It
  parses uploads and never touches the model.
- `StudyDecoder` (`decoder.py`), CPU replicas that read a study's DICOM files, choose the
  view, decode and resize it to the model's grid, and encode the preview PNGs; autoscaled
  on their own ongoing requests (decoding a large compressed radiograph takes up to a second
  of one core). A study it cannot prepare is a 4xx from the ingress: the model never sees
  it.
- `ReportModel` (`model.py`), the model replicas: a `ReportGenerator` (one-step fused
  decoding by default) behind `@serve.batch`, so concurrent studies share one forward per
  block; it takes prepared studies only (no DICOM bytes); autoscaled on ongoing requests.
  Batch size and wait live in `user_config`, so a `serve deploy` can change them without
  restarting replicas.

A request: ingress (upload) -> StudyDecoder (prepared study, PNGs) -> ingress (422 if the
study has no usable image) -> ReportModel (report) -> ingress (JSON, FHIR or SSE).

Routes (README "Serving"): `POST /v1/reports`, `POST /v1/reports/signoff`, `GET /v1/models`,
`GET /healthz`, `GET /readyz`, `GET /` (review page), `GET /docs` (Swagger UI, its files
served by the ingress) and `/openapi.json`.

All read their `args` with `AppArgs.parse` (`options.py`). No work happens at import time:
the model loads in each replica's constructor, API keys are read when the app is built.
"""

import logging
import math
from typing import Any

from echo_ray.serving.decoder import StudyDecoder
from echo_ray.serving.ingress import ReportAPI
from echo_ray.serving.model import ReportModel
from echo_ray.serving.options import API_KEYS_ENV, AppArgs, key_digest, load_api_keys

logger = logging.getLogger("echo_ray.serve")


def build_app(args: dict[str, Any]):
    """The Serve application (Serve's `import_path: echo_ray.serving.app:build_app`).

    Args:
        args: a Serve config's `args:` (`serving/options.py` says which keys).

    Raises:
        ValueError: bad args, or no API key configured without `insecure: true`.
    """
    parsed = AppArgs.parse(args)
    options = parsed.serve
    keys = load_api_keys(options)
    if not keys and not options.insecure:
        raise ValueError(
            f"no API keys configured: set ${API_KEYS_ENV} (comma-separated) or args."
            "api_keys_file, or pass insecure: true (--insecure) for local development on "
            "loopback"
        )
    if keys and options.insecure:
        logger.warning("API keys are configured: `insecure` is ignored")
    plain = {**args, "checkpoint": parsed.checkpoint}
    model = ReportModel.options(
        autoscaling_config=_autoscaling(options.min_replicas, options.max_replicas,
                                        options.target_ongoing_requests),
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        user_config={
            "max_batch_size": options.max_batch_size,
            "batch_wait_timeout_s": options.batch_wait_timeout_s,
        },
    ).bind(plain)
    target = options.decoder_target_ongoing_requests
    decoder = StudyDecoder.options(
        autoscaling_config=_autoscaling(options.decoder_min_replicas,
                                        options.decoder_max_replicas, target),
        # a few studies queue in a replica (decoding in threads on its CPU); more wait in
        # the ingress's handle, where the autoscaler counts them too
        max_ongoing_requests=max(2, math.ceil(2 * target)),
        ray_actor_options={"num_cpus": options.decoder_num_cpus},
    ).bind(plain)
    return ReportAPI.options(
        num_replicas=options.ingress_replicas,
        max_ongoing_requests=max(256, 4 * options.max_ongoing_requests),
        ray_actor_options={"num_cpus": 0.1},
    ).bind(model, decoder, plain, [key_digest(k) for k in keys])


def _autoscaling(min_replicas: int, max_replicas: int, target: float) -> dict:
    """Serve's autoscaling_config on ongoing requests per replica."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target,
        "upscale_delay_s": 3,
        "downscale_delay_s": 20,
        "look_back_period_s": 15,  # > Serve's 10 s metrics interval
    }
