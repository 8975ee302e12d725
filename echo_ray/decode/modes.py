"""The `sampler.generate` flags each named decoding mode stands for.

The names (`config.schema.DECODING_MODES`) are what reports, configs, the HTTP API and the
benchmarks use. Plain Python (no torch), so that processes which only validate a mode name
(the Serve ingress) never import torch.
"""

from __future__ import annotations

from echo_ray.config.schema import DECODING_MODES, STAGES, DecodingConfig

# The decoding modes a checkpoint of each training stage is made for, preferred first: an AR
# model decodes token by token; a RAD teacher by threshold multi-step block diffusion (its
# one-step drafts are a baseline of the evaluation, not reports: docs/ARCHITECTURE.md
# section 5); a DCD student in one step per block. An AR mode on a diffusion model, or a
# diffusion mode on an AR model, writes garbled text.
TRAINED_MODES = {
    "ar": ("ar",),
    "rad": ("multi-step",),
    "dcd": ("one-step-fused", "one-step"),
}
# A `--stage vision` checkpoint has a trained vision tower and an untrained language model:
# it is an `--init` for the AR stage and writes no reports.
NO_REPORTS = {"vision": "vision pre-training"}
assert set(TRAINED_MODES) | set(NO_REPORTS) == set(STAGES)


def trained_modes(stage: str | None) -> tuple[str, ...]:
    """The decoding modes of a checkpoint trained by `stage` (`train.stage` in its config),
    preferred first; every mode when the checkpoint does not record its stage.

    Raises:
        ValueError: an unknown stage, or one whose checkpoints write no reports (vision).
    """
    if stage is None:
        return DECODING_MODES
    if stage in NO_REPORTS:
        raise ValueError(
            f"a checkpoint of `--stage {stage}` ({NO_REPORTS[stage]}) writes no reports: it "
            f"is the --init of `echo-ray train --stage ar`; pass an ar, rad or dcd checkpoint"
        )
    if stage not in TRAINED_MODES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {STAGES}")
    return TRAINED_MODES[stage]


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
