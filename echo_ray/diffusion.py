"""Block diffusion math: attention masks, sequence layouts, noising and losses (AR, RAD).

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

import torch
import torch.nn.functional as F

from echo_ray.model import EchoDVLM

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
    return ar_loss(logits[:, :-1], response, valid, model.eos_token_id)


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
    device = model.device
    response, valid = response.to(device), valid.to(device)
    lay = build_layout(model, response, valid, "causal")
    logits = model(
        lay.input_ids,
        attention_mask=lay.attention_mask,
        position_ids=lay.position_ids,
        image_embeds=_image_embeds(model, pixel_values, 1),
        logits_from=lay.logits_from,
    )  # (B, L + 1, V)
    ce, scored = _ar_token_ce(logits[:, :-1], response, valid, model.eos_token_id)  # (B, L)
    return ce.sum(1), scored.sum(1)

