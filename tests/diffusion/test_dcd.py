"""DCD (docs/ARCHITECTURE.md section 4.6): the loss by hand and through the model; on teacher
rollouts in tests/distill/test_records.py."""

import math

import pytest
import torch
from helpers.tiny_dvlm import make_batch, make_model

from echo_ray.config.schema import DCD_STEP_WEIGHTINGS
from echo_ray.diffusion.dcd import compute_dcd_loss, dcd_loss
from echo_ray.diffusion.losses import build_layout
from echo_ray.diffusion.noise import noise_response, pad_responses

pytestmark = pytest.mark.usefixtures("single_thread")

EOS, PAD = 1, 0
BLOCK = 4


def _call(logits, response, valid=None, steps=None, ids=None, probs=None, **kw):
    B, L, _ = logits.shape
    K = 1 if ids is None else ids.shape[-1]
    valid = torch.ones(B, L, dtype=torch.bool) if valid is None else valid
    steps = torch.zeros(B, L, dtype=torch.long) if steps is None else steps
    ids = torch.zeros(B, L, K, dtype=torch.long) if ids is None else ids
    probs = torch.zeros(B, L, K) if probs is None else probs
    return dcd_loss(
        logits, response, valid, steps, ids, probs, eos_token_id=EOS, block_length=BLOCK, **kw
    )


def _one_kl_position(student_probs, rec_ids, rec_probs, step=0, **kw):
    """A row [x, <eos>, <eos>, <eos>]: position 0 is the only KL position."""
    V = len(student_probs)
    logits = torch.zeros(1, BLOCK, V)
    logits[0, 0] = torch.tensor(student_probs).log()
    response = torch.tensor([[5, EOS, EOS, EOS]])
    ids = torch.zeros(1, BLOCK, len(rec_ids), dtype=torch.long)
    ids[0, 0] = torch.tensor(rec_ids)
    probs = torch.zeros(1, BLOCK, len(rec_ids))
    probs[0, 0] = torch.tensor(rec_probs)
    steps = torch.tensor([[step, 0, 0, 0]])
    return _call(logits, response, steps=steps, ids=ids, probs=probs, **kw)


# ---------------------------------------------------------------------- the KL term by hand


def test_kl_is_zero_when_the_student_matches_the_records_and_positive_otherwise():
    q = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])  # full teacher distribution
    top = q.topk(3)  # ids 1, 3, 4 with 0.4, 0.25, 0.15 (mass 0.8)
    # The student puts all its mass on the recorded ids, in the teacher's proportions.
    matched = torch.tensor([0.0, 0.5, 0.0, 0.3125, 0.1875, 0.0]).clamp(min=1e-12)
    _, parts = _one_kl_position(matched.tolist(), top.indices.tolist(), top.values.tolist())
    assert parts["kl_positions"] == 1 and abs(parts["kl"].item()) < 1e-6
    # The teacher's full distribution keeps 0.2 off the recorded ids: KL = -log 0.8.
    _, parts = _one_kl_position(q.tolist(), top.indices.tolist(), top.values.tolist())
    assert parts["kl"].item() == pytest.approx(-math.log(0.8), abs=1e-6)
    # Mass moved between recorded ids or off them: positive.
    for moved in ([0.0, 0.3125, 0.0, 0.5, 0.1875, 0.0], [0.2, 0.4, 0.0, 0.25, 0.15, 0.0]):
        moved = torch.tensor(moved).clamp(min=1e-12).tolist()
        _, parts = _one_kl_position(moved, top.indices.tolist(), top.values.tolist())
        assert parts["kl"].item() > 1e-3


def test_kl_matches_a_hand_computation_with_renormalized_records():
    # Teacher: ids 2, 0, 4 with 0.5, 0.3, 0.1 (mass 0.9) -> 5/9, 3/9, 1/9. Student over 5
    # ids: 0.2, 0.1, 0.4, 0.2, 0.1 -> on the records 0.4, 0.2, 0.1.
    _, parts = _one_kl_position([0.2, 0.1, 0.4, 0.2, 0.1], [2, 0, 4], [0.5, 0.3, 0.1])
    want = (
        5 / 9 * math.log((5 / 9) / 0.4)
        + 3 / 9 * math.log((3 / 9) / 0.2)
        + 1 / 9 * math.log((1 / 9) / 0.1)
    )
    assert parts["kl"].item() == pytest.approx(want, abs=1e-6)
    # A zero teacher probability contributes nothing (0 log 0 = 0): only the two live ids.
    _, parts = _one_kl_position([0.2, 0.1, 0.4, 0.2, 0.1], [2, 0, 4], [0.75, 0.25, 0.0])
    want = 0.75 * math.log(0.75 / 0.4) + 0.25 * math.log(0.25 / 0.2)
    assert parts["kl"].item() == pytest.approx(want, abs=1e-6)


def test_step_weighting_linear_and_uniform():
    rec_ids, rec_probs = [2, 0, 4], [0.5, 0.3, 0.1]
    s0, s3 = [0.2, 0.1, 0.4, 0.2, 0.1], [0.5, 0.1, 0.1, 0.2, 0.1]
    kl0 = _one_kl_position(s0, rec_ids, rec_probs)[1]["kl"].item()
    kl3 = _one_kl_position(s3, rec_ids, rec_probs)[1]["kl"].item()
    assert kl0 > 0 and kl3 > 0 and abs(kl0 - kl3) > 1e-2
    # One row [x, y, <eos>, <eos>]: x committed at step 0, y at step 3.
    logits = torch.zeros(1, BLOCK, 5)
    logits[0, 0], logits[0, 1] = torch.tensor(s0).log(), torch.tensor(s3).log()
    ids = torch.tensor(rec_ids).expand(1, BLOCK, 3).clone()
    probs = torch.tensor(rec_probs).expand(1, BLOCK, 3).clone()
    response = torch.tensor([[5, 6, EOS, EOS]])
    steps = torch.tensor([[0, 3, 7, 7]])
    kw = dict(steps=steps, ids=ids, probs=probs, eos_weight=0.0)
    linear, parts = _call(logits, response, step_weighting="linear", **kw)
    uniform, _ = _call(logits, response, step_weighting="uniform", **kw)
    assert parts["kl_positions"] == 2 and parts["eos_positions"] == 2
    assert linear.item() == pytest.approx((1 * kl0 + 4 * kl3) / 5, abs=1e-6)
    assert uniform.item() == pytest.approx((kl0 + kl3) / 2, abs=1e-6)
    assert DCD_STEP_WEIGHTINGS == ("linear", "uniform")
    with pytest.raises(ValueError, match="unknown step_weighting 'exp'"):
        _call(logits, response, step_weighting="exp", **kw)
    with pytest.raises(ValueError, match="commit_step is negative"):
        _call(logits, response, **{**kw, "steps": torch.tensor([[-1, 3, 0, 0]])})


def test_hard_target_is_the_committed_tokens_cross_entropy():
    """target="hard": the teacher is one-hot on the token it committed, whatever its records
    say, so the KL is -log q(token); the step weighting still applies."""
    student = [0.2, 0.1, 0.4, 0.2, 0.1, 0.0]  # id 5 (the response token) gets 1e-12
    student[5] = 0.25
    student = (torch.tensor(student) / sum(student)).tolist()
    _, parts = _one_kl_position(student, [2, 0, 4], [0.5, 0.3, 0.1], target="hard")
    assert parts["kl"].item() == pytest.approx(-math.log(student[5]), abs=1e-6)
    soft = _one_kl_position(student, [2, 0, 4], [0.5, 0.3, 0.1])[1]["kl"].item()
    assert abs(soft - parts["kl"].item()) > 0.1
    # garbage records are never read
    _, parts = _one_kl_position(student, [99, -3, 7], [float("nan")] * 3, target="hard")
    assert parts["kl"].item() == pytest.approx(-math.log(student[5]), abs=1e-6)
    with pytest.raises(ValueError, match="unknown target 'argmax'"):
        _one_kl_position(student, [2, 0, 4], [0.5, 0.3, 0.1], target="argmax")


# ---------------------------------------------------------------------- the eos term


def _eos_batch():
    """Row 0: 5 report tokens, <eos> at 5, fill to 8. Row 1: 1 token, <eos> at 1, fill to 4,
    pads after. eos positions: (0, 5..7) and (1, 1..3); KL positions (0, 0..4) and (1, 0)."""
    response, valid = pad_responses(
        [[5, 6, 7, 8, 9], [5]], block_length=BLOCK, max_len=16, eos_token_id=EOS, pad_token_id=PAD
    )
    logits = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(0))
    return logits, response, valid


def test_eos_term_is_the_mean_eos_ce_over_the_tail_only():
    logits, response, valid = _eos_batch()
    assert response.tolist() == [[5, 6, 7, 8, 9, EOS, EOS, EOS], [5, EOS, EOS, EOS] + [PAD] * 4]
    loss, parts = _call(logits, response, valid)
    tail = [(0, 5), (0, 6), (0, 7), (1, 1), (1, 2), (1, 3)]
    want = sum(-torch.log_softmax(logits[b, i], -1)[EOS].item() for b, i in tail) / 6
    assert parts["eos_positions"] == 6 and parts["kl_positions"] == 6
    assert parts["eos_ce"].item() == pytest.approx(want, rel=1e-6)
    # All-zero records (ids 0 with probability 0) give no KL target: the loss is the eos term.
    assert parts["kl"].item() == 0.0
    assert loss.item() == pytest.approx(parts["kl"].item() + want, rel=1e-6)

    # Pad positions count for nothing; KL positions do not move the eos term.
    changed = logits.clone()
    changed[1, 4:] = 50 * torch.randn(4, 12)
    assert torch.equal(_call(changed, response, valid)[0], loss)
    changed[0, :5] += 3 * torch.randn(5, 12)
    assert _call(changed, response, valid)[1]["eos_ce"] == parts["eos_ce"]

    # A higher <eos> logit at a tail position lowers it; eos_weight scales it.
    higher = logits.clone()
    higher[0, 6, EOS] += 2.0
    assert _call(higher, response, valid)[1]["eos_ce"] < parts["eos_ce"]
    for lam in (0.0, 0.5, 3.0):
        scaled, _ = _call(logits, response, valid, eos_weight=lam)
        assert scaled.item() == pytest.approx(parts["kl"].item() + lam * want, rel=1e-6)


def test_empty_sets_and_garbage_records_give_finite_losses_and_gradients():
    # Only <eos> (an empty report): no KL position.
    logits = torch.randn(1, BLOCK, 12, requires_grad=True)
    loss, parts = _call(logits, torch.full((1, BLOCK), EOS))
    assert parts["kl_positions"] == 0 and parts["kl"].item() == 0.0 and torch.isfinite(loss)
    # No <eos> at all: no eos position.
    loss, parts = _call(logits, torch.full((1, BLOCK), 5))
    assert parts["eos_positions"] == 0 and parts["eos_ce"].item() == 0.0 and torch.isfinite(loss)
    # Records are read only at KL positions: NaN probs, out-of-range ids and negative steps
    # anywhere else change nothing, gradients included.
    logits, response, valid = _eos_batch()
    logits.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 12, (2, 8, 3), generator=g)
    probs = torch.rand(2, 8, 3, generator=g) / 3
    steps = torch.randint(0, BLOCK, (2, 8), generator=g)
    clean, _ = _call(logits, response, valid, steps, ids, probs)
    (grad_clean,) = torch.autograd.grad(clean, logits)
    bad = ~(valid & (torch.arange(8) < torch.tensor([[5], [1]])))  # not a KL position
    ids[bad], probs[bad], steps[bad] = 10**6, float("nan"), -5
    dirty, _ = _call(logits, response, valid, steps, ids, probs)
    (grad_dirty,) = torch.autograd.grad(dirty, logits)
    assert torch.equal(clean, dirty) and torch.equal(grad_clean, grad_dirty)


# ---------------------------------------------------------------------- through the model


def _fake_records(response, valid, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = response.shape
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * L)]).view(B, L, K)
    probs = torch.softmax(torch.randn(B, L, K, generator=g), -1) * 0.9
    steps = torch.randint(0, 8, (B, L), generator=g)
    return steps, ids, probs


def test_compute_dcd_loss_masks_the_whole_noisy_copy_and_trains_the_text_model(monkeypatch):
    torch.manual_seed(0)
    model = make_model()
    pixel_values, response, valid = make_batch(model, num=3)
    steps, ids, probs = _fake_records(response, valid, K=4, V=model.vocab_size)
    seen = {}
    forward = model.forward

    def spy(input_ids, **kw):
        seen["ids"], seen["from"] = input_ids.clone(), kw["logits_from"]
        return forward(input_ids, **kw)

    monkeypatch.setattr(model, "forward", spy)
    model.train()
    loss, parts = compute_dcd_loss(model, pixel_values, response, valid, steps, ids, probs)
    L = response.shape[1]
    noisy = seen["ids"][:, seen["from"] :]  # (B, L)
    clean = seen["ids"][:, seen["from"] - L : seen["from"]]  # (B, L)
    assert noisy.shape == response.shape and torch.equal(clean, response)
    assert torch.equal(noisy[valid], torch.full_like(noisy[valid], model.mask_token_id))
    assert torch.equal(noisy[~valid], response[~valid]) and (~valid).any()  # pads stay pads
    full = noise_response(response, valid, BLOCK, model.mask_token_id, mask_ratio=1.0)
    assert torch.equal(noisy, full.noisy)  # what noise_response gives at ratio 1
    lay = build_layout(model, response, valid, "rad", noisy=noisy)
    assert torch.equal(seen["ids"], lay.input_ids) and seen["from"] == lay.logits_from

    assert torch.isfinite(loss) and loss.item() > 0
    assert parts["kl_positions"] == int((response != model.eos_token_id).logical_and(valid).sum())
    loss.backward()
    text = dict(model.named_parameters())
    for name in (
        "backbone.model.language_model.embed_tokens.weight",
        "backbone.model.language_model.layers.0.self_attn.q_proj.weight",
    ):
        grad = text[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_compute_dcd_loss_with_flex_attention_equals_dense():
    """attention="flex" (the RAD layout's BlockMask, eager flex on CPU, forward only) gives
    the dense mask's loss and parts."""
    torch.manual_seed(0)
    model = make_model()
    pixel_values, response, valid = make_batch(model, num=3)
    assert (~valid).any()
    steps, ids, probs = _fake_records(response, valid, K=4, V=model.vocab_size)
    with torch.no_grad():
        dense, dense_parts = compute_dcd_loss(
            model, pixel_values, response, valid, steps, ids, probs
        )
        flex, flex_parts = compute_dcd_loss(
            model, pixel_values, response, valid, steps, ids, probs, attention="flex"
        )
    assert dense.item() > 0
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    for key, value in dense_parts.items():
        torch.testing.assert_close(flex_parts[key], value, atol=1e-5, rtol=1e-5)
