"""Direct Conditional Distillation (docs/ARCHITECTURE.md section 4.6): the one-step student's
loss against a teacher's recorded rollout (`dcd_loss`), and the same through the model
(`compute_dcd_loss`).

Shapes: B batch, L response length (a multiple of `block_length`), V vocabulary, K the
teacher's recorded top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from echo_ray.config.schema import DCD_STEP_WEIGHTINGS, DCD_TARGETS
from echo_ray.diffusion.losses import build_layout, prompt_image_embeds
from echo_ray.model.dvlm import EchoDVLM


def _first_eos_split(
    response: torch.Tensor, valid: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(before, tail)`, both `(B, L)` bool: valid positions strictly before the first `<eos>`
    of each row, and valid positions at or after it."""
    is_eos = response == eos_token_id  # (B, L)
    from_eos = is_eos.long().cumsum(1) > 0  # (B, L) at or after the first eos
    valid = valid.bool()
    return valid & ~from_eos, valid & from_eos


def dcd_loss(
    logits: torch.Tensor,
    response: torch.Tensor,
    valid: torch.Tensor,
    commit_step: torch.Tensor,
    top_ids: torch.Tensor,
    top_probs: torch.Tensor,
    *,
    eos_token_id: int,
    block_length: int,
    step_weighting: str = "linear",
    eos_weight: float = 1.0,
    target: str = "soft",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct Conditional Distillation: the one-step student against the teacher's rollout.

    Two disjoint sets of valid positions (pad positions, valid False, count in neither):

    - KL positions, strictly before the first `<eos>` of the row (the report tokens): forward
      KL(teacher || student), the teacher being its K recorded probabilities renormalized to
      sum to 1 (a position whose records are all 0 counts 0): `sum_k t_k (log t_k - log
      q_k)` with q the student's softmax over the whole vocabulary. It is >= 0 and exactly 0
      when the student puts all its mass on the recorded ids, in the teacher's proportions.
      Renormalizing (instead of a "rest" bucket for the unrecorded mass) keeps the student
      from moving mass onto ids the teacher did not rank, `<eos>` above all: with a flat
      tiny teacher (top-4 covering half the mass) a rest bucket let the student's argmax
      drift to `<eos>` while the loss fell. Averaged with weights w(step):
      "linear" w = commit_step + 1 (a later-committed position's record was conditioned on
      more of its block's tokens and weighs more), "uniform" w = 1:
      `kl = sum(w * KL) / sum(w)`.
    - eos positions, at or after the first `<eos>` (the `<eos>` and the `<eos>` fill of the
      last block): cross-entropy against `<eos>`, mean over those positions (`eos_ce`).

    `loss = kl + eos_weight * eos_ce`; an empty set contributes 0 (never NaN).

    Args:
        logits: `(B, L, V)` the student's, at the noisy-copy positions (any float dtype; the
            loss is computed in float32).
        response: `(B, L)` the teacher's tokens as `pad_responses` builds them.
        valid: `(B, L)` bool, False at pad positions.
        commit_step: `(B, L)` int, the step (0-based, within its block) at which the teacher
            committed each token; read only at KL positions, which must hold steps >= 0.
        top_ids: `(B, L, K)` long, the teacher's top-k ids at commit time (distinct per
            position); read only at KL positions.
        top_probs: `(B, L, K)` float, their probabilities; read only at KL positions.
        eos_token_id: the `<eos>` id.
        block_length: the diffusion block length (L must be a multiple of it).
        step_weighting: one of `DCD_STEP_WEIGHTINGS`.
        eos_weight: lambda, the weight of the eos cross-entropy (>= 0).
        target: "soft" (above) or "hard": the teacher distribution at a KL position is
            one-hot on the token it committed (`response`), so the KL is that token's
            cross-entropy (sequence-level distillation); `top_ids` / `top_probs` unused.

    Returns:
        `(loss, parts)`: a scalar with a graph, and detached `kl`, `eos_ce` (unweighted),
        `kl_positions`, `eos_positions` (counts) for logging.
    """
    if step_weighting not in DCD_STEP_WEIGHTINGS:
        raise ValueError(
            f"unknown step_weighting {step_weighting!r}; choose one of {DCD_STEP_WEIGHTINGS}"
        )
    if target not in DCD_TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {DCD_TARGETS}")
    if eos_weight < 0:
        raise ValueError(f"eos_weight must be >= 0, got {eos_weight}")
    B, L, V = logits.shape
    K = top_ids.shape[-1]
    if response.shape != (B, L) or top_ids.shape != (B, L, K) or top_probs.shape != (B, L, K):
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, response {tuple(response.shape)}, "
            f"top_ids {tuple(top_ids.shape)}, top_probs {tuple(top_probs.shape)}; expected "
            "(B, L, V), (B, L), (B, L, K), (B, L, K)"
        )
    if L % block_length:
        raise ValueError(f"response length {L} is not a multiple of block_length {block_length}")
    kl_at, eos_at = _first_eos_split(response, valid, eos_token_id)  # (B, L) each

    logp = F.log_softmax(logits.float(), dim=-1)  # (B, L, V)
    # KL(teacher top-k, renormalized || student), per position.
    # Unrecorded positions may hold anything (NaN, out-of-range ids): zero them first, since
    # a NaN in a where() branch that is not taken still poisons the gradient.
    if target == "hard":  # one-hot on the committed token
        top_ids, top_probs = response[..., None], torch.ones_like(response[..., None]).float()
    ids = torch.where(kl_at[..., None], top_ids.long(), 0)  # (B, L, K)
    t = torch.where(kl_at[..., None], top_probs.float(), 0.0).clamp(min=0)  # (B, L, K)
    t = t / t.sum(-1, keepdim=True).clamp(min=1e-30)  # (B, L, K) renormalized over the K ids
    s_log = logp.gather(-1, ids)  # (B, L, K) student log-probs of the recorded ids
    # t * (log t - log s), with 0 * log 0 = 0; where() keeps unused positions' garbage out.
    kl_ids = torch.where(t > 0, t * (t.clamp(min=1e-30).log() - s_log), 0.0).sum(-1)  # (B, L)
    kl = torch.where(kl_at, kl_ids, 0.0)  # (B, L)
    if step_weighting == "linear":
        step = commit_step.to(kl.device).long()
        if bool((step[kl_at] < 0).any()):
            raise ValueError(
                "commit_step is negative at a report position (before the first <eos>): "
                "every report token needs its teacher commit step"
            )
        w = torch.where(kl_at, step + 1, 0).float()  # (B, L)
    else:
        w = kl_at.float()  # (B, L)
    kl_term = (w * kl).sum() / w.sum().clamp(min=1)

    eos_nll = -logp[..., eos_token_id]  # (B, L) CE against a one-hot <eos>
    eos_nll = torch.where(eos_at, eos_nll, 0.0)
    eos_term = eos_nll.sum() / eos_at.sum().clamp(min=1)

    loss = kl_term + eos_weight * eos_term
    parts = {
        "kl": kl_term.detach(),
        "eos_ce": eos_term.detach(),
        "kl_positions": kl_at.sum(),
        "eos_positions": eos_at.sum(),
    }
    return loss, parts


def compute_dcd_loss(
    model: EchoDVLM,
    pixel_values: torch.Tensor,
    response: torch.Tensor,
    valid: torch.Tensor,
    commit_step: torch.Tensor,
    top_ids: torch.Tensor,
    top_probs: torch.Tensor,
    *,
    step_weighting: str = "linear",
    eos_weight: float = 1.0,
    attention: str = "dense",
    target: str = "soft",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DCD objective through the model: the RAD layout with clean copy = the teacher's
    tokens and the noisy copy fully masked (every valid position `<|mask|>`, pads stay
    `<pad>`), so each block is predicted in one forward from the teacher's previous blocks,
    exactly as one-step decoding sees it; then `dcd_loss`.

    Args:
        pixel_values: from `model.preprocess_images`, one image per row.
        response, valid, commit_step, top_ids, top_probs: as `dcd_loss` (e.g. from
            `collate_trajectories`).
        attention: "dense" or "flex" (the RAD layout's BlockMask), as `compute_rad_loss`.
    """
    device = model.device
    response, valid = response.to(device), valid.to(device).bool()
    noisy = torch.where(valid, model.mask_token_id, response)  # (B, L) all masked
    lay = build_layout(model, response, valid, "rad", noisy=noisy, attention=attention)
    logits = model(
        lay.input_ids,
        attention_mask=lay.attention_mask,
        position_ids=lay.position_ids,
        image_embeds=prompt_image_embeds(model, pixel_values, 1),
        logits_from=lay.logits_from,
    )  # (B, L, V)
    return dcd_loss(
        logits,
        response,
        valid,
        commit_step.to(device),
        top_ids.to(device),
        top_probs.to(device),
        eos_token_id=model.eos_token_id,
        block_length=model.block_length,
        step_weighting=step_weighting,
        eos_weight=eos_weight,
        target=target,
    )
