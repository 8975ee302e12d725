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
    label_loss,
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
    assert [vision_frozen(tiny, s) for s in ("vision", "ar", "rad", "dcd")] == [
        False, False, True, True]
    unfrozen = apply_overrides(EchoConfig.from_name("tiny"), ["train.freeze_vision=false"])
    assert not vision_frozen(unfrozen.train, "rad") and not vision_frozen(unfrozen.train, "dcd")
    base = EchoConfig.from_name("base-7b").train  # the preset freezes it, AR included
    assert base.freeze_vision is True and vision_frozen(base, "ar")
    assert not vision_frozen(base, "vision")  # the vision stage trains nothing else


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


# ---------------------------------------------------------------------- vision stage


def test_label_loss_scores_positives_and_negatives_and_leaves_uncertain_out():
    nan = float("nan")
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    labels = torch.tensor([[1.0, 0.0, nan, -1.0]])  # positive, negative, unmentioned, uncertain
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[0, :3], torch.tensor([1.0, 0.0, 0.0])
    )
    assert label_loss(logits, labels) == pytest.approx(float(expected))
    # the uncertain label's logit gets no gradient; the others do
    logits.requires_grad_(True)
    label_loss(logits, labels).backward()
    assert logits.grad[0, 3] == 0 and (logits.grad[0, :3] != 0).all()
    nothing = torch.full((1, 4), -1.0)  # all uncertain: a zero loss, not NaN
    assert label_loss(logits, nothing).item() == 0.0


def test_the_vision_stage_trains_the_tower_and_its_head_only(tokenizer):
    model = make_model(tokenizer)
    set_up_for_training(model, freeze_vision=vision_frozen(EchoConfig().train, "vision"),
                        gradient_checkpointing=False, freeze_language=True)
    objective = Objective(model, "vision", num_labels=14)
    images = torch.rand(2, model.config.image_size, model.config.image_size)
    labels = torch.tensor([[1.0] + [0.0] * 13, [float("nan")] * 13 + [1.0]])
    loss = objective(model.preprocess_images(images), None, None, labels=labels)
    loss.backward()
    trained = {n for n, p in objective.named_parameters() if p.grad is not None}
    assert any(n.startswith("label_head.") for n in trained)
    assert any(".visual." in n for n in trained)
    assert all(n.startswith("label_head.") or ".visual." in n for n in trained)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".visual." not in n)


def test_collate_hands_the_labels_of_the_vision_stage_through():
    model = SimpleNamespace(
        config=SimpleNamespace(image_size=2, max_response_len=8), block_length=4,
        eos_token_id=1, pad_token_id=0,
    )
    labels = np.array([[1.0, np.nan, -1.0], [0.0, 1.0, np.nan]], np.float32)
    batch = {
        "tokens": np.array([[5, 6], [7]], dtype=object),
        "ok": np.array([True, True]),
        "pixels": np.zeros((2, 4), np.float32),
        "labels": np.array(list(labels), dtype=object),
        "dicom_id": np.array(["a", "b"], dtype=object),
        "error": np.array(["", ""], dtype=object),
    }
    out = _Collate(model)(batch)
    assert out["labels"].shape == (2, 3)
    assert torch.equal(out["labels"].isnan(), torch.from_numpy(np.isnan(labels)))
    assert out["labels"][0, 0] == 1 and out["labels"][0, 2] == -1
