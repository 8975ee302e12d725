"""Responses padded to whole blocks, and their block-wise noising."""

import pytest
import torch
from helpers.tiny_dvlm import make_tokenizer

from echo_ray.diffusion.noise import noise_response, pad_responses


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_pad_responses_fill_the_last_block_with_eos_then_pad(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    response, valid = pad_responses(
        [[50, 51, 52], [50] * 9, [60] * 30],
        block_length=4,
        max_len=12,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    assert response.shape == (3, 12)  # 11 + eos = 12 is the longest
    assert response[0].tolist() == [50, 51, 52, eos] + [pad] * 8
    assert response[1].tolist() == [50] * 9 + [eos] * 3  # eos fills the report's last block
    assert response[2].tolist() == [60] * 11 + [eos]  # cut to max_len - 1, then eos
    assert valid.sum(1).tolist() == [4, 12, 12]
    assert (response[~valid] == pad).all()


def test_noise_masks_only_valid_positions_with_one_ratio_per_block(tokenizer):
    mask_id = tokenizer.mask_token_id
    gen = torch.Generator().manual_seed(0)
    response = torch.randint(10, 50, (64, 20), generator=gen)
    valid = torch.ones(64, 20, dtype=torch.bool)
    valid[:, 17:] = False
    noise = noise_response(response, valid, 8, mask_id, generator=gen)
    assert not noise.masked[~valid].any()
    assert (noise.noisy[noise.masked] == mask_id).all()
    assert torch.equal(noise.noisy[~noise.masked], response[~noise.masked])
    blocks = noise.ratio[:, :16].view(64, 2, 8)
    assert (blocks == blocks[..., :1]).all()  # constant inside a block
    assert not torch.equal(noise.ratio[:, 0], noise.ratio[:, 8])  # drawn per block
    assert ((noise.ratio > 0) & (noise.ratio <= 1)).all()
    # The masked fraction follows the ratio (64 x 2 full blocks of 8).
    frac = noise.masked[:, :16].float().mean()
    assert abs(frac - noise.ratio[:, :16].mean()) < 0.05
    full = noise_response(response, valid, 8, mask_id, mask_ratio=1.0)
    assert torch.equal(full.masked, valid)
