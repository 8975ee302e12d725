"""Responses as the diffusion sees them (padded to whole blocks) and their block-wise noising.

Shapes: B batch, L response length (padded to a multiple of the diffusion block length
`block_length`).

Responses are `report tokens + <eos>`, then `<eos>` up to the end of that block (so the
block holding the end of the report is complete, as the decoder sees it: every position of
a block is predicted), then `<pad>` up to L. Pad tokens are never attended to and never
scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
