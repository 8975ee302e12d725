"""The attention mask of every layout against a brute-force reading of its definition."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from echo_ray.diffusion.masks import LAYOUTS, attention_mask, flex_block_mask

# ---------------------------------------------------------------------- masks vs brute force


def _tokens(layout: str, P: int, L: int) -> list[tuple[str, int]]:
    """(segment, index within segment) of every position of the layout's sequence."""
    prompt = [("prompt", i) for i in range(P)]
    x0 = [("x0", i) for i in range(L)]
    xt = [("xt", i) for i in range(L)]
    if layout in ("causal", "block"):
        return prompt + x0
    if layout == "rad":
        return prompt + x0 + xt
    return prompt + x0 + [("prompt2", i) for i in range(P)] + xt


def _attends(layout: str, q: tuple[str, int], k: tuple[str, int], qpos: int, kpos: int, B: int):
    """The spec, one sentence per branch (docs/ARCHITECTURE.md section 4.1)."""
    (qs, qi), (ks, ki) = q, k
    if layout == "causal":
        return kpos <= qpos
    own_prompt = "prompt2" if (layout == "full_copy" and qs == "xt") else "prompt"
    if qs in ("prompt", "prompt2"):  # prompt: causal, within its own copy
        return ks == qs and ki <= qi
    if qs == "x0":  # clean block k sees the prompt and clean blocks <= k
        return ks == "prompt" or (ks == "x0" and ki // B <= qi // B)
    # noisy block k sees the prompt, clean blocks < k and itself
    return (
        ks == own_prompt
        or (ks == "x0" and ki // B < qi // B)
        or (ks == "xt" and ki // B == qi // B)
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("P", "L", "B"), [(5, 16, 4), (3, 13, 4), (4, 7, 8), (2, 6, 1)])
def test_mask_equals_brute_force_definition(layout, P, L, B):
    mask = attention_mask(P, L, B, layout)
    toks = _tokens(layout, P, L)
    assert mask.shape == (1, 1, len(toks), len(toks)) and mask.dtype == torch.bool
    for i, q in enumerate(toks):
        for j, k in enumerate(toks):
            assert bool(mask[0, 0, i, j]) == _attends(layout, q, k, i, j, B), (layout, q, k)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_hides_pad_keys_and_keeps_pad_rows_non_empty(layout):
    P, L, B = 3, 10, 4
    valid = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    mask = attention_mask(P, L, B, layout, response_valid=valid)
    toks = _tokens(layout, P, L)
    assert mask.shape == (2, 1, len(toks), len(toks))
    for b in range(2):
        for i, q in enumerate(toks):
            for j, k in enumerate(toks):
                key_ok = k[0].startswith("prompt") or bool(valid[b, k[1]])
                expected = (_attends(layout, q, k, i, j, B) and key_ok) or i == j
                assert bool(mask[b, 0, i, j]) == expected
    assert mask.any(-1).all()  # no empty row (sdpa would give NaN)


@pytest.mark.parametrize("build", [attention_mask, flex_block_mask])
def test_mask_rejects_bad_arguments(build):
    with pytest.raises(ValueError, match="unknown layout 'bidir'"):
        build(2, 4, 2, "bidir")
    with pytest.raises(ValueError, match="block_length must be >= 1"):
        build(2, 4, 0)
    with pytest.raises(ValueError, match="response_valid has 3 columns, expected 4"):
        build(2, 4, 2, "rad", torch.ones(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------------- flex BlockMask == dense


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("P", "L", "B"), [(5, 16, 4), (3, 13, 4), (4, 7, 8), (0, 6, 1)])
@pytest.mark.parametrize("pads", [False, True])
def test_flex_block_mask_equals_the_dense_mask(layout, P, L, B, pads):
    """The BlockMask's rule, evaluated on every (row, query, key), is `attention_mask`."""
    valid = None
    if pads:
        valid = torch.rand(3, L, generator=torch.Generator().manual_seed(P + L)) < 0.6
        valid[0] = True
    block_mask = flex_block_mask(P, L, B, layout, valid)
    dense = attention_mask(P, L, B, layout, valid)
    T = dense.shape[-1]
    assert block_mask.shape == (1 if valid is None else 3, 1, T, T)
    rows = None if valid is None else 3
    grid = create_mask(block_mask.mask_mod, rows, None, T, T, device="cpu")
    assert grid.shape == dense.shape and torch.equal(grid, dense)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_block_mask_tiles_match_the_dense_mask(layout):
    """Past one 128-token tile: a tile is listed (full or partial) exactly where the dense
    mask has a True in it, so flex attention skips only empty tiles (here at least the
    prompt rows' tiles right of the prompt)."""
    P, L, B = 130, 100, 8
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, 61:] = False
    block_mask = flex_block_mask(P, L, B, layout, valid)
    dense = attention_mask(P, L, B, layout, valid)[:, 0]  # (2, T, T)
    T = dense.shape[-1]
    tiles = -(-T // 128)
    padded = torch.zeros(2, tiles * 128, tiles * 128, dtype=torch.bool)
    padded[:, :T, :T] = dense
    any_true = padded.view(2, tiles, 128, tiles, 128).any(-1).any(-2)  # (2, tiles, tiles)
    listed = block_mask.to_dense()[:, 0].bool()  # (2, tiles, tiles)
    assert listed.shape == any_true.shape and torch.equal(listed, any_true)
    assert not any_true[:, 0, 1:].any()  # prompt rows: only the prompt's tile
