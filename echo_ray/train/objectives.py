"""What a training stage optimizes and how its learning rate moves: Objective wraps the
stage's loss (vision pre-training, AR, RAD or DCD) as one module, so DDP / DeepSpeed wrap
one forward; lr_lambda is the warm-up + cosine schedule; vision_frozen, training_attention and
set_up_for_training decide, each in one place, what trains, which attention kernel the
losses use and whether activations are recomputed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from echo_ray.config.schema import TrainConfig
from echo_ray.model.diagnosis import LabelHead


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each label, CheXpert values as targets.

    Args:
        logits: `(N, K)`.
        labels: `(N, K)` 1.0 positive, 0.0 negative, NaN not mentioned (a report names what it
            finds: unmentioned is negative), -1.0 uncertain (no target: left out).

    Returns:
        The mean over the labels with a target (0 with a graph when none has one).
    """
    target = torch.nan_to_num(labels, nan=0.0)  # (N, K)
    keep = target >= 0  # uncertain (-1) has no target
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), target.clamp(min=0).to(torch.float32), reduction="none"
    )  # (N, K)
    return (loss * keep).sum() / keep.sum().clamp(min=1)


class Objective(torch.nn.Module):
    """The stage's loss as a module, so DDP / DeepSpeed wrap one forward.

    Args:
        attention: "dense" or "flex", the losses' `attention` argument (`training_attention`
            resolves the config's "auto").
        num_labels: the vision stage's label count (its `LabelHead`, a parameter of this
            module, so DDP synchronises it and the optimizer steps it).

    The vision stage's label head is the model's own (`model.diagnosis.head`, saved with the
    checkpoint) when the model has diagnosis tokens, else a probe dropped after the stage
    (only the tower goes on to the AR stage). AR and RAD with diagnosis tokens fill the
    prompt's slots with the report's labels (`labels`: present = 1, anything else absent);
    DCD, like decoding, with the head's decisions.
    """

    def __init__(self, model, stage: str, *, dcd_step_weighting: str = "linear",
                 dcd_eos_weight: float = 1.0, dcd_target: str = "soft",
                 attention: str = "dense",
                 num_labels: int = 14) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.dcd_step_weighting = dcd_step_weighting
        self.dcd_eos_weight = dcd_eos_weight
        self.dcd_target = dcd_target
        self.attention = attention
        if stage == "vision" and model.diagnosis is not None:
            self.label_head = model.diagnosis.head
        elif stage == "vision":
            self.label_head = LabelHead(model.num_image_tokens, model.hidden_size,
                                        num_labels).to(model.device, model.dtype)

    def forward(self, pixel_values, response, valid, generator=None, commit_step=None,
                top_ids=None, top_probs=None, labels=None):
        from echo_ray.diffusion.dcd import compute_dcd_loss
        from echo_ray.diffusion.losses import compute_ar_loss, compute_rad_loss

        if self.stage == "vision":
            return label_loss(self.label_head(self.model.image_features(pixel_values)), labels)
        decisions = None
        if self.model.diagnosis is not None and labels is not None:
            decisions = torch.nan_to_num(labels, nan=0.0) == 1  # (B, 14) the report's findings
        if self.stage == "ar":
            return compute_ar_loss(self.model, pixel_values, response, valid,
                                   attention=self.attention, decisions=decisions)
        if self.stage == "dcd":
            loss, _ = compute_dcd_loss(
                self.model, pixel_values, response, valid, commit_step, top_ids, top_probs,
                step_weighting=self.dcd_step_weighting, eos_weight=self.dcd_eos_weight,
                target=self.dcd_target,
                attention=self.attention,
            )
            return loss
        loss, _ = compute_rad_loss(self.model, pixel_values, response, valid, generator=generator,
                                   attention=self.attention, decisions=decisions)
        return loss


def vision_frozen(tcfg: TrainConfig, stage: str) -> bool:
    """Whether `stage` trains with the vision tower and its projector frozen: the config's
    `train.freeze_vision` when set (a preset or `--set`), else the stage's default: "vision"
    and "ar" train them, "rad" and "dcd" freeze them (as the paper). The one place this is
    decided. The vision stage always trains them (it trains nothing else)."""
    if stage == "vision":
        return False
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


def set_up_for_training(model, *, freeze_vision: bool, gradient_checkpointing: bool,
                        freeze_language: bool = False) -> None:
    """Freeze or unfreeze the vision tower, and turn activation checkpointing on when asked.
    `freeze_language` (the vision stage) freezes everything outside the vision tower and
    its projector: the language model takes no part in that loss.

    Diagnosis tokens (`model.diagnosis`): the label head trains in the vision stage only
    (the stage that has its loss), the decision embeddings in the language stages only (the
    ones that read them); a parameter with no gradient would stall DDP's reduction.

    Checkpointing wraps transformers' decoder layers and vision blocks
    (`GradientCheckpointingLayer`: `EchoDVLM.forward` calls the layers themselves, so it
    applies there too) with non-reentrant `torch.utils.checkpoint`: a layer keeps only its
    input and recomputes the rest in the backward pass. A frozen vision tower gets no
    gradient, so it keeps no activations to save and is not wrapped.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if freeze_language:
        model.backbone.requires_grad_(False)
    model.set_vision_trainable(not freeze_vision)
    if model.diagnosis is not None:
        model.diagnosis.head.requires_grad_(freeze_language)
        model.diagnosis.decisions.requires_grad_(not freeze_language)
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
