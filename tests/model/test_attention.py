"""The "echo_ray" attention function (echo_ray/model/attention.py): the dense path is
transformers' sdpa path exactly, "causal" and a BlockMask reach their kernels without a mask
tensor or repeated K/V, and saved folders load with plain transformers."""

import json
import subprocess
import sys

import pytest
import torch
from helpers.tiny_dvlm import make_batch, make_model
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import echo_ray.model.attention as attention
from echo_ray.diffusion.losses import build_layout
from echo_ray.diffusion.masks import attention_mask, flex_block_mask
from echo_ray.model.hf import ATTN_IMPLEMENTATION

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model()


@pytest.fixture(scope="module")
def batch(model):
    return make_batch(model, num=3)


def _forward(model, batch, layout="block", attention_kind="dense", image_embeds=None):
    pixel_values, response, valid = batch
    lay = build_layout(model, response, valid, layout, attention=attention_kind)
    with torch.no_grad():
        if image_embeds is None:
            image_embeds = model.encode_images(pixel_values)
        return model(
            lay.input_ids,
            attention_mask=lay.attention_mask,
            position_ids=lay.position_ids,
            image_embeds=image_embeds,
        )


def test_backbone_uses_the_registered_function_in_text_and_vision(model):
    assert ATTN_IMPLEMENTATION == attention.ATTENTION_NAME == "echo_ray"
    assert ALL_ATTENTION_FUNCTIONS["echo_ray"] is attention.echo_attention_forward
    assert "echo_ray" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    hf = model.backbone.config
    assert hf._attn_implementation == "echo_ray"
    assert hf.text_config._attn_implementation == "echo_ray"
    assert hf.vision_config._attn_implementation == "echo_ray"


def test_dense_path_is_bit_identical_to_sdpa(model, batch):
    """Vision tower, a full forward with a 4D bool mask, and a cached block append: the same
    bits as transformers' "sdpa" implementation (what the quickstart ran before)."""
    pixel_values, response, valid = batch
    P, B = model.prompt_length, model.block_length

    def run():
        with torch.no_grad():
            embeds = model.encode_images(pixel_values)
            full = _forward(model, batch)
            cache = DynamicCache(config=model.backbone.config.text_config)
            prompt = model.prompt_input_ids(3)
            pos = model.prompt_position_ids
            model(prompt, attention_mask=attention_mask(P, 0, B, "block"), position_ids=pos,
                  image_embeds=embeds, past_key_values=cache)
            block = response[:, :B]
            mask = attention_mask(P, B, B, "block")[:, :, P:]  # (1, 1, B, P + B)
            step = model(block, attention_mask=mask, past_key_values=cache,
                         position_ids=model.response_position_ids(B))
        return embeds, full, step

    ours = run()
    model.backbone.config._attn_implementation = "sdpa"  # set on the sub-configs too
    try:
        assert model.backbone.config.text_config._attn_implementation == "sdpa"
        reference = run()
    finally:
        model.backbone.config._attn_implementation = ATTN_IMPLEMENTATION
    for got, want in zip(ours, reference, strict=True):
        assert torch.equal(got, want)


def test_causal_runs_sdpa_without_a_mask_tensor_or_repeated_kv(model, batch, monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((query.shape[1], key.shape[1], attn_mask, kwargs))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    with torch.no_grad():
        embeds = model.encode_images(batch[0])  # the vision tower's own SDPA calls: not here
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    _forward(model, batch, "causal", "flex", embeds)
    layers = model.config.num_layers
    assert len(seen) == layers
    heads, kv_heads = model.config.num_heads, model.config.num_kv_heads
    assert kv_heads < heads  # the tiny model has grouped-query attention
    for q_heads, k_heads, mask, kwargs in seen:
        assert (q_heads, k_heads, mask) == (heads, kv_heads, None)
        assert kwargs["is_causal"] is True and kwargs["enable_gqa"] is True


def test_block_mask_runs_flex_attention_on_the_kv_heads(model, batch, monkeypatch):
    seen = []
    kernel = attention._flex_kernel("cpu")

    def spy(query, key, value, **kwargs):
        seen.append((query.shape[1], key.shape[1], kwargs))
        return kernel(query, key, value, **kwargs)

    monkeypatch.setattr(attention, "_flex_kernel", lambda device: spy)
    _forward(model, batch, "block", "flex")
    assert len(seen) == model.config.num_layers
    for q_heads, k_heads, kwargs in seen:
        assert (q_heads, k_heads) == (model.config.num_heads, model.config.num_kv_heads)
        assert kwargs["enable_gqa"] is True
        assert isinstance(kwargs["block_mask"], torch.nn.attention.flex_attention.BlockMask)


def test_forward_refuses_masks_it_cannot_honour(model):
    B = model.block_length
    ids = model.prompt_input_ids(1)[:, -4:]  # text tokens only
    pos = model.prompt_position_ids[:, :, -4:]
    for bad in (torch.ones(1, 4, 4, dtype=torch.bool), torch.zeros(1, 1, 4, 4), "full", None):
        with pytest.raises(ValueError, match="attention_mask must be|4D bool"):
            model(ids, attention_mask=bad, position_ids=pos)
    cache = DynamicCache(config=model.backbone.config.text_config)
    with torch.no_grad():
        model(ids, attention_mask=attention_mask(4, 0, B, "block"), position_ids=pos,
              past_key_values=cache)
    more = model.response_position_ids(B)
    for mask in ("causal", flex_block_mask(0, B, B, "block")):
        with pytest.raises(ValueError, match="with cached keys pass a 4D bool"):
            model(ids[:, :1].expand(1, B), attention_mask=mask, position_ids=more,
                  past_key_values=cache)


def test_saved_folder_carries_no_attention_and_loads_with_plain_transformers(model, tmp_path):
    model.backbone.save_pretrained(str(tmp_path))
    text = (tmp_path / "config.json").read_text()
    assert "echo_ray" not in text and "attn_implementation" not in text
    assert json.loads(text)["model_type"] == "qwen2_5_vl"
    # A fresh interpreter that never imports echo_ray: transformers' default attention.
    code = (
        "import sys; from transformers import Qwen2_5_VLForConditionalGeneration as M; "
        "m = M.from_pretrained(sys.argv[1]); c = m.config; "
        "print(c._attn_implementation, c.text_config._attn_implementation, "
        "c.vision_config._attn_implementation, 'echo_ray' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["sdpa", "sdpa", "sdpa", "False"]
    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(tmp_path), attn_implementation=ATTN_IMPLEMENTATION
    )
    assert again.config.text_config._attn_implementation == "echo_ray"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_attention_with_seven_query_heads_per_kv_head_on_cuda():
    """Qwen2.5-VL-7B's grouping (28 query heads on 4 K/V heads, head dim 128, not a power of
    two per group) through the compiled kernel: the dense SDPA path's output and gradients."""
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 7, True
    P, L, B = 150, 64, 8
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, 40:] = False
    T = P + 2 * L
    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 28, T, 128, device="cuda", generator=gen, requires_grad=True)
    k = torch.randn(2, 4, T, 128, device="cuda", generator=gen, requires_grad=True)
    v = torch.randn(2, 4, T, 128, device="cuda", generator=gen, requires_grad=True)
    masks = {
        "dense": attention_mask(P, L, B, "rad", valid).cuda(),
        "flex": flex_block_mask(P, L, B, "rad", valid, "cuda"),
    }
    out = {}
    for name, mask in masks.items():
        o, _ = attention.echo_attention_forward(module, q, k, v, mask, scaling=128**-0.5)
        grads = torch.autograd.grad(o.square().sum(), (q, k, v))
        out[name] = (o.detach(), *grads)
    for got, want in zip(out["flex"], out["dense"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
