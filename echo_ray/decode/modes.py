"""The `sampler.generate` flags each named decoding mode stands for.

The names (`config.schema.DECODING_MODES`) are what reports, configs, the HTTP API and the
benchmarks use. Plain Python (no torch), so that processes which only validate a mode name
(the Serve ingress) never import torch.
"""

from __future__ import annotations

from echo_ray.config.schema import DECODING_MODES, DecodingConfig


def decoding_kwargs(
    name: str,
    *,
    block_length: int,
    steps: int | None = None,
    threshold: float = DecodingConfig.threshold,
) -> dict:
    """The `sampling.generate` flags of a named decoding mode.

    Args:
        name: one of `DECODING_MODES`.
        steps: forwards per block of "multi-step" (default: block_length, one token each at
            worst); ignored by the other modes.
        threshold: tau of "multi-step".
    """
    if name == "ar":
        return {"mode": "ar"}
    if name == "multi-step":
        return {"steps": steps or block_length, "threshold": threshold, "fused": True}
    if name == "one-step":
        return {"steps": 1, "fused": False}
    if name == "one-step-fused":
        return {"steps": 1, "fused": True}
    raise ValueError(f"unknown decoding mode {name!r}; choose one of {DECODING_MODES}")
