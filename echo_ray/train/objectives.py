"""What a training stage optimizes and how its learning rate moves: Objective wraps the
stage's loss (AR, RAD or DCD) as one module, so DDP / DeepSpeed wrap one forward; lr_lambda
is the warm-up + cosine schedule.
"""

from __future__ import annotations

import math

import torch


class Objective(torch.nn.Module):
    """The stage's loss as a module, so DDP / DeepSpeed wrap one forward."""

    def __init__(self, model, stage: str, *, dcd_step_weighting: str = "linear",
                 dcd_eos_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.dcd_step_weighting = dcd_step_weighting
        self.dcd_eos_weight = dcd_eos_weight

    def forward(self, pixel_values, response, valid, generator=None, commit_step=None,
                top_ids=None, top_probs=None):
        from echo_ray.diffusion.dcd import compute_dcd_loss
        from echo_ray.diffusion.losses import compute_ar_loss, compute_rad_loss

        if self.stage == "ar":
            return compute_ar_loss(self.model, pixel_values, response, valid)
        if self.stage == "dcd":
            loss, _ = compute_dcd_loss(
                self.model, pixel_values, response, valid, commit_step, top_ids, top_probs,
                step_weighting=self.dcd_step_weighting, eos_weight=self.dcd_eos_weight,
            )
            return loss
        loss, _ = compute_rad_loss(self.model, pixel_values, response, valid, generator=generator)
        return loss


def lr_lambda(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak LR: linear warm-up over `warmup` steps, then cosine to `floor`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
