"""`ServeOptions`, the `args` of the Serve app, and the API keys it accepts.

Plain Python (no ray, no torch): the ingress and the model replicas both parse their
options here.
"""

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echo_ray.decode.modes import DECODING_MODES

API_KEYS_ENV = "ECHO_RAY_API_KEYS"


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


def key_digest(key: str) -> str:
    """The SHA-256 of an API key: the ingress holds and compares digests, not keys."""
    return hashlib.sha256(key.encode()).hexdigest()
