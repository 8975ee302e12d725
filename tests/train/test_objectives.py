"""The learning-rate schedule, the freezing and attention decisions, activation checkpointing
and the truncation count of the training collate (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.tiny_dvlm import make_batch, make_model, make_tokenizer

from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import ConfigError, EchoConfig
from echo_ray.train.objectives import (
    Objective,
    lr_lambda,
    set_up_for_training,
    training_attention,
    vision_frozen,
)
from echo_ray.train.worker import _Collate

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    lam = [lr_lambda(s, warmup=4, total=20, floor=0.1) for s in range(21)]
    assert lam[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lam[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lam[4:], lam[5:], strict=False))
    assert lam[12] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lam[20] == pytest.approx(0.1)


# ---------------------------------------------------------------------- decisions


def test_vision_is_frozen_by_stage_default_unless_the_config_says_otherwise():
    tiny = EchoConfig.from_name("tiny").train
    assert [vision_frozen(tiny, s) for s in ("ar", "rad", "dcd")] == [False, True, True]
    unfrozen = apply_overrides(EchoConfig.from_name("tiny"), ["train.freeze_vision=false"])
    assert not vision_frozen(unfrozen.train, "rad") and not vision_frozen(unfrozen.train, "dcd")
    base = EchoConfig.from_name("base-7b").train  # the preset freezes it, AR included
    assert base.freeze_vision is True and vision_frozen(base, "ar")


def test_attention_auto_is_flex_on_cuda_and_dense_elsewhere():
    assert training_attention("auto", torch.device("cuda", 0)) == "flex"
    assert training_attention("auto", torch.device("cpu")) == "dense"
    for setting in ("dense", "flex"):
        assert training_attention(setting, torch.device("cpu")) == setting
    with pytest.raises(ConfigError, match="train.attention must be one of"):
        apply_overrides(EchoConfig(), ["train.attention=flash"])


def test_objective_hands_its_attention_to_the_stage_loss(tokenizer, monkeypatch):
    import echo_ray.diffusion.dcd as dcd
    import echo_ray.diffusion.losses as losses

    seen = {}

    def fake(name):
        def loss(*args, attention, **kwargs):
            seen[name] = attention
            return torch.zeros(()) if name == "ar" else (torch.zeros(()), {})
        return loss

    for module, name in ((losses, "ar"), (losses, "rad"), (dcd, "dcd")):
        monkeypatch.setattr(module, f"compute_{name}_loss", fake(name))
    model = make_model(tokenizer)
    pixel_values, response, valid = make_batch(model, num=1)
    Objective(model, "ar", attention="flex")(pixel_values, response, valid)
    Objective(model, "rad", attention="dense")(pixel_values, response, valid)
    Objective(model, "dcd", attention="flex")(pixel_values, response, valid, None, None, None,
                                              None)
    assert seen == {"ar": "flex", "rad": "dense", "dcd": "flex"}


# ---------------------------------------------------------------------- activation checkpointing


def _loss_grads_and_saved_bytes(model, stage: str):
    """One forward + backward of `stage`'s loss with fixed noise: the loss, every gradient,
    the bytes autograd saved for the backward pass outside checkpointed regions, and how
    often the first decoder layer's MLP started."""
    pixel_values, response, valid = make_batch(model, num=2)
    calls = []
    # a pre-hook: a recompute stops as soon as the last saved tensor is back (torch's early
    # stop), before the module's forward would return
    hook = model.backbone.model.language_model.layers[0].mlp.register_forward_pre_hook(
        lambda *_: calls.append(1)
    )
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    objective = Objective(model, stage)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective(pixel_values, response, valid,
                         generator=torch.Generator().manual_seed(0))
    loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved), len(calls)


@pytest.mark.parametrize("stage", ["ar", "rad"])
def test_gradient_checkpointing_recomputes_layers_with_the_same_loss_and_gradients(
    tokenizer, stage
):
    freeze = vision_frozen(EchoConfig().train, stage)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = make_model(tokenizer)
        set_up_for_training(model, freeze_vision=freeze, gradient_checkpointing=checkpointing)
        results.append(_loss_grads_and_saved_bytes(model, stage))
    (loss, grads, saved, calls), (loss_ckpt, grads_ckpt, saved_ckpt, calls_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    assert any(".visual." in n for n in grads) == (not freeze)  # AR trains the tower
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # EchoDVLM.forward calls the decoder layers itself: they still recompute in the backward
    assert (calls, calls_ckpt) == (1, 2)
    assert saved_ckpt < saved / 2  # activations inside the layers are not kept


def test_a_frozen_vision_tower_is_not_checkpointed_and_a_trained_one_is(tokenizer):
    from transformers.modeling_layers import GradientCheckpointingLayer

    for freeze in (True, False):
        model = make_model(tokenizer)
        set_up_for_training(model, freeze_vision=freeze, gradient_checkpointing=True)
        blocks = [m for m in model.backbone.model.visual.modules()
                  if isinstance(m, GradientCheckpointingLayer)]
        layers = model.backbone.model.language_model.layers
        assert blocks and all(b.gradient_checkpointing is not freeze for b in blocks)
        assert all(layer.gradient_checkpointing for layer in layers)
        assert all(p.requires_grad is not freeze
                   for p in model.backbone.model.visual.parameters())


# ---------------------------------------------------------------------- truncation


def test_collate_flags_usable_rows_whose_report_is_cut():
    max_len = 8  # 7 report tokens + <eos> fit
    model = SimpleNamespace(
        config=SimpleNamespace(image_size=2, max_response_len=max_len), block_length=4,
        eos_token_id=1, pad_token_id=0,
    )
    lengths = [7, 8, 12, 30, 3]
    ok = [True, True, True, False, True]  # the 30-token row is unusable: not counted
    batch = {
        "tokens": np.array([list(range(5, 5 + n)) for n in lengths], dtype=object),
        "ok": np.array(ok),
        "pixels": np.zeros((len(lengths), 4), np.float32),
        "dicom_id": np.array([f"d{i}" for i in range(len(lengths))], dtype=object),
        "error": np.array(["", "", "", "not_dicom", ""], dtype=object),
    }
    out = _Collate(model)(batch)
    assert out["truncated"].tolist() == [False, True, True, False, False]
    # what is flagged is what the padding cut: a row that lost tokens ends at max_len
    kept = out["valid"].sum(1)
    assert kept[1] == kept[2] == max_len and out["response"][2, max_len - 1] == 1
