"""The RAD and AR losses, on logits and through the model in every layout."""

import math

import pytest
import torch
from helpers.tiny_dvlm import make_batch, make_model, overfit
from torch.nn.attention.flex_attention import BlockMask

from echo_ray.diffusion.losses import build_layout, compute_ar_loss, compute_rad_loss, rad_loss
from echo_ray.diffusion.masks import LAYOUTS
from echo_ray.diffusion.noise import noise_response

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------- losses


def test_rad_loss_scores_only_masked_positions_with_elbo_weights():
    gen = torch.Generator().manual_seed(1)
    B, L, V = 3, 16, 11
    logits = torch.randn(B, L, V, generator=gen, requires_grad=True)
    targets = torch.randint(0, V, (B, L), generator=gen)
    masked = torch.rand(B, L, generator=gen) < 0.5
    ratio = torch.rand(B, L, generator=gen).clamp(min=0.1)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, 12:] = False
    masked &= valid
    loss = rad_loss(logits, targets, masked, ratio, valid)
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad[~masked] == 0).all()
    assert (grad[masked].abs().sum(-1) > 0).all()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    expected = (ce * masked / ratio).sum() / valid.sum()
    torch.testing.assert_close(loss, expected)
    mean = rad_loss(logits, targets, masked, ratio, valid, weighting="mean")
    torch.testing.assert_close(mean, ce[masked].mean())
    nothing = rad_loss(logits, targets, torch.zeros_like(masked), ratio, valid)
    assert nothing.item() == 0.0


# ---------------------------------------------------------------------- layouts through the model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model()


@pytest.fixture(scope="module")
def batch(model):
    return make_batch(model, num=3)


def _logits(
    model, layout, response, valid, noisy=None, pixel_values=None, logits_from=None,
    attention="dense",
):
    lay = build_layout(model, response, valid, layout, noisy=noisy, attention=attention)
    copies = 2 if layout == "full_copy" else 1
    embeds = model.encode_images(pixel_values).repeat(1, copies, 1)
    with torch.no_grad():
        return model(
            lay.input_ids,
            attention_mask=lay.attention_mask,
            position_ids=lay.position_ids,
            image_embeds=embeds,
            logits_from=lay.logits_from if logits_from is None else logits_from,
        )


def test_rad_positions_noisy_copy_reuses_clean_positions(model, batch):
    _, response, valid = batch
    L, P = response.shape[1], model.prompt_length
    noisy = noise_response(response, valid, model.block_length, model.mask_token_id).noisy
    rad = build_layout(model, response, valid, "rad", noisy=noisy)
    pos = rad.position_ids  # (3, 1, P + 2L)
    assert pos.shape == (3, 1, P + 2 * L)
    assert torch.equal(pos[:, :, :P], model.prompt_position_ids)
    assert torch.equal(pos[:, :, P : P + L], pos[:, :, P + L :])
    start = int(model.prompt_position_ids.max()) + 1
    assert pos[:, 0, P : P + L].tolist() == [list(range(start, start + L))] * 3
    # The image tokens are 2D positions (height, width differ), the text 1D.
    image = model.prompt_ids == model.image_token_id
    assert not torch.equal(pos[1, 0, :P][image], pos[2, 0, :P][image])
    full = build_layout(model, response, valid, "full_copy", noisy=noisy).position_ids
    assert torch.equal(full[:, :, P + L : 2 * P + L], model.prompt_position_ids)
    assert torch.equal(full[:, :, 2 * P + L :], pos[:, :, P + L :])
    assert torch.equal(rad.input_ids[:, P + L :], noisy) and torch.equal(
        rad.input_ids[:, P : P + L], response
    )


def test_rad_copies_match_block_causal_passes(model, batch):
    """Clean copy == a block-causal pass over x0; noisy block k == a block-causal pass over
    [prompt | x0 blocks < k | xt block k]."""
    pixel_values, response, valid = batch
    P, L, B = model.prompt_length, response.shape[1], model.block_length
    noise = noise_response(
        response, valid, B, model.mask_token_id, generator=torch.Generator().manual_seed(3)
    )
    rad = _logits(model, "rad", response, valid, noise.noisy, pixel_values, logits_from=P)
    clean, noisy = rad[:, :L], rad[:, L:]
    block = _logits(model, "block", response, valid, pixel_values=pixel_values)
    torch.testing.assert_close(clean[valid], block[valid], atol=2e-5, rtol=1e-4)
    for k in range(L // B):
        mixed = torch.cat([response[:, : k * B], noise.noisy[:, k * B : (k + 1) * B]], dim=1)
        ref = _logits(model, "block", mixed, valid[:, : (k + 1) * B], pixel_values=pixel_values)
        got, want = noisy[:, k * B : (k + 1) * B], ref[:, k * B :]
        ok = valid[:, k * B : (k + 1) * B]
        torch.testing.assert_close(got[ok], want[ok], atol=2e-5, rtol=1e-4)


def test_full_copy_layout_gives_the_rad_noisy_logits(model, batch):
    pixel_values, response, valid = batch
    noisy = noise_response(response, valid, model.block_length, model.mask_token_id).noisy
    rad = _logits(model, "rad", response, valid, noisy, pixel_values)
    full = _logits(model, "full_copy", response, valid, noisy, pixel_values)
    torch.testing.assert_close(full[valid], rad[valid], atol=2e-5, rtol=1e-4)


def test_rad_has_no_leak_through_the_model(model, batch):
    """Noisy block k must not see clean block k (the answer); clean rows never see xt."""
    pixel_values, response, valid = batch
    P, L, B = model.prompt_length, response.shape[1], model.block_length
    noisy = noise_response(response, valid, B, model.mask_token_id, mask_ratio=1.0).noisy
    base = _logits(model, "rad", response, valid, noisy, pixel_values, logits_from=P)
    k = 1
    changed = response.clone()
    changed[:, k * B : (k + 1) * B] = 100  # change clean block k
    alt = _logits(model, "rad", changed, valid, noisy, pixel_values, logits_from=P)
    noisy_blocks = slice(L, L + (k + 1) * B)  # xt blocks <= k: unaffected
    torch.testing.assert_close(alt[:, noisy_blocks], base[:, noisy_blocks], atol=1e-5, rtol=0)
    assert not torch.allclose(alt[:, L + (k + 1) * B :], base[:, L + (k + 1) * B :], atol=1e-3)
    changed_noisy = noisy.clone()
    changed_noisy[:, k * B] = 100  # change one noisy token of block k
    alt = _logits(model, "rad", response, valid, changed_noisy, pixel_values, logits_from=P)
    torch.testing.assert_close(alt[:, :L], base[:, :L], atol=1e-5, rtol=0)  # clean copy
    others = torch.ones(L, dtype=torch.bool)
    others[k * B : (k + 1) * B] = False
    torch.testing.assert_close(alt[:, L:][:, others], base[:, L:][:, others], atol=1e-5, rtol=0)
    # ... and inside its block attention is bidirectional: the block's FIRST position moves.
    changed_noisy = noisy.clone()
    changed_noisy[:, (k + 1) * B - 1] = 100  # the block's last token
    alt = _logits(model, "rad", response, valid, changed_noisy, pixel_values, logits_from=P)
    assert not torch.allclose(alt[:, L + k * B], base[:, L + k * B], atol=1e-4)


def test_ar_loss_is_the_shifted_next_token_loss(model, batch):
    pixel_values, response, valid = batch
    P = model.prompt_length
    loss = compute_ar_loss(model, pixel_values, response, valid)
    logits = _logits(model, "causal", response, valid, pixel_values=pixel_values, logits_from=0)
    pred = logits[:, P - 1 : -1]  # position t predicts token t + 1
    is_eos = response == model.eos_token_id
    scored = valid & ((is_eos.cumsum(1) - is_eos.long()) == 0)  # up to the first eos
    ce = torch.nn.functional.cross_entropy(pred.transpose(1, 2), response, reduction="none")
    torch.testing.assert_close(loss.detach(), ce[scored].mean(), atol=1e-5, rtol=1e-5)
    assert scored.sum() < valid.sum()  # the eos fill after the first eos is not scored


def test_rad_loss_through_the_model_is_finite_and_backpropagates(model, batch):
    pixel_values, response, valid = batch
    loss, noise = compute_rad_loss(
        model, pixel_values, response, valid, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(loss) and loss.item() > 0
    assert noise.masked.any()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_tiny_rad_loss_goes_down_when_overfitting():
    torch.manual_seed(0)
    model = make_model()
    pixel_values, response, valid = make_batch(model)

    def fixed_loss():  # the same noise draws before and after training
        with torch.no_grad():
            return (
                sum(
                    compute_rad_loss(
                        model,
                        pixel_values,
                        response,
                        valid,
                        generator=torch.Generator().manual_seed(s),
                    )[0].item()
                    for s in range(4)
                )
                / 4
            )

    before = fixed_loss()
    losses = overfit(model, steps=30)
    after = fixed_loss()
    assert all(math.isfinite(x) for x in losses)
    assert after < 0.75 * before, (before, after)


# ---------------------------------------------------------------------- flex / causal == dense


def _noisy(model, response, valid, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return noise_response(response, valid, model.block_length, model.mask_token_id, generator=gen)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flex_attention_gives_the_dense_logits_with_pads(model, batch, layout):
    """attention="flex" (no dense mask: "causal" SDPA for the AR layout, a BlockMask for the
    others; flex runs eagerly on CPU) gives the dense path's logits in fp32. "causal" cannot
    hide pad keys: only the pad rows themselves (never scored) may differ there."""
    pixel_values, response, valid = batch
    assert (~valid).any() and valid.any(1).all()  # rows of different lengths: pads
    noisy = _noisy(model, response, valid).noisy
    lay = build_layout(model, response, valid, layout, noisy=noisy, attention="flex")
    assert isinstance(lay.attention_mask, str if layout == "causal" else BlockMask)
    dense = _logits(model, layout, response, valid, noisy, pixel_values, logits_from=0)
    flex = _logits(model, layout, response, valid, noisy, pixel_values, 0, attention="flex")
    P, B = model.prompt_length, response.shape[0]
    rows = torch.ones(B, dense.shape[1], dtype=torch.bool)  # (B, T)
    if layout == "causal":
        rows[:, P:] = valid
    torch.testing.assert_close(flex[rows], dense[rows], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["causal", "rad", "full_copy"])
def test_flex_attention_gives_the_dense_losses(model, batch, layout):
    pixel_values, response, valid = batch
    with torch.no_grad():  # flex attention has no backward on CPU
        if layout == "causal":
            dense = compute_ar_loss(model, pixel_values, response, valid)
            flex = compute_ar_loss(model, pixel_values, response, valid, attention="flex")
        else:
            dense, noise = compute_rad_loss(
                model, pixel_values, response, valid, layout=layout,
                generator=torch.Generator().manual_seed(7),
            )
            flex, noise_flex = compute_rad_loss(
                model, pixel_values, response, valid, layout=layout,
                generator=torch.Generator().manual_seed(7), attention="flex",
            )
            assert torch.equal(noise.noisy, noise_flex.noisy)
    assert dense.item() > 0
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_causal_attention_gives_the_dense_ar_gradients(model, batch):
    """The AR path without a mask tensor trains on CPU too (SDPA): same loss, same gradients."""
    pixel_values, response, valid = batch
    grads = {}
    for attention in ("dense", "flex"):
        model.zero_grad(set_to_none=True)
        loss = compute_ar_loss(model, pixel_values, response, valid, attention=attention)
        loss.backward()
        grads[attention] = {
            name: q.grad.clone() for name, q in model.named_parameters() if q.grad is not None
        }
    model.zero_grad(set_to_none=True)
    assert grads["dense"].keys() == grads["flex"].keys() and len(grads["dense"]) > 10
    for name, grad in grads["dense"].items():
        torch.testing.assert_close(grads["flex"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_flex_attention_refuses_cpu_training_and_bad_arguments(model, batch):
    pixel_values, response, valid = batch
    with pytest.raises(NotImplementedError, match="train.attention=dense"):
        compute_rad_loss(model, pixel_values, response, valid, attention="flex")
    with pytest.raises(ValueError, match="unknown attention 'sparse'"):
        compute_ar_loss(model, pixel_values, response, valid, attention="sparse")
    holes = valid.clone()
    holes[0, 0] = False  # a pad before valid tokens: "causal" would let rows see it
    with pytest.raises(ValueError, match="pads at the end"):
        build_layout(model, response, holes, "causal", attention="flex")


_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@_cuda
@pytest.mark.parametrize("layout", ["causal", "rad"])
def test_flex_attention_gives_the_dense_loss_and_gradients_on_cuda(layout):
    """Where training uses it: compiled flex attention (RAD) and causal SDPA (AR) on CUDA, in
    fp32, give the dense path's loss and every gradient."""
    torch.manual_seed(0)
    model = make_model().to("cuda").train()
    pixel_values, response, valid = make_batch(model, num=3)
    out = {}
    for attention in ("dense", "flex"):
        model.zero_grad(set_to_none=True)
        if layout == "causal":
            loss = compute_ar_loss(model, pixel_values, response, valid, attention=attention)
        else:
            gen = torch.Generator("cuda").manual_seed(0)
            loss, _ = compute_rad_loss(
                model, pixel_values, response, valid, generator=gen, attention=attention
            )
        loss.backward()
        out[attention] = loss.detach(), {
            name: q.grad.clone() for name, q in model.named_parameters() if q.grad is not None
        }
    (dense, dense_grads), (flex, flex_grads) = out["dense"], out["flex"]
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    assert dense_grads.keys() == flex_grads.keys() and len(dense_grads) > 10
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.gpu
@_cuda
def test_flex_attention_trains_under_bf16_autocast_on_cuda():
    """DDP's precision (fp32 weights, bf16 autocast): flex and dense agree to bf16 accuracy."""
    torch.manual_seed(0)
    model = make_model().to("cuda").train()
    pixel_values, response, valid = make_batch(model, num=3)
    losses = {}
    for attention in ("dense", "flex"):
        model.zero_grad(set_to_none=True)
        gen = torch.Generator("cuda").manual_seed(0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = compute_rad_loss(
                model, pixel_values, response, valid, generator=gen, attention=attention
            )
        loss.backward()
        assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
        losses[attention] = loss.item()
    assert losses["flex"] == pytest.approx(losses["dense"], rel=2e-2)
