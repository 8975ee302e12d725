"""DCD (DESIGN.md section 4): the loss by hand, through the model, on real teacher rollouts."""

import math

import pytest
import torch
from helpers.tiny_dvlm import make_batch, make_model, trained_model

from echo_ray.decode.sampler import generate
from echo_ray.diffusion.losses import (
    DCD_STEP_WEIGHTINGS,
    build_layout,
    collate_trajectories,
    compute_dcd_loss,
    dcd_loss,
    is_degenerate,
    noise_response,
    pad_responses,
    trajectory_records,
)

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


# ---------------------------------------------------------------------- teacher rollouts


@pytest.fixture(scope="module")
def teacher():
    return trained_model()


@pytest.fixture(scope="module")
def pixel_values(teacher):
    images = torch.rand(4, 112, 112, generator=torch.Generator().manual_seed(0))
    return teacher.preprocess_images(images)


@pytest.fixture(scope="module")
def rollout(teacher, pixel_values):
    steps = teacher.block_length
    return generate(teacher, pixel_values, steps=steps, threshold=0.9, record_top_k=4)


def test_trajectory_records_are_consistent_with_the_rollout(teacher, rollout):
    Bk, eos = teacher.block_length, teacher.eos_token_id
    records = trajectory_records(rollout, eos)
    assert len(records) == 4
    for b, rec in enumerate(records):
        n = int(rollout.lengths[b])
        kept = n + int(rec["ended"])
        assert rec["tokens"] == rollout.tokens[b, :n].tolist() and eos not in rec["tokens"]
        assert rec["ended"] == (eos in rollout.tokens[b].tolist())
        assert len(rec["commit_step"]) == len(rec["top_ids"]) == len(rec["mass"]) == kept
        # Committed once, within the block's steps; never a mask token.
        assert all(0 <= s < Bk for s in rec["commit_step"])
        assert teacher.mask_token_id not in rec["tokens"]
        # Each step of a block commits >= 1 position until the block is done: the steps
        # used in a (fully decoded) block are exactly 0 .. last.
        cs = rollout.commit_step[b]
        for lo in range(0, rollout.tokens.shape[1] - Bk + 1, Bk):
            used = cs[lo : lo + Bk].tolist()
            assert sorted(set(used)) == list(range(max(used) + 1)), used
        for i in range(kept):
            p = rec["top_probs"][i]
            assert all(0.0 <= x <= 1.0 for x in p) and sum(p) <= 1 + 1e-5
            assert list(p) == sorted(p, reverse=True) and len(set(rec["top_ids"][i])) == 4
            assert rec["mass"][i] == pytest.approx(sum(p), abs=1e-6)
            # Greedy: the committed token is the top-1 of its recorded distribution.
            token = rec["tokens"][i] if i < n else eos
            assert rec["top_ids"][i][0] == token
    # The tiny teacher really takes several steps per block at tau 0.9.
    assert rollout.commit_step.max() > 0


def test_collated_trajectories_feed_compute_dcd_loss(teacher, rollout, pixel_values):
    records = trajectory_records(rollout, teacher.eos_token_id)
    kw = dict(
        block_length=teacher.block_length,
        max_len=teacher.config.max_response_len,
        eos_token_id=teacher.eos_token_id,
        pad_token_id=teacher.pad_token_id,
    )
    response, valid, steps, ids, probs = collate_trajectories(records, **kw)
    want_r, want_v = pad_responses([r["tokens"] for r in records], **kw)
    assert torch.equal(response, want_r) and torch.equal(valid, want_v)
    B, L = response.shape
    assert steps.shape == (B, L) and steps.dtype == torch.long
    assert ids.shape == (B, L, 4) and ids.dtype == torch.long and probs.dtype == torch.float32
    for b, rec in enumerate(records):
        n = min(len(rec["tokens"]), kw["max_len"] - 1)  # report positions that are scored
        assert steps[b, :n].tolist() == rec["commit_step"][:n]
        assert ids[b, :n].tolist() == rec["top_ids"][:n]
        assert torch.allclose(probs[b, :n], torch.tensor(rec["top_probs"][:n]))
    with torch.no_grad():
        loss, parts = compute_dcd_loss(teacher, pixel_values, response, valid, steps, ids, probs)
    assert torch.isfinite(loss) and parts["kl"] > 0
    assert parts["kl_positions"] + parts["eos_positions"] == valid.sum()
    with pytest.raises(ValueError, match="different top-k sizes"):
        bad = dict(records[0], top_ids=[[1, 2]] * len(records[0]["top_ids"]))
        collate_trajectories([records[0], bad], **kw)
    with pytest.raises(ValueError, match="record_top_k"):
        plain = generate(teacher, pixel_values[: teacher.num_patches], steps=1, max_new_tokens=8)
        trajectory_records(plain, teacher.eos_token_id)


def test_a_few_dcd_steps_distil_the_teacher_rollouts(teacher, rollout, pixel_values):
    records = trajectory_records(rollout, teacher.eos_token_id)
    batch = collate_trajectories(
        records,
        block_length=teacher.block_length,
        max_len=teacher.config.max_response_len,
        eos_token_id=teacher.eos_token_id,
        pad_token_id=teacher.pad_token_id,
    )

    def train(student, opt, num_steps, **kw):
        """DCD steps on the fixed batch; the (loss, parts) before each step and after all."""
        seen = []
        for _ in range(num_steps):
            loss, parts = compute_dcd_loss(student, pixel_values, *batch, **kw)
            seen.append((loss.item(), {k: v.item() for k, v in parts.items()}))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            loss, parts = compute_dcd_loss(student, pixel_values, *batch, **kw)
        return seen + [(loss.item(), {k: v.item() for k, v in parts.items()})]

    # The full objective from the teacher's weights: the loss (mostly the eos term: the
    # teacher never learnt to fill a block with <eos>) falls well below half.
    torch.manual_seed(0)
    student = trained_model()  # initialised from the teacher
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    seen = train(student, opt, 25)
    (before, parts_before), (after, parts_after) = seen[0], seen[-1]
    assert after < 0.5 * before, (before, after)
    assert parts_after["eos_ce"] < 0.1 * parts_before["eos_ce"]
    # The KL alone, by plain gradient descent: the student's one-step distributions move
    # towards the teacher's multi-step ones at every step (the start is already close: the
    # one-step and multi-step conditions differ only by the block's earlier commits). The
    # step must be small enough for plain descent to be monotone: at lr 0.03 the first step
    # overshot for some (equally good) teachers, i.e. it depended on float rounding.
    torch.manual_seed(0)
    student = trained_model()
    student.train()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01)
    kls = [parts["kl"] for _, parts in train(student, opt, 5, eos_weight=0.0)]
    assert kls[0] > 0 and all(b < a for a, b in zip(kls, kls[1:])), kls


# ---------------------------------------------------------------------- degenerate rollouts


@pytest.mark.parametrize(
    ("text", "loop"),
    [
        ("a b c a b c a b c", True),
        ("the heart is normal . no no no effusion", True),  # 1-gram x 3
        ("x y a b a b a b z", True),  # 2-gram x 3 in the middle
        ("a b c d a b c d a b c d", True),  # 4-gram x 3
        ("the heart size is normal . no pleural effusion . the lungs are clear .", False),
        ("a b a b", False),  # only twice
        ("a b c d e a b c d e a b c d e", False),  # a 5-gram: longer than max_ngram
        ("a b c a b c a b", False),  # the third copy is cut short
        ("", False),
    ],
)
def test_is_degenerate(text, loop):
    vocab = {}
    tokens = [vocab.setdefault(w, len(vocab)) for w in text.split()]
    assert is_degenerate(tokens) is loop


def test_is_degenerate_parameters():
    assert is_degenerate([1, 2, 3, 4, 5] * 3, max_ngram=5)
    assert is_degenerate([7, 7], min_repeats=2) and not is_degenerate([7, 8, 7], min_repeats=2)
    with pytest.raises(ValueError, match="min_repeats >= 2"):
        is_degenerate([1], min_repeats=1)
