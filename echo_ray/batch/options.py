"""`ReportOptions`: how `echo-ray report` reports an archive (everything but the checkpoint
and the locations), validated before a run starts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class ReportOptions:
    """How to report an archive (everything but the checkpoint and the locations)."""

    decoding: str = "one-step-fused"  # one of decoding.DECODING_MODES
    steps: int | None = None  # multi-step: forwards per block at most
    threshold: float = 0.9  # multi-step: tau
    max_new_tokens: int | None = None  # default: the model's max_response_len
    batch_size: int = 16  # studies per model call
    unit_size: int = 64  # studies per part file: the unit of work and of resumption
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    threads: int = 0  # torch threads per actor (0: one per CPU of the actor)
    io_threads: int = 8  # parallel file reads (per actor, and the driver's header reads)
    since: str | None = None  # YYYY-MM-DD or ISO datetime: files modified since then
    fhir: bool = False  # also write fhir.ndjson
    include_phi: bool = False  # patient name / ID / birth date and full paths in outputs
    retry_errors: bool = False  # report studies again whose row is a RETRYABLE_ERRORS error

    def validate(self) -> None:
        from echo_ray.decode.modes import DECODING_MODES

        if self.decoding not in DECODING_MODES:
            raise ValueError(f"decoding {self.decoding!r}: choose one of {DECODING_MODES}")
        for name in ("batch_size", "unit_size", "actors", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.unit_size < self.batch_size:
            raise ValueError(f"unit_size ({self.unit_size}) must be >= batch_size "
                             f"({self.batch_size}): a model call takes studies of one unit")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor must be > 0 and gpus_per_actor >= 0")
        self.since_timestamp()

    def since_timestamp(self) -> float | None:
        """`since` as seconds since the epoch (a date is midnight UTC), None without it."""
        if self.since is None:
            return None
        try:
            when = datetime.fromisoformat(self.since)
        except ValueError:
            raise ValueError(
                f"since {self.since!r}: expected a date like 2024-05-31 or an ISO datetime"
            ) from None
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
