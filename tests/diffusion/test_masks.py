"""The attention mask of every layout against a brute-force reading of its definition."""

import pytest
import torch

from echo_ray.diffusion.masks import LAYOUTS, attention_mask

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


def test_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown layout 'bidir'"):
        attention_mask(2, 4, 2, "bidir")
    with pytest.raises(ValueError, match="block_length must be >= 1"):
        attention_mask(2, 4, 0)
