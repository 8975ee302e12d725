"""The systems an evaluation compares: a name, a checkpoint (or run folder) and the decoding
mode it is evaluated in, as the `--system NAME=PATH:MODE` spec gives them."""

from __future__ import annotations

from dataclasses import dataclass

from echo_ray.config.schema import DECODING_MODES

# Short names accepted in a system spec, for the decoding modes of DECODING_MODES.
MODE_ALIASES = {"multistep": "multi-step", "onestep": "one-step", "fused": "one-step-fused"}


@dataclass(frozen=True)
class System:
    """One evaluated system: a name, a checkpoint (or run folder) and a decoding mode."""

    name: str
    path: str
    mode: str

    @classmethod
    def parse(cls, spec: str) -> System:
        """`NAME=PATH:MODE`; MODE one of DECODING_MODES or MODE_ALIASES."""
        name, eq, rest = spec.partition("=")
        path, colon, mode = rest.rpartition(":")
        if not eq or not colon or not name.strip() or not path:
            raise ValueError(
                f"system {spec!r}: expected NAME=PATH:MODE, e.g. ar=runs/ar:ar or "
                "teacher=runs/rad:multi-step"
            )
        mode = MODE_ALIASES.get(mode, mode)
        if mode not in DECODING_MODES:
            raise ValueError(
                f"system {spec!r}: unknown decoding mode {mode!r}; choose one of "
                f"{DECODING_MODES} (or {sorted(MODE_ALIASES)})"
            )
        return cls(name.strip(), path, mode)
