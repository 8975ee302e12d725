"""The Serve app's `args` (a Serve config's `args:`, or what `echo-ray serve` builds from its
flags), read into the config tree, and the API keys the app accepts.

`args` is a flat mapping: `checkpoint` and `s3_endpoint` (where the model is), every field of
the `serve` config section by its own name, and the decoding and data settings by the names
in `APP_ARG_KEYS` (`decoding`, `steps`, `threshold`, `max_new_tokens`, `low_confidence`,
`modalities`). The ingress and the model replicas both read their `args` here, and
`served_modes` says which decoding modes a server offers. Plain Python (no ray, no torch).
"""

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echo_ray.config.overrides import from_dict
from echo_ray.config.schema import ConfigError, EchoConfig, ServeConfig

API_KEYS_ENV = "ECHO_RAY_API_KEYS"
# App args that are not `serve.*` fields: the config field each one sets.
APP_ARG_KEYS = {
    "decoding": ("decoding", "mode"),
    "steps": ("decoding", "steps"),
    "threshold": ("decoding", "threshold"),
    "max_new_tokens": ("decoding", "max_new_tokens"),
    "low_confidence": ("decoding", "low_confidence"),
    "modalities": ("data", "modalities"),
}
# `echo-ray serve` settings that a Serve config sets in `http_options` instead.
_CLI_ONLY = ("host", "port")


@dataclass(frozen=True)
class AppArgs:
    """The Serve app's `args`, read: where the model is, and the config it runs with."""

    checkpoint: str
    """Model directory (a run's `model/`), local or s3://."""
    s3_endpoint: str | None
    """S3 endpoint URL for an s3:// checkpoint (else AWS_ENDPOINT_URL)."""
    config: EchoConfig
    """`serve`, `decoding` and `data.modalities` are what the app uses."""

    @property
    def serve(self) -> ServeConfig:
        return self.config.serve

    @property
    def modalities(self) -> tuple[str, ...] | None:
        """The DICOM Modality values studies may have (`data.modalities`; None: any): the
        decoder checks them, the model replica's generator is built with them."""
        return tuple(self.config.data.modalities) or None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> "AppArgs":
        """Read and check `args`; errors (a `ValueError`) name the key."""
        serve_fields = {f.name for f in dataclasses.fields(ServeConfig)} - set(_CLI_ONLY)
        known = serve_fields | set(APP_ARG_KEYS) | {"checkpoint", "s3_endpoint"}
        unknown = sorted(set(args) - known)
        if unknown:
            hint = (" (host and port are http_options of a Serve config)"
                    if set(unknown) & set(_CLI_ONLY) else "")
            raise ConfigError(f"unknown echo-ray serve args {unknown}{hint}; known: "
                              f"{sorted(known)}")
        if not args.get("checkpoint"):
            raise ConfigError("echo-ray serve needs args.checkpoint (a model directory)")
        tree: dict[str, dict[str, Any]] = {"serve": {}}
        for key, value in args.items():
            if key in serve_fields:
                tree["serve"][key] = value
            elif key in APP_ARG_KEYS and value is not None:
                section, name = APP_ARG_KEYS[key]
                tree.setdefault(section, {})[name] = value
        config = from_dict(tree)
        checkpoint = str(args["checkpoint"])
        if not checkpoint.startswith("s3://"):
            checkpoint = os.path.abspath(checkpoint)
        return cls(checkpoint, args.get("s3_endpoint"), config)


def app_args(config: EchoConfig, checkpoint: str, *, s3_endpoint: str | None = None
             ) -> dict[str, Any]:
    """The `args` of the Serve app for `config` (what `echo-ray serve` deploys)."""
    serve = {k: v for k, v in dataclasses.asdict(config.serve).items() if k not in _CLI_ONLY}
    decoding = config.decoding
    return {
        "checkpoint": checkpoint, "s3_endpoint": s3_endpoint, **serve,
        "modes": None if config.serve.modes is None else list(config.serve.modes),
        "decoding": decoding.mode, "steps": decoding.steps, "threshold": decoding.threshold,
        "max_new_tokens": decoding.max_new_tokens, "low_confidence": decoding.low_confidence,
        "modalities": list(config.data.modalities),
    }


def served_modes(config: EchoConfig, trained: Sequence[str]) -> tuple[list[str], str]:
    """The decoding modes a server offers, its default first, and that default.

    The modes are `serve.modes` when the server was started with a list, else `trained`
    (the checkpoint's, `ReportGenerator.trained_modes`, preferred first). The default is
    `decoding.mode` when it is one of them, else the first.
    """
    modes = list(config.serve.modes if config.serve.modes is not None else trained)
    if not modes:
        raise ConfigError("no decoding mode to serve")
    default = config.decoding.mode if config.decoding.mode in modes else modes[0]
    return [default, *(m for m in modes if m != default)], default


def load_api_keys(serve: ServeConfig) -> list[str]:
    """Keys from `serve.api_keys_file` and $ECHO_RAY_API_KEYS (comma-separated)."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")]
    if serve.api_keys_file:
        lines = Path(serve.api_keys_file).read_text().splitlines()
        keys += [line.split("#", 1)[0].strip() for line in lines]
    return [k for k in keys if k]


def key_digest(key: str) -> str:
    """The SHA-256 of an API key: the ingress holds and compares digests, not keys."""
    return hashlib.sha256(key.encode()).hexdigest()
