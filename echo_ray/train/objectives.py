"""What a training stage optimizes and how its learning rate moves: Objective wraps the
stage's loss (AR, RAD or DCD) as one module, so DDP / DeepSpeed wrap one forward; lr_lambda
is the warm-up + cosine schedule; vision_frozen, training_attention and
set_up_for_training decide, each in one place, what trains, which attention kernel the
losses use and whether activations are recomputed.
"""

from __future__ import annotations

import math

import torch

from echo_ray.config.schema import TrainConfig


class Objective(torch.nn.Module):
    """The stage's loss as a module, so DDP / DeepSpeed wrap one forward.

    Args:
        attention: "dense" or "flex", the losses' `attention` argument (`training_attention`
            resolves the config's "auto").
    """

    def __init__(self, model, stage: str, *, dcd_step_weighting: str = "linear",
                 dcd_eos_weight: float = 1.0, attention: str = "dense") -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.dcd_step_weighting = dcd_step_weighting
        self.dcd_eos_weight = dcd_eos_weight
        self.attention = attention

    def forward(self, pixel_values, response, valid, generator=None, commit_step=None,
                top_ids=None, top_probs=None):
        from echo_ray.diffusion.dcd import compute_dcd_loss
        from echo_ray.diffusion.losses import compute_ar_loss, compute_rad_loss

        if self.stage == "ar":
            return compute_ar_loss(self.model, pixel_values, response, valid,
                                   attention=self.attention)
        if self.stage == "dcd":
            loss, _ = compute_dcd_loss(
                self.model, pixel_values, response, valid, commit_step, top_ids, top_probs,
                step_weighting=self.dcd_step_weighting, eos_weight=self.dcd_eos_weight,
                attention=self.attention,
            )
            return loss
        loss, _ = compute_rad_loss(self.model, pixel_values, response, valid, generator=generator,
                                   attention=self.attention)
        return loss


def vision_frozen(tcfg: TrainConfig, stage: str) -> bool:
    """Whether `stage` trains with the vision tower and its projector frozen: the config's
    `train.freeze_vision` when set (a preset or `--set`), else the stage's default: "ar"
    trains them, "rad" and "dcd" freeze them (as the paper). The one place this is decided."""
    if tcfg.freeze_vision is not None:
        return tcfg.freeze_vision
    return stage != "ar"


def training_attention(setting: str, device: torch.device) -> str:
    """The losses' attention path for `train.attention` on `device`: "auto" is "flex" on
    CUDA (no dense `(B, 1, T, T)` mask: causal SDPA for AR, a BlockMask for RAD / DCD) and
    "dense" elsewhere (torch has no flex-attention backward on CPU)."""
    if setting == "auto":
        return "flex" if device.type == "cuda" else "dense"
    return setting


def set_up_for_training(model, *, freeze_vision: bool, gradient_checkpointing: bool) -> None:
    """Freeze or unfreeze the vision tower, and turn activation checkpointing on when asked.

    Checkpointing wraps transformers' decoder layers and vision blocks
    (`GradientCheckpointingLayer`: `EchoDVLM.forward` calls the layers themselves, so it
    applies there too) with non-reentrant `torch.utils.checkpoint`: a layer keeps only its
    input and recomputes the rest in the backward pass. A frozen vision tower gets no
    gradient, so it keeps no activations to save and is not wrapped.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.set_vision_trainable(not freeze_vision)
    backbone = model.backbone
    if not gradient_checkpointing:
        return
    backbone.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
    )
    if freeze_vision:
        for module in backbone.model.visual.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.gradient_checkpointing = False


def lr_lambda(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak LR: linear warm-up over `warmup` steps, then cosine to `floor`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
