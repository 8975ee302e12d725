"""Ray Serve: the HTTP report endpoint.

Two deployments, built by `build_app(args)` (the `import_path` of `serve_config.yaml`):

- `ReportAPI` (`ingress.py`), the FastAPI ingress: auth (bearer API keys), limits (upload
  size, files per study, request timeout), media types, the review page, OpenAPI. It
  parses uploads and never touches the model.
- `ReportModel` (`model.py`), the model replicas: a `ReportGenerator` (one-step fused
  decoding by default) behind `@serve.batch`, so concurrent studies share one forward per
  block; autoscaled on ongoing requests. Batch size and wait live in `user_config`, so a
  `serve deploy` can change them without restarting replicas.

Routes (README "Serving"): `POST /v1/reports`, `POST /v1/reports/signoff`, `GET /v1/models`,
`GET /healthz`, `GET /readyz`, `GET /` (review page), `GET /docs` (Swagger UI, its files
served by the ingress) and `/openapi.json`.

Both read their `args` with `AppArgs.parse` (`options.py`). No work happens at import time:
the model loads in each replica's constructor, API keys are read when the app is built.
"""

import logging
from typing import Any

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
    ).bind(model, plain, [key_digest(k) for k in keys])
