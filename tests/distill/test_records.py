"""DCD trajectory records on real teacher rollouts (docs/ARCHITECTURE.md section 4.5): records,
their collation into `dcd_loss` tensors, a few DCD steps on them, and the repetition-loop
filter."""

import pytest
import torch
from helpers.tiny_dvlm import trained_model

from echo_ray.decode.sampler import generate
from echo_ray.diffusion.dcd import compute_dcd_loss
from echo_ray.diffusion.noise import pad_responses
from echo_ray.distill.records import collate_trajectories, is_degenerate, trajectory_records

pytestmark = pytest.mark.usefixtures("single_thread")


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
