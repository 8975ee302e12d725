"""Attention masks of the sequence layouts: one function builds every layout, per form.

Shapes: P prompt length (image tokens + instruction), L response length, T sequence length.

Layouts:
- "causal"    `[prompt | response]`           the AR model;
- "block"     `[prompt | response]`           prompt causal, response block-causal: what
                                              the block decoders reproduce with a KV cache;
- "rad"       `[prompt | x0 | xt]`            Response-Asymmetric Diffusion: only the
                                              response is duplicated (T = P + 2L);
- "full_copy" `[prompt | x0 | prompt | xt]`   prior work's full-sequence duplication, the
                                              vision tokens included (T = 2P + 2L), kept to
                                              measure what RAD saves. Its xt logits equal RAD's.

Two forms of the same masks: `attention_mask`, the dense `(B, 1, T, T)` bool tensor (any
kernel; KV-cache decoding), built by slicing whole sub-masks; and `flex_block_mask`, a
flex-attention `BlockMask` (training without a dense mask), whose rule is written per
element (`_rule`) since flex attention evaluates it tile by tile. Tests hold the two equal
element for element, every layout, pads included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

LAYOUTS = ("causal", "block", "rad", "full_copy")

# Segment of each position of a layout's sequence (`_tables`).
_PROMPT, _X0, _PROMPT2, _XT = 0, 1, 2, 3

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
    _check_layout(layout, block_length)
    P, L = num_prompt, num_response
    p = torch.arange(P)
    m_p = p[:, None] >= p[None, :]  # (P, P) causal
    blk = torch.arange(L) // block_length  # (L,) block index of each response token
    m_bc = blk[:, None] >= blk[None, :]  # (L, L)
    m_obc = blk[:, None] > blk[None, :]  # (L, L)
    m_bd = blk[:, None] == blk[None, :]  # (L, L)

    if layout == "causal":
        mask = torch.ones(P + L, P + L, dtype=torch.bool).tril()  # (T, T)
    elif layout == "block":
        mask = torch.zeros(P + L, P + L, dtype=torch.bool)  # (T, T)
        mask[:P, :P] = m_p
        mask[P:, :P] = True
        mask[P:, P:] = m_bc
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
    mask = mask[None, None]  # (1, 1, T, T)
    if response_valid is None:
        return mask
    key_valid = _key_valid(P, L, layout, response_valid, torch.device("cpu"))  # (B, T)
    eye = torch.eye(mask.shape[-1], dtype=torch.bool)  # (T, T)
    return (mask & key_valid[:, None, None, :]) | eye  # (B, 1, T, T)


def flex_block_mask(
    num_prompt: int,
    num_response: int,
    block_length: int,
    layout: str = "block",
    response_valid: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> BlockMask:
    """`attention_mask` as a flex-attention `BlockMask`: the same rule, element for element.

    The mask is kept as its rule (a `mask_mod` reading per-position tables of length T) and
    a tile map (which 128 x 128 tiles are empty, full or partial; `create_block_mask`
    evaluates the rule over the grid once to find them), so attention never reads a
    `(B, 1, T, T)` tensor: flex attention skips the empty tiles (37% of them for "rad" at
    1,024 image tokens and 256 response tokens) and applies the rule inside the partial
    ones. Arguments as `attention_mask`; `device` is where the model runs.

    Returns:
        A `BlockMask` of shape `(1, 1, T, T)` without `response_valid`, else `(B, 1, T, T)`.
    """
    device = torch.device(device)
    mask_mod, T, B = _mask_mod(
        num_prompt, num_response, block_length, layout, response_valid, device
    )
    return create_block_mask(mask_mod, B, None, T, T, device=device)


def _mask_mod(
    num_prompt: int,
    num_response: int,
    block_length: int,
    layout: str,
    response_valid: torch.Tensor | None,
    device: torch.device,
) -> tuple[MaskMod, int, int | None]:
    """`(mask_mod, T, B)`: the layout's rule as flex attention's `mask_mod(b, h, q, k)` (any
    broadcastable index tensors; `h` unused), the sequence length, and the batch size (None
    without `response_valid`: one mask for every row)."""
    _check_layout(layout, block_length)
    P, L = num_prompt, num_response
    segment, block, sees = _tables(P, L, block_length, layout, device)
    T = segment.shape[0]
    if response_valid is None:

        def mask_mod(b, h, q, k):
            return _rule(q, k, segment, block, sees)

        return mask_mod, T, None
    key_valid = _key_valid(P, L, layout, response_valid, device)  # (B, T)

    def mask_mod(b, h, q, k):
        # Pad keys hidden from every query; every query keeps itself (no empty row).
        return (_rule(q, k, segment, block, sees) & key_valid[b, k]) | (q == k)

    return mask_mod, T, key_valid.shape[0]


def _check_layout(layout: str, block_length: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if block_length < 1:
        raise ValueError(f"block_length must be >= 1, got {block_length}")


def _key_valid(
    P: int, L: int, layout: str, response_valid: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """`(B, T)` bool: which keys of the layout's sequence are not pads (every prompt copy is
    kept, every response copy follows `response_valid` `(B, L)`)."""
    if response_valid.shape[-1] != L:
        raise ValueError(f"response_valid has {response_valid.shape[-1]} columns, expected {L}")
    valid = response_valid.bool().to(device)
    keep = torch.ones(valid.shape[0], P, dtype=torch.bool, device=device)  # (B, P)
    parts = {
        "causal": [keep, valid],
        "block": [keep, valid],
        "rad": [keep, valid, valid],
        "full_copy": [keep, valid, keep, valid],
    }[layout]
    return torch.cat(parts, dim=1)  # (B, T)


def _tables(
    P: int, L: int, block_length: int, layout: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position tables of the layout's sequence, each `(T,)` long: the segment
    (`_PROMPT`, `_X0`, `_PROMPT2`, `_XT`), the response block (0 on prompt positions, never
    read there) and the prompt copy a response position sees."""
    # "causal" is the "block" rule with one-token blocks.
    blk = torch.arange(L, device=device) // (1 if layout == "causal" else block_length)  # (L,)
    zeros = torch.zeros(P, dtype=torch.long, device=device)  # (P,)
    segments = {
        "causal": [_PROMPT, _X0],
        "block": [_PROMPT, _X0],
        "rad": [_PROMPT, _X0, _XT],
        "full_copy": [_PROMPT, _X0, _PROMPT2, _XT],
    }[layout]
    lengths = [P if s in (_PROMPT, _PROMPT2) else L for s in segments]
    segment = torch.repeat_interleave(
        torch.tensor(segments, device=device), torch.tensor(lengths, device=device)
    )  # (T,)
    block = torch.cat([zeros if s in (_PROMPT, _PROMPT2) else blk for s in segments])  # (T,)
    # full_copy's xt rows see the second prompt copy; every other response row the first.
    own_prompt = _PROMPT2 if layout == "full_copy" else _PROMPT
    sees = torch.where(segment == _XT, own_prompt, _PROMPT)  # (T,)
    return segment, block, sees


def _rule(
    q: torch.Tensor,
    k: torch.Tensor,
    segment: torch.Tensor,
    block: torch.Tensor,
    sees: torch.Tensor,
) -> torch.Tensor:
    """Whether query position q may attend to key position k (pads aside): the sub-masks of
    `attention_mask`'s docstring, one line each."""
    sq, sk = segment[q], segment[k]
    bq, bk = block[q], block[k]
    prompt_q = (sq == _PROMPT) | (sq == _PROMPT2)
    m_p = prompt_q & (sk == sq) & (k <= q)  # M_P, inside each prompt copy
    to_prompt = ~prompt_q & (sk == sees[q])  # response rows see their whole prompt copy
    m_bc = (sq == _X0) & (sk == _X0) & (bk <= bq)  # M_BC
    m_obc = (sq == _XT) & (sk == _X0) & (bk < bq)  # M_OBC
    m_bd = (sq == _XT) & (sk == _XT) & (bk == bq)  # M_BD
    return m_p | to_prompt | m_bc | m_obc | m_bd
