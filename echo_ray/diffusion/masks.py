"""Attention masks of the sequence layouts: one mask function builds every one of them.

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
"""

from __future__ import annotations

import torch

LAYOUTS = ("causal", "block", "rad", "full_copy")


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
