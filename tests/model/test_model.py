
import numpy as np
import pytest
import torch
from helpers.tiny_dvlm import make_batch, make_model, make_tokenizer

from echo_ray.diffusion.losses import build_layout, compute_rad_loss
from echo_ray.model.dvlm import PatchProjection
from echo_ray.model.hf import ATTN_IMPLEMENTATION
from echo_ray.text.tokenizer import (
    EOS_TOKEN,
    IMAGE_PAD_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    VIDEO_PAD_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


def test_tiny_model_uses_the_tokenizer_ids_without_resizing(model, tokenizer):
    hf = model.backbone.config
    vocab = tokenizer.get_vocab()
    assert model.vocab_size == len(tokenizer) == hf.text_config.vocab_size
    assert model.mask_token_id == tokenizer.mask_token_id == vocab[MASK_TOKEN]
    assert model.eos_token_id == vocab[EOS_TOKEN] and model.pad_token_id == vocab[PAD_TOKEN]
    assert hf.image_token_id == vocab[IMAGE_PAD_TOKEN] == model.image_token_id
    assert hf.vision_start_token_id == vocab[VISION_START_TOKEN]
    assert hf.vision_end_token_id == vocab[VISION_END_TOKEN]
    assert hf.video_token_id == vocab[VIDEO_PAD_TOKEN]
    assert model.backbone.config._attn_implementation == ATTN_IMPLEMENTATION
    assert not hf.tie_word_embeddings
    # docs/ARCHITECTURE.md section 5.8's size: a few million parameters, 16 image tokens.
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 8e6
    assert model.num_image_tokens == 16


def test_prompt_is_fixed_and_its_positions_come_from_get_rope_index(model, tokenizer):
    n = model.num_image_tokens
    ids = model.prompt_ids.tolist()
    assert ids[0] == tokenizer.convert_tokens_to_ids(VISION_START_TOKEN)
    assert ids[1 : 1 + n] == [model.image_token_id] * n
    assert ids[1 + n] == tokenizer.convert_tokens_to_ids(VISION_END_TOKEN)
    assert tokenizer.decode(ids[2 + n :]) == model.config.instruction
    assert model.prompt_input_ids(5).shape == (5, model.prompt_length)
    pos = model.prompt_position_ids
    assert pos.shape == (3, 1, model.prompt_length)
    side = int(n**0.5)
    # 4 x 4 image tokens: one temporal index, rows on axis 1, columns on axis 2.
    assert pos[0, 0, 1 : 1 + n].unique().numel() == 1
    assert pos[1, 0, 1 : 1 + n].tolist() == [1 + i // side for i in range(n)]
    assert pos[2, 0, 1 : 1 + n].tolist() == [1 + i % side for i in range(n)]
    assert model.response_position_start == int(pos.max()) + 1
    assert (
        model.response_position_ids(3, offset=2)[:, 0].tolist()
        == [list(range(model.response_position_start + 2, model.response_position_start + 5))] * 3
    )


def test_preprocess_matches_the_qwen2_vl_image_processor(model):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    size = model.config.image_size
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=size**2,
        max_pixels=size**2,
    )
    ref = processor(images=[rgb], return_tensors="pt", do_resize=False)
    ours = model.preprocess_images(torch.from_numpy(rgb).permute(2, 0, 1)[None] / 255.0)
    assert torch.equal(ref["image_grid_thw"], model.image_grid_thw)
    torch.testing.assert_close(ours, ref["pixel_values"], atol=1e-5, rtol=1e-5)


def test_any_image_size_becomes_the_fixed_grid(model):
    for shape in [(2, 100, 90), (2, 1, 300, 200), (2, 3, 112, 112)]:
        pv = model.preprocess_images(torch.rand(shape))
        assert pv.shape == (2 * model.num_patches, 3 * 2 * 14 * 14)
    pv = model.preprocess_images(np.random.rand(1, 64, 64).astype(np.float32))
    assert pv.shape[0] == model.num_patches
    with pytest.raises(ValueError, match=r"images must be \(N, H, W\)"):
        model.preprocess_images(torch.rand(2, 2, 64, 64))


def test_patch_projection_is_the_conv3d_as_a_matmul(model):
    """The vision tower's patch Conv3d runs as one matmul per patch: same numbers, same
    parameter (state-dict key), same gradient; other input shapes still convolve."""
    proj = model.backbone.model.visual.patch_embed.proj
    assert isinstance(proj, PatchProjection)
    assert "backbone.model.visual.patch_embed.proj.weight" in model.state_dict()
    patches = torch.randn(10, 3, 2, 14, 14, requires_grad=True)
    conv = torch.nn.functional.conv3d(patches, proj.weight, proj.bias, stride=proj.stride)
    ours = proj(patches)
    torch.testing.assert_close(ours, conv, atol=1e-5, rtol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), proj.weight)
    (g_conv,) = torch.autograd.grad(conv.square().sum(), proj.weight)
    torch.testing.assert_close(g_ours, g_conv, atol=1e-4, rtol=1e-4)
    two = torch.randn(1, 3, 4, 28, 28)  # two patches per axis: a real convolution
    with torch.no_grad():
        expected = torch.nn.functional.conv3d(two, proj.weight, stride=proj.stride)
        torch.testing.assert_close(proj(two), expected)


def test_precomputed_vision_inputs_give_the_hf_vision_tower_output(tokenizer):
    """encode_images hands the tower its grid-dependent inputs, computed once per batch size:
    bit-identical to HF computing them per call, with several attention windows per image
    (224 px: 8 x 8 merged tokens in 4 windows) and batch sizes that come and go."""
    torch.manual_seed(0)
    model = make_model(tokenizer, image_size=224).eval()
    visual = model.backbone.model.visual
    for num in (1, 3, 1):
        images = torch.rand(num, 224, 224, generator=torch.Generator().manual_seed(num))
        pixel_values = model.preprocess_images(images)
        with torch.no_grad():
            ours = model.encode_images(pixel_values)
            grid = model.image_grid_thw.expand(num, -1)
            ref = visual(pixel_values, grid_thw=grid).pooler_output.view(num, -1, ours.shape[-1])
        assert torch.equal(ours, ref)
    inputs = model.vision_inputs(3)
    assert inputs is model.vision_inputs(3)  # computed once
    assert len(inputs["cu_window_seqlens"]) == 3 * 4 + 1  # 4 windows per image
    assert inputs["cu_seqlens"].tolist() == [0, 256, 512, 768]  # full attention per image


def test_forward_with_explicit_mask_and_positions_equals_the_hf_forward(model):
    """Our embedding scatter + explicit M-RoPE positions + causal 4D mask == HF's own path."""
    pixel_values, response, valid = make_batch(model, num=2)
    lay = build_layout(model, response, valid, "causal")
    with torch.no_grad():
        ours = model(
            lay.input_ids,
            attention_mask=lay.attention_mask,
            position_ids=lay.position_ids,
            image_embeds=model.encode_images(pixel_values),
        )
        ids = lay.input_ids
        ref = model.backbone(
            input_ids=ids,
            pixel_values=pixel_values,
            image_grid_thw=model.image_grid_thw.expand(2, -1),
            mm_token_type_ids=(ids == model.image_token_id).int(),
            attention_mask=torch.cat([torch.ones_like(ids[:, : model.prompt_length]), valid], 1),
        ).logits
    ok = torch.cat([torch.ones_like(valid[:, :1]).expand(-1, model.prompt_length), valid], 1)
    torch.testing.assert_close(ours[ok], ref[ok], atol=2e-5, rtol=1e-4)


def test_precomputed_rotary_slices_equal_per_call_rotary(model):
    """Decoders pass slices of one rotary table (`position_embeddings`): same logits as
    letting the forward compute M-RoPE from `position_ids`, cached block append included."""
    from transformers import DynamicCache

    pixel_values, response, valid = make_batch(model, num=2)
    lay = build_layout(model, response, valid, "block")
    P, Bk = model.prompt_length, model.block_length
    cos, sin = model.rotary_embeddings(lay.position_ids)  # (1, T, head_dim) each
    with torch.no_grad():
        image_embeds = model.encode_images(pixel_values)
        outs = []
        for table in (False, True):
            cache = DynamicCache(config=model.backbone.config)
            kw = {"position_embeddings": (cos[:, :P], sin[:, :P])} if table else {}
            model(
                lay.input_ids[:, :P],
                attention_mask=lay.attention_mask[..., :P, :P],
                position_ids=lay.position_ids[..., :P],
                image_embeds=image_embeds,
                past_key_values=cache,
                **kw,
            )
            end = P + Bk
            kw = {"position_embeddings": (cos[:, P:end], sin[:, P:end])} if table else {}
            outs.append(
                model(
                    lay.input_ids[:, P:end],
                    attention_mask=lay.attention_mask[..., P:end, :end],
                    position_ids=lay.position_ids[..., P:end],
                    past_key_values=cache,
                    **kw,
                )
            )
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_forward_rejects_a_non_bool_mask(model):
    ids = model.prompt_input_ids(1)
    with pytest.raises(ValueError, match="4D bool"):
        model(ids, attention_mask=torch.ones(1, 1, 3, 3), position_ids=model.prompt_position_ids)


def test_freeze_vision_freezes_tower_and_projector_only(tokenizer):
    model = make_model(tokenizer)
    model.set_vision_trainable(False)
    visual = model.backbone.model.visual
    assert all(not p.requires_grad for p in visual.parameters())
    assert all(not p.requires_grad for p in visual.merger.parameters())  # the projector
    others = [p for n, p in model.named_parameters() if ".visual." not in n]
    assert others and all(p.requires_grad for p in others)
    before = {n: p.clone() for n, p in visual.named_parameters()}
    lm_before = model.backbone.lm_head.weight.clone()
    _one_training_step(model)
    assert all(torch.equal(p, before[n]) for n, p in visual.named_parameters())
    assert not torch.equal(model.backbone.lm_head.weight, lm_before)


def _one_training_step(model):
    pixel_values, response, valid = make_batch(model, num=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss, _ = compute_rad_loss(model, pixel_values, response, valid)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    opt.step()
    model.eval()
    return loss
