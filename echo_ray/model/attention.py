"""The language model's attention: one function, registered with transformers'
`AttentionInterface` as "echo_ray", that picks the kernel from the mask it is given.

- a 4D bool tensor (True = attend): transformers' `sdpa_attention_forward`, called exactly as
  the "sdpa" implementation calls it (same numerics). The reference path, and the only one a
  KV cache with cached keys uses (decoding);
- a flex-attention `BlockMask` (`echo_ray.diffusion.masks.flex_block_mask`): torch's
  `flex_attention`, which evaluates the mask rule per tile, skips fully masked tiles and never
  holds a `(B, 1, T, T)` mask; grouped-query attention reads the K/V heads directly
  (`enable_gqa`, no repeated K/V). Compiled (fused kernel) off CPU; on CPU it runs eagerly,
  forward only (torch has no flex backward on CPU);
- "causal": SDPA with `is_causal=True` and no mask tensor, which lets torch pick its flash /
  memory-efficient kernels, with `enable_gqa` instead of repeating K/V. The whole sequence
  must be in the call (no cached prefix: `is_causal` aligns the triangle top-left);
- None (the vision tower, whose windows are cut by `cu_seqlens`): `sdpa_attention_forward`.

Registering also maps "echo_ray" to transformers' sdpa mask builder, so HF's own forward
(`generate`, a 2D padding mask) builds the same masks as under "sdpa". The implementation
name lives in the runtime config only: `save_pretrained` never writes it, so saved folders
load anywhere with the default attention.

Importing this module registers the function (idempotent); `model/hf.py` and `model/dvlm.py`
import it, so any process holding a model has it.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "echo_ray"
# The mask value meaning "plain causal over the whole sequence": no mask tensor at all.
CAUSAL = "causal"


def echo_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | BlockMask | str | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query `(B, H, Q, D)`, key / value
    `(B, H_kv, K, D)` -> `((B, Q, H, D), None)`; the kernel follows `attention_mask`'s type."""
    if isinstance(attention_mask, BlockMask):
        return _flex_forward(module, query, key, value, attention_mask, dropout, scaling)
    if isinstance(attention_mask, str):
        if attention_mask != CAUSAL:
            raise ValueError(f"unknown attention mask {attention_mask!r}; the string is {CAUSAL!r}")
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                f"a {CAUSAL!r} mask needs the whole sequence in one forward ({query.shape[2]} "
                f"queries, {key.shape[2]} keys): with cached keys pass a 4D bool mask"
            )
        attention_mask = None
        kwargs["is_causal"] = True
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _flex_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_mask: BlockMask,
    dropout: float,
    scaling: float | None,
) -> tuple[torch.Tensor, None]:
    if dropout > 0:
        raise ValueError("flex attention has no attention dropout; set attention_dropout=0")
    if query.device.type == "cpu" and torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    ):
        raise NotImplementedError(
            f"torch {torch.__version__} has no flex-attention backward on CPU; train on CPU with "
            "dense masks (train.attention=dense, or auto, which picks dense on CPU)"
        )
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as SDPA under autocast: all three in the low dtype
        low = torch.get_autocast_dtype(device)
        query, key, value = query.to(low), key.to(low), value.to(low)
    out = _flex_kernel(device)(
        query,
        key,
        value,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # (B, H, Q, D)
    return out.transpose(1, 2).contiguous(), None  # (B, Q, H, D)


@functools.cache
def _flex_kernel(device_type: str):
    """Eager `flex_attention` on CPU (a reference implementation over the whole score
    matrix), a compiled fused kernel elsewhere (eager there is as slow and memory-hungry)."""
    if device_type == "cpu":
        return flex_attention
    return torch.compile(flex_attention)


AttentionInterface.register(ATTENTION_NAME, echo_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
