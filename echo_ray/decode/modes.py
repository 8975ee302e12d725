"""Named decoding modes and the `sampling.generate` flags each one stands for.

Reports, configs, the HTTP API and the benchmarks use these names. Plain Python (no torch),
so that processes which only validate a mode name (the Serve ingress) never import torch.
"""

from __future__ import annotations

DECODING_MODES = ("ar", "multi-step", "one-step", "one-step-fused")


def decoding_kwargs(
    name: str, *, block_length: int, steps: int | None = None, threshold: float = 0.9
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
