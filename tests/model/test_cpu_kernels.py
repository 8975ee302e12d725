"""Prepacked CPU linears: same numbers as nn.Linear, never stale, invisible to training and
checkpoints, and the decoders' invariants hold on a packed model."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers.tiny_dvlm import make_batch, make_model, overfit, trained_model
from torch import nn

from echo_ray.config.schema import DECODING_MODES
from echo_ray.decode.modes import decoding_kwargs
from echo_ray.decode.predictor import place_model
from echo_ray.decode.sampler import generate
from echo_ray.diffusion.masks import attention_mask
from echo_ray.model.checkpoint import load_checkpoint, save_checkpoint
from echo_ray.model.cpu_kernels import PackedLinear, pack_linears, packing_available

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN"),
]


def _pair(bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(48, 80, bias=bias).to(dtype)
    return dense, PackedLinear.from_linear(dense)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (16, 48), (3, 5, 48), (2, 16, 48)])
def test_packed_matches_dense(bias, shape):
    dense, packed = _pair(bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        got = packed(x)
        assert packed._packed is not None  # the packed path ran, not the fallback
        torch.testing.assert_close(got, dense(x), rtol=1e-5, atol=1e-5)
    assert got.shape == (*shape[:-1], 80)


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="no oneDNN bf16 on this CPU")
def test_packed_matches_dense_in_bfloat16():
    dense, packed = _pair(dtype=torch.bfloat16)
    x = torch.randn(16, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        got = packed(x)
        assert packed._packed is not None
        torch.testing.assert_close(got.float(), dense(x).float(), rtol=2e-2, atol=2e-2)


def test_packed_copy_follows_every_weight_change():
    """A stale packed copy would silently decode with old weights."""
    dense, packed = _pair()
    x = torch.randn(8, 48)
    with torch.no_grad():
        packed(x)
        first = packed._packed
        # load_state_dict copies in place (same storage, new version)
        new = {k: torch.randn_like(v) for k, v in dense.state_dict().items()}
        packed.load_state_dict(new)
        torch.testing.assert_close(packed(x), F.linear(x, new["weight"], new["bias"]))
        assert packed._packed is not first
        # an optimizer step
        packed.bias.add_(1.0)
        torch.testing.assert_close(packed(x), F.linear(x, new["weight"], new["bias"] + 1.0))
        # a dtype change: the bf16 weight must not be read through an fp32 packing
        if packing_available(torch.bfloat16):
            packed.to(torch.bfloat16)
            xb = x.to(torch.bfloat16)
            torch.testing.assert_close(
                packed(xb).float(),
                F.linear(xb, packed.weight, packed.bias).float(),
                rtol=2e-2,
                atol=2e-2,
            )


def test_a_packed_layer_pickles_and_copies():
    """The packed copy is an opaque oneDNN tensor: it is left out and rebuilt."""
    _, packed = _pair()
    x = torch.randn(8, 48)
    with torch.no_grad():
        want = packed(x)
        for clone in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
            assert clone._packed is None
            torch.testing.assert_close(clone(x), want)
            assert clone._packed is not None


def test_training_through_a_packed_layer_is_training_a_linear():
    dense, packed = _pair()
    x = torch.randn(4, 48)
    dense(x).square().sum().backward()
    grads = [p.grad.clone() for p in dense.parameters()]
    for p in dense.parameters():
        p.grad = None
    packed(x).square().sum().backward()  # the same Parameters: autograd uses F.linear
    assert packed._packed is None
    for g, p in zip(grads, packed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # flags() sets TF32 too
def test_onednn_switched_off_falls_back():
    dense, packed = _pair()
    x = torch.randn(8, 48)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        torch.testing.assert_close(packed(x), dense(x))
        assert packed._packed is None


def test_pack_linears_swaps_in_place_and_is_idempotent():
    tree = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    weights = [id(p) for p in tree.parameters()]
    assert pack_linears(tree) == 2
    assert pack_linears(tree) == 0
    assert isinstance(tree[0], PackedLinear) and isinstance(tree[1][0], PackedLinear)
    assert [id(p) for p in tree.parameters()] == weights  # the same Parameter objects


def test_packing_a_model_changes_neither_its_state_nor_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = make_model(tie_word_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = model.backbone.model.language_model.layers
    assert model.pack_linears() == 7 * len(layers) + 1  # q k v o gate up down, + LM head
    assert model.pack_linears() == 0
    head = model.backbone.lm_head
    assert isinstance(head, PackedLinear)
    assert head.weight is model.backbone.get_input_embeddings().weight  # still tied
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    save_checkpoint(model, tmp_path / "packed")
    loaded, _ = load_checkpoint(tmp_path / "packed")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())


def _prompt_logits(model, pixel_values):
    """One no-grad forward over the prompt (causal, as the AR prefill)."""
    P = model.prompt_length
    with torch.no_grad():
        return model(
            model.prompt_input_ids(1),
            attention_mask=attention_mask(P, 0, model.block_length, "causal"),
            position_ids=model.prompt_position_ids,
            image_embeds=model.encode_images(pixel_values),
        )  # (1, P, V)


def test_a_packed_model_trains_like_a_dense_one():
    """Same losses step by step (autograd uses F.linear), and afterwards the packed
    model's logits follow the trained weights, not the packing made before training."""
    runs = []
    for packed in (False, True):
        torch.manual_seed(0)
        model = make_model()
        px = make_batch(model, num=1)[0]
        if packed:
            model.pack_linears()
            _prompt_logits(model, px)  # packs the initial weights
        runs.append((overfit(model, steps=3), _prompt_logits(model, px)))
    (dense_losses, dense_logits), (packed_losses, packed_logits) = runs
    assert packed_losses == dense_losses
    torch.testing.assert_close(packed_logits, dense_logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def models():
    """The trained tiny model, dense and packed (`place_model` packs on CPU)."""
    dense = trained_model()
    packed = place_model(trained_model(), "cpu")
    assert isinstance(packed.backbone.lm_head, PackedLinear)
    images = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(0))
    return dense, packed, dense.preprocess_images(images)


@pytest.mark.parametrize("mode", DECODING_MODES)
def test_packed_decoding_writes_the_dense_model_s_reports(models, mode):
    dense, packed, px = models
    kw = decoding_kwargs(mode, block_length=dense.block_length)
    want, got = generate(dense, px, **kw), generate(packed, px, **kw)
    assert torch.equal(got.tokens, want.tokens)
    assert got.num_forwards == want.num_forwards


@pytest.mark.parametrize("max_new", [13, 40])
def test_packed_decoders_keep_the_sampler_invariants(models, max_new):
    """Fused == unfused == uncached, and AR cached == uncached, on packed kernels (their
    forwards have different row counts: 16 vs 8 vs the whole sequence)."""
    _, packed, px = models
    fused = generate(packed, px, steps=1, max_new_tokens=max_new)
    for kw in (dict(fused=False), dict(use_cache=False)):
        assert torch.equal(
            generate(packed, px, steps=1, max_new_tokens=max_new, **kw).tokens, fused.tokens
        )
    ar = generate(packed, px, mode="ar", max_new_tokens=max_new)
    assert torch.equal(
        generate(packed, px, mode="ar", use_cache=False, max_new_tokens=max_new).tokens, ar.tokens
    )
