"""Block diffusion math: attention masks, sequence layouts, noising and losses (AR, RAD, DCD).

Shapes: B batch, P prompt length (image tokens + instruction), L response length (padded to
a multiple of the diffusion block length `block_length`), T sequence length, V vocabulary.

Responses are `report tokens + <eos>`, then `<eos>` up to the end of that block (so the
block holding the end of the report is complete, as the decoder sees it: every position of
a block is predicted), then `<pad>` up to L. Pad tokens are never attended to and never
scored.

Layouts (one mask function builds every one of them):
- "causal"    `[prompt | response]`           the AR model;
- "block"     `[prompt | response]`           prompt causal, response block-causal: what
                                              the block decoders reproduce with a KV cache;
- "rad"       `[prompt | x0 | xt]`            Response-Asymmetric Diffusion: only the
                                              response is duplicated (T = P + 2L);
- "full_copy" `[prompt | x0 | prompt | xt]`   prior work's full-sequence duplication, the
                                              vision tokens included (T = 2P + 2L), kept to
                                              measure what RAD saves. Its xt logits equal RAD's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from echo_ray.config.schema import DCD_STEP_WEIGHTINGS
from echo_ray.model.dvlm import EchoDVLM

if TYPE_CHECKING:  # sampling imports this module: no runtime import back
    from echo_ray.decode.sampler import GenerateOutput

LAYOUTS = ("causal", "block", "rad", "full_copy")

# ---------------------------------------------------------------------- masks


def attention_mask(
    num_prompt: int,
    num_response: int,
    block_length: int,
    layout: str = "block",
    response_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bool attention mask (True = query row may attend to key column) of a layout.

    Built from named sub-masks (response blocks counted from the first response token:
    token i of the response is in block i // block_length):

    - M_P   prompt -> prompt: causal, exactly the AR model's, so the AR prefill is reused;
    - M_BC  x0 -> x0: block-causal, bidirectional inside a block (clean block k sees clean
            blocks <= k); the "block" layout's response rows are M_BC too;
    - M_OBC xt -> x0: offset block-causal (noisy block k sees clean blocks < k);
    - M_BD  xt -> xt: block-diagonal (noisy block k sees only itself);
    - every response row (x0 and xt) sees the whole prompt; prompt rows see no response.

    "causal" is plain lower-triangular over `[prompt | response]`. "full_copy" repeats M_P
    for the second prompt copy, whose rows see only that copy; its xt rows see the second
    prompt copy instead of the first.

    Args:
        num_prompt: P.
        num_response: L (need not be a multiple of `block_length`: the last block is short).
        block_length: the diffusion block length.
        layout: one of `LAYOUTS`.
        response_valid: `(B, L)` bool, False at pad positions: pad keys are hidden from
            every query (in every copy); a pad query still sees itself (no empty rows).

    Returns:
        `(1, 1, T, T)` without `response_valid`, else `(B, 1, T, T)`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")
    P, L = num_prompt, num_response
    p = torch.arange(P)
    m_p = p[:, None] >= p[None, :]  # (P, P) causal
    blk = torch.arange(L) // block_length  # (L,) block index of each response token
    m_bc = blk[:, None] >= blk[None, :]  # (L, L)
    m_obc = blk[:, None] > blk[None, :]  # (L, L)
    m_bd = blk[:, None] == blk[None, :]  # (L, L)

    if layout == "causal":
        mask = torch.ones(P + L, P + L, dtype=torch.bool).tril()  # (T, T)
        copies = 1
    elif layout == "block":
        mask = torch.zeros(P + L, P + L, dtype=torch.bool)  # (T, T)
        mask[:P, :P] = m_p
        mask[P:, :P] = True
        mask[P:, P:] = m_bc
        copies = 1
    elif layout == "rad":
        T = P + 2 * L
        x0, xt = slice(P, P + L), slice(P + L, T)
        mask = torch.zeros(T, T, dtype=torch.bool)  # (T, T)
        mask[:P, :P] = m_p
        mask[x0, :P] = True
        mask[x0, x0] = m_bc
        mask[xt, :P] = True
        mask[xt, x0] = m_obc
        mask[xt, xt] = m_bd
        copies = 2
    else:  # full_copy
        T = 2 * P + 2 * L
        x0, p2, xt = slice(P, P + L), slice(P + L, 2 * P + L), slice(2 * P + L, T)
        mask = torch.zeros(T, T, dtype=torch.bool)  # (T, T)
        mask[:P, :P] = m_p
        mask[x0, :P] = True
        mask[x0, x0] = m_bc
        mask[p2, p2] = m_p
        mask[xt, p2] = True
        mask[xt, x0] = m_obc
        mask[xt, xt] = m_bd
        copies = 2
    mask = mask[None, None]  # (1, 1, T, T)
    if response_valid is None:
        return mask
    if response_valid.shape[-1] != L:
        raise ValueError(f"response_valid has {response_valid.shape[-1]} columns, expected {L}")
    valid = response_valid.bool().cpu()
    keep = torch.ones(valid.shape[0], P, dtype=torch.bool)  # (B, P)
    parts = [keep, valid] if copies == 1 else [keep, valid, valid]
    if layout == "full_copy":
        parts = [keep, valid, keep, valid]
    key_valid = torch.cat(parts, dim=1)  # (B, T)
    eye = torch.eye(mask.shape[-1], dtype=torch.bool)  # (T, T)
    return (mask & key_valid[:, None, None, :]) | eye  # (B, 1, T, T)


# ---------------------------------------------------------------------- responses and noise


def pad_responses(
    token_lists: Sequence[Sequence[int]],
    *,
    block_length: int,
    max_len: int,
    eos_token_id: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Report token lists -> `(response, valid)`, both `(B, L)`, L a multiple of block_length.

    Each report is cut to `max_len - 1` tokens, gets `<eos>`, then `<eos>` fills its last
    block (the decoder predicts every position of a block, so the block that ends the report
    is trained to end in `<eos>`); `<pad>` (valid False) fills the rest.
    """
    rows = []
    for tokens in token_lists:
        row = list(tokens)[: max_len - 1] + [eos_token_id]
        row += [eos_token_id] * (-len(row) % block_length)
        rows.append(row)
    length = max(len(r) for r in rows)
    response = torch.full((len(rows), length), pad_token_id, dtype=torch.long)  # (B, L)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)  # (B, L)
    for i, row in enumerate(rows):
        response[i, : len(row)] = torch.tensor(row)
        valid[i, : len(row)] = True
    return response, valid


@dataclass
class Noised:
    """A noised response: `noisy`, `masked` and `ratio` are `(B, L)`."""

    noisy: torch.Tensor
    masked: torch.Tensor
    ratio: torch.Tensor


def noise_response(
    response: torch.Tensor,
    valid: torch.Tensor,
    block_length: int,
    mask_token_id: int,
    *,
    mask_ratio: float | None = None,
    min_ratio: float = 1e-3,
    generator: torch.Generator | None = None,
) -> Noised:
    """Mask each valid response token with its block's ratio t (t ~ U(min_ratio, 1) per block).

    Args:
        response: `(B, L)` clean tokens x0.
        valid: `(B, L)` False at pad positions (never masked).
        mask_ratio: a fixed ratio for every block instead of sampling (1.0 masks everything,
            as the DCD student's noisy copy).
    """
    B, L = response.shape
    num_blocks = -(-L // block_length)
    if mask_ratio is None:
        t = torch.rand(B, num_blocks, generator=generator, device=response.device)
        t = min_ratio + (1 - min_ratio) * t  # (B, nb)
    else:
        t = torch.full((B, num_blocks), float(mask_ratio), device=response.device)  # (B, nb)
    ratio = t.repeat_interleave(block_length, dim=1)[:, :L]  # (B, L)
    draw = torch.rand(B, L, generator=generator, device=response.device)  # (B, L)
    masked = (draw < ratio) & valid.bool()  # (B, L)
    noisy = torch.where(masked, torch.full_like(response, mask_token_id), response)  # (B, L)
    return Noised(noisy=noisy, masked=masked, ratio=ratio)


# ---------------------------------------------------------------------- losses


def rad_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    ratio: torch.Tensor,
    valid: torch.Tensor,
    weighting: str = "elbo",
) -> torch.Tensor:
    """Masked-token cross-entropy of the noisy copy (no shift: position i predicts token i).

    Args:
        logits: `(B, L, V)` at the xt positions.
        targets: `(B, L)` clean tokens x0.
        masked: `(B, L)` which xt positions were masked (only these are scored).
        ratio: `(B, L)` the mask ratio t of each position's block.
        valid: `(B, L)` non-pad positions.
        weighting: "elbo": sum over masked positions of CE / t, divided by the number of
            valid tokens (the masked-diffusion ELBO, as LLaDA); "mean": plain mean over
            masked positions.

    Returns:
        A scalar; 0 (with a graph) when nothing is masked.
    """
    B, L, V = logits.shape
    ce = F.cross_entropy(
        logits.reshape(B * L, V).float(), targets.reshape(B * L), reduction="none"
    ).view(B, L)  # (B, L)
    ce = torch.where(masked, ce, torch.zeros_like(ce))  # unmasked positions: no gradient
    if weighting == "elbo":
        return (ce / ratio.clamp(min=1e-6)).sum() / valid.sum().clamp(min=1)
    if weighting == "mean":
        return ce.sum() / masked.sum().clamp(min=1)
    raise ValueError(f"unknown weighting {weighting!r}; choose 'elbo' or 'mean'")


def ar_loss(
    logits: torch.Tensor, response: torch.Tensor, valid: torch.Tensor, eos_token_id: int
) -> torch.Tensor:
    """Shifted next-token cross-entropy of the response, up to and including its first eos.

    Args:
        logits: `(B, L, V)` at positions P-1 .. P+L-2 (the last prompt token predicts
            response[0]; response[i-1] predicts response[i]).
        response: `(B, L)` targets.
        valid: `(B, L)` non-pad positions.
    """
    ce, scored = _ar_token_ce(logits, response, valid, eos_token_id)
    return ce.sum() / scored.sum().clamp(min=1)


def _ar_token_ce(
    logits: torch.Tensor, response: torch.Tensor, valid: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token CE `(B, L)` (0 where not scored) and the scored mask `(B, L)`."""
    B, L, V = logits.shape
    is_eos = response == eos_token_id  # (B, L)
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (B, L) strictly after 1st eos
    scored = valid.bool() & ~after_eos  # (B, L)
    ce = F.cross_entropy(
        logits.reshape(B * L, V).float(), response.reshape(B * L), reduction="none"
    ).view(B, L)  # (B, L)
    return torch.where(scored, ce, torch.zeros_like(ce)), scored


# ---------------------------------------------------------------------- layouts through the model


@dataclass
class Layout:
    """Model inputs of one layout. `logits_from` is where the scored positions start."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T) bool
    position_ids: torch.Tensor  # (3, 1, T)
    logits_from: int


def build_layout(
    model: EchoDVLM,
    response: torch.Tensor,
    valid: torch.Tensor,
    layout: str,
    noisy: torch.Tensor | None = None,
) -> Layout:
    """Input ids, mask and M-RoPE positions of `layout` for a batch of responses.

    Both response copies of "rad"/"full_copy" use the same positions (the noisy copy reuses
    the clean copy's); the second prompt of "full_copy" reuses the prompt's.

    Args:
        response: `(B, L)` clean tokens.
        valid: `(B, L)`.
        noisy: `(B, L)` the noisy copy xt ("rad" and "full_copy").
    """
    B, L = response.shape
    device = model.device
    prompt = model.prompt_input_ids(B).to(device)  # (B, P)
    P = prompt.shape[1]
    response = response.to(device)
    prompt_pos = model.prompt_position_ids  # (3, 1, P)
    resp_pos = model.response_position_ids(L)  # (3, 1, L)
    if layout in ("causal", "block"):
        ids = [prompt, response]
        pos = [prompt_pos, resp_pos]
        logits_from = P - 1 if layout == "causal" else P
    elif layout in ("rad", "full_copy"):
        if noisy is None:
            raise ValueError(f"layout {layout!r} needs the noisy copy")
        noisy = noisy.to(device)
        if layout == "rad":
            ids = [prompt, response, noisy]
            pos = [prompt_pos, resp_pos, resp_pos]
            logits_from = P + L
        else:
            ids = [prompt, response, prompt, noisy]
            pos = [prompt_pos, resp_pos, prompt_pos, resp_pos]
            logits_from = 2 * P + L
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    mask = attention_mask(P, L, model.block_length, layout, valid).to(device)
    return Layout(
        input_ids=torch.cat(ids, dim=1),  # (B, T)
        attention_mask=mask,  # (B, 1, T, T)
        position_ids=torch.cat(pos, dim=2),  # (3, 1, T)
        logits_from=logits_from,
    )


def _image_embeds(model: EchoDVLM, pixel_values: torch.Tensor, copies: int) -> torch.Tensor:
    embeds = model.encode_images(pixel_values)  # (B, N_img, hidden)
    # full_copy has two prompts per row: the row's image features fill both slot groups.
    return embeds.repeat(1, copies, 1)  # (B, copies * N_img, hidden)


def compute_rad_loss(
    model: EchoDVLM,
    pixel_values: torch.Tensor,
    response: torch.Tensor,
    valid: torch.Tensor,
    *,
    layout: str = "rad",
    mask_ratio: float | None = None,
    weighting: str = "elbo",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Noised]:
    """Noise the responses, run the RAD (or full-copy) layout, score the masked positions.

    Args:
        pixel_values: from `model.preprocess_images`, one image per row.
        response, valid: `(B, L)` from `pad_responses`.

    Returns:
        (loss, the noise that was drawn).
    """
    device = model.device
    response, valid = response.to(device), valid.to(device)
    noise = noise_response(
        response,
        valid,
        model.block_length,
        model.mask_token_id,
        mask_ratio=mask_ratio,
        generator=generator,
    )
    lay = build_layout(model, response, valid, layout, noisy=noise.noisy)
    copies = 2 if layout == "full_copy" else 1
    logits = model(
        lay.input_ids,
        attention_mask=lay.attention_mask,
        position_ids=lay.position_ids,
        image_embeds=_image_embeds(model, pixel_values, copies),
        logits_from=lay.logits_from,
    )  # (B, L, V)
    loss = rad_loss(logits, response, noise.masked, noise.ratio, valid, weighting)
    return loss, noise


def compute_ar_loss(
    model: EchoDVLM, pixel_values: torch.Tensor, response: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """The AR objective: causal `[prompt | response]`, shifted next-token loss."""
    logits, response, valid = _ar_logits(model, pixel_values, response, valid)
    return ar_loss(logits, response, valid, model.eos_token_id)


def _ar_logits(
    model: EchoDVLM, pixel_values: torch.Tensor, response: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal `[prompt | response]` forward: `(B, L, V)` logits at positions P-1 ..
    P+L-2 (each predicting the next response token), and response / valid on the device."""
    device = model.device
    response, valid = response.to(device), valid.to(device)
    lay = build_layout(model, response, valid, "causal")
    logits = model(
        lay.input_ids,
        attention_mask=lay.attention_mask,
        position_ids=lay.position_ids,
        image_embeds=_image_embeds(model, pixel_values, 1),
        logits_from=lay.logits_from,
    )  # (B, L + 1, V): positions P-1 .. P+L-1
    return logits[:, :-1], response, valid


def ar_report_nll(
    model: EchoDVLM, pixel_values: torch.Tensor, response: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of each report under an AR model, given its image.

    The fluency metric: exp(sum of NLLs / sum of token counts) is the perplexity.

    Args:
        response, valid: `(B, L)` from `pad_responses` (the report tokens, then `<eos>`).

    Returns:
        `(nll, count)`, both `(B,)`: summed NLL (nats) of each report's tokens up to and
        including its first `<eos>`, and how many tokens that is.
    """
    logits, response, valid = _ar_logits(model, pixel_values, response, valid)
    ce, scored = _ar_token_ce(logits, response, valid, model.eos_token_id)  # (B, L)
    return ce.sum(1), scored.sum(1)


# ---------------------------------------------------------------------- DCD (DESIGN.md section 4)


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

    Returns:
        `(loss, parts)`: a scalar with a graph, and detached `kl`, `eos_ce` (unweighted),
        `kl_positions`, `eos_positions` (counts) for logging.
    """
    if step_weighting not in DCD_STEP_WEIGHTINGS:
        raise ValueError(
            f"unknown step_weighting {step_weighting!r}; choose one of {DCD_STEP_WEIGHTINGS}"
        )
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DCD objective through the model: the RAD layout with clean copy = the teacher's
    tokens and the noisy copy fully masked (every valid position `<|mask|>`, pads stay
    `<pad>`), so each block is predicted in one forward from the teacher's previous blocks,
    exactly as one-step decoding sees it; then `dcd_loss`.

    Args:
        pixel_values: from `model.preprocess_images`, one image per row.
        response, valid, commit_step, top_ids, top_probs: as `dcd_loss` (e.g. from
            `collate_trajectories`).
    """
    device = model.device
    response, valid = response.to(device), valid.to(device).bool()
    noisy = torch.where(valid, model.mask_token_id, response)  # (B, L) all masked
    lay = build_layout(model, response, valid, "rad", noisy=noisy)
    logits = model(
        lay.input_ids,
        attention_mask=lay.attention_mask,
        position_ids=lay.position_ids,
        image_embeds=_image_embeds(model, pixel_values, 1),
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
    )


# ---------------------------------------------------------------------- DCD trajectories


def trajectory_records(out: GenerateOutput, eos_token_id: int) -> list[dict]:
    """A teacher rollout (`generate(mode="diffusion", record_top_k=k)`) -> one record per row.

    Each record keeps the positions up to and including the row's first `<eos>` (everything
    after it is the lockstep batch's filler, never part of the report):

    - "tokens": list[int], the report tokens (no `<eos>`);
    - "commit_step": list[int], one per kept position (len(tokens) + 1 with the `<eos>`);
    - "top_ids": list[list[int]] and "top_probs": list[list[float]], the teacher's top-k at
      each kept position's commit time;
    - "mass": list[float], sum of "top_probs" per kept position (the mass the records cover);
    - "ended": bool, whether the row produced `<eos>` (False: cut at max_new_tokens, and the
      lists have len(tokens) entries).
    """
    if out.commit_step is None or out.top_k_ids is None or out.top_k_probs is None:
        raise ValueError(
            "the rollout has no recorded distributions: call generate(mode='diffusion', "
            "record_top_k=k) with k >= 1"
        )
    tokens = out.tokens.cpu()
    steps = out.commit_step.cpu()
    ids = out.top_k_ids.cpu()
    probs = out.top_k_probs.float().cpu()
    records = []
    for b in range(tokens.shape[0]):
        row = tokens[b].tolist()
        ended = eos_token_id in row
        n = row.index(eos_token_id) if ended else len(row)  # report tokens
        kept = n + int(ended)
        p = probs[b, :kept]  # (kept, K)
        records.append(
            {
                "tokens": row[:n],
                "commit_step": steps[b, :kept].tolist(),
                "top_ids": ids[b, :kept].tolist(),
                "top_probs": p.tolist(),
                "mass": p.sum(-1).tolist(),
                "ended": ended,
            }
        )
    return records


def collate_trajectories(
    records: Sequence[dict],
    *,
    block_length: int,
    max_len: int,
    eos_token_id: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trajectory records (as `trajectory_records` makes them) -> the tensors of `dcd_loss`.

    Returns:
        `(response, valid, commit_step, top_ids, top_probs)`: `(B, L)` long, `(B, L)` bool
        (both from `pad_responses`), `(B, L)` long, `(B, L, K)` long, `(B, L, K)` float32.
        Positions without a record (the `<eos>` fill, pads, a report cut at `max_len - 1`
        tokens) hold 0. Every record must have the same K.
    """
    if not records:
        raise ValueError("collate_trajectories needs at least one record")
    ks = {len(r["top_ids"][0]) for r in records if len(r["top_ids"])}
    if len(ks) > 1:
        raise ValueError(f"records have different top-k sizes {sorted(ks)}: use one k per run")
    K = ks.pop() if ks else 1
    response, valid = pad_responses(
        [list(r["tokens"]) for r in records],
        block_length=block_length,
        max_len=max_len,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )  # (B, L) each
    B, L = response.shape
    commit_step = torch.zeros(B, L, dtype=torch.long)  # (B, L)
    top_ids = torch.zeros(B, L, K, dtype=torch.long)  # (B, L, K)
    top_probs = torch.zeros(B, L, K, dtype=torch.float32)  # (B, L, K)
    for b, r in enumerate(records):
        n = min(len(r["commit_step"]), L)
        if n == 0:
            continue
        commit_step[b, :n] = torch.as_tensor(list(r["commit_step"][:n]), dtype=torch.long)
        top_ids[b, :n] = torch.as_tensor([list(x) for x in r["top_ids"][:n]], dtype=torch.long)
        top_probs[b, :n] = torch.as_tensor(
            [list(x) for x in r["top_probs"][:n]], dtype=torch.float32
        )
    return response, valid, commit_step, top_ids, top_probs


def is_degenerate(tokens: Sequence[int], *, max_ngram: int = 4, min_repeats: int = 3) -> bool:
    """Whether a rollout fell into a repetition loop (DESIGN.md section 4: such rollouts are
    dropped from the trajectory set and counted).

    The rule: True iff for some n in 1..max_ngram some n-gram occurs `min_repeats` times in
    a row, back to back, anywhere in `tokens`, i.e. some window of n * min_repeats tokens
    has period n (`tokens[j] == tokens[j + n]` for every j in the window but its last n).
    With the defaults: "a a a", "a b a b a b", "a b c a b c a b c" and "a b c d" x 3 are
    loops; "a a", "a b a b" and a 5-gram repeated are not. Whether the rollout ended with
    `<eos>` is a separate check (`trajectory_records`' "ended").
    """
    if max_ngram < 1 or min_repeats < 2:
        raise ValueError(
            f"need max_ngram >= 1 and min_repeats >= 2, got {max_ngram}, {min_repeats}"
        )
    seq = list(tokens)
    for n in range(1, max_ngram + 1):
        need = n * (min_repeats - 1)  # consecutive j with seq[j] == seq[j + n]
        run = 0
        for j in range(len(seq) - n):
            run = run + 1 if seq[j] == seq[j + n] else 0
            if run >= need:
                return True
    return False
