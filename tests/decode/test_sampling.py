import math

import pytest
import torch
from helpers.tiny_dvlm import make_model, trained_model

from echo_ray.decode.sampler import generate
from echo_ray.diffusion.losses import build_layout

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return trained_model()


@pytest.fixture(scope="module")
def pixel_values(model):
    images = torch.rand(4, 112, 112, generator=torch.Generator().manual_seed(0))
    return model.preprocess_images(images)


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(1)
    return make_model()


def _equal(a, b):
    assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)


def _force(model, monkeypatch, *, eos_at=None, prefer=None, ar=False):
    """Wrap the model's forward: row b's logits predict <eos> at response index eos_at[b];
    `prefer` gets a large bonus everywhere. Position ids tell each logit's response index."""
    forward = model.forward

    def forced(input_ids, *, position_ids, logits_from=0, **kw):
        logits = forward(input_ids, position_ids=position_ids, logits_from=logits_from, **kw)
        index = position_ids[0, 0, logits_from:] - model.response_position_start  # (Q',)
        if ar:
            index = index + 1  # AR: the logit at position t predicts token t + 1
        if prefer is not None:
            logits[..., prefer] += 100.0
        if eos_at is not None:
            for b, e in enumerate(eos_at):
                logits[b, index == e, model.eos_token_id] += 1000.0
        return logits

    monkeypatch.setattr(model, "forward", forced)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("max_new", [5, 8, 13, 21, 48])
def test_one_step_fused_equals_unfused_equals_uncached(model, pixel_values, batch, max_new):
    px = pixel_values[: batch * model.num_patches]
    fused = generate(model, px, steps=1, max_new_tokens=max_new)
    unfused = generate(model, px, steps=1, fused=False, max_new_tokens=max_new)
    reference = generate(model, px, steps=1, use_cache=False, max_new_tokens=max_new)
    _equal(fused, unfused)
    _equal(fused, reference)
    assert fused.tokens.shape[1] <= max_new


def _layout_logits(model, pixel_values, response, layout, offset: int = 0):
    """Logits of one full forward of `layout` over [prompt | response], built independently
    of the sampler (diffusion.build_layout), from response position `offset` on, with the
    ids a decoder never emits banned."""
    valid = torch.ones_like(response, dtype=torch.bool)
    lay = build_layout(model, response, valid, layout)
    with torch.no_grad():
        logits = model(
            lay.input_ids,
            attention_mask=lay.attention_mask,
            position_ids=lay.position_ids,
            image_embeds=model.encode_images(pixel_values),
            logits_from=lay.logits_from + offset,
        )
    logits[..., [model.mask_token_id, model.pad_token_id, model.image_token_id]] = -torch.inf
    return logits


def _layout_argmax(model, pixel_values, response, layout):
    """Greedy picks of `_layout_logits`."""
    return _layout_logits(model, pixel_values, response, layout).argmax(-1)


def test_decoders_match_independent_full_passes(model, pixel_values):
    """One-step block k == argmax of a block-layout pass over [prompt | blocks < k | masks];
    AR == argmax of a causal pass over its own output (teacher forcing)."""
    B = model.block_length
    out = generate(model, pixel_values, steps=1, max_new_tokens=24)
    for k in range(out.tokens.shape[1] // B):
        masks = torch.full_like(out.tokens[:, :B], model.mask_token_id)
        response = torch.cat([out.tokens[:, : k * B], masks], dim=1)
        picks = _layout_argmax(model, pixel_values, response, "block")[:, k * B :]
        live = out.tokens[:, k * B : (k + 1) * B] != model.pad_token_id  # before the eos
        assert torch.equal(picks[live], out.tokens[:, k * B : (k + 1) * B][live])
    # Multi-step, one commit per step: replay each step's state from commit_step; the
    # committed token must be the argmax at the most confident still-masked position.
    multi = generate(model, pixel_values, steps=B, threshold=2.0, max_new_tokens=16)
    checked = 0
    for k in range(multi.tokens.shape[1] // B):
        block = multi.tokens[:, k * B : (k + 1) * B]
        order = multi.commit_step[:, k * B : (k + 1) * B]
        for step in range(B):
            state = torch.where(order < step, block, model.mask_token_id)
            response = torch.cat([multi.tokens[:, : k * B], state], dim=1)
            logits = _layout_logits(model, pixel_values, response, "block", offset=k * B)
            conf, picks = logits.softmax(-1).max(-1)  # (B, Bk)
            conf = conf.masked_fill(order < step, -1.0)
            for b in range(block.shape[0]):
                if (multi.tokens[b, : (k + 1) * B] == model.pad_token_id).any():
                    continue  # ended: tokens after <eos> were replaced by <pad>
                pos = int((order[b] == step).nonzero())
                assert pos == int(conf[b].argmax())
                assert block[b, pos] == picks[b, pos]
                checked += 1
    assert checked >= 2 * B  # at least two whole blocks replayed
    ar = generate(model, pixel_values, mode="ar", max_new_tokens=24)
    picks = _layout_argmax(model, pixel_values, ar.tokens, "causal")[:, :-1]  # (B, N)
    live = ar.tokens != model.pad_token_id
    assert torch.equal(picks[live], ar.tokens[live])


@pytest.mark.parametrize(("steps", "threshold"), [(2, 0.9), (8, 0.9), (4, 2.0)])
@pytest.mark.parametrize("max_new", [21, 48])
def test_multi_step_fused_equals_unfused_equals_uncached(
    model, pixel_values, steps, threshold, max_new
):
    kw = dict(steps=steps, threshold=threshold, max_new_tokens=max_new)
    fused = generate(model, pixel_values, **kw)
    unfused = generate(model, pixel_values, fused=False, **kw)
    reference = generate(model, pixel_values, use_cache=False, **kw)
    _equal(fused, unfused)
    _equal(fused, reference)
    assert torch.equal(fused.commit_step, reference.commit_step)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("max_new", [13, 48])
def test_ar_with_cache_equals_ar_without(model, pixel_values, batch, max_new):
    px = pixel_values[: batch * model.num_patches]
    cached = generate(model, px, mode="ar", max_new_tokens=max_new)
    uncached = generate(model, px, mode="ar", use_cache=False, max_new_tokens=max_new)
    _equal(cached, uncached)
    assert cached.tokens_per_forward == pytest.approx(1.0) or (cached.lengths < max_new).any()


@pytest.mark.parametrize("mode", ["ar", "fused", "unfused"])
def test_a_batch_decodes_each_row_as_if_alone(model, pixel_values, mode):
    kw = {"ar": dict(mode="ar"), "fused": dict(steps=2), "unfused": dict(steps=2, fused=False)}
    together = generate(model, pixel_values, **kw[mode])
    n = model.num_patches
    for b in range(4):
        alone = generate(model, pixel_values[b * n : (b + 1) * n], **kw[mode])
        row = together.tokens[b, : alone.tokens.shape[1]]
        assert torch.equal(row, alone.tokens[0])
        assert (together.tokens[b, alone.tokens.shape[1] :] == model.pad_token_id).all()


def test_forward_counts_are_exact(random_model, pixel_values):
    model = random_model
    px = pixel_values[: 2 * model.num_patches]
    B = model.block_length

    def decode(n, **kw):  # ignore_eos: every sequence runs to max_new_tokens
        return generate(model, px, max_new_tokens=n, ignore_eos=True, **kw)

    for n in (5, 8, 13, 21):  # 5: shorter than a block
        blocks = math.ceil(n / B)
        fused = decode(n, steps=1)
        # one forward per block, block 0's also the prefill ([prompt | masked block 0])
        assert fused.num_forwards == blocks
        assert fused.tokens.shape == (2, n) and (fused.lengths == n).all()
        assert fused.tokens_per_forward == pytest.approx(n / blocks)
        assert fused.prefill_tokens == 2 * min(B, n)  # the prefill forward predicted block 0
        unfused = decode(n, steps=1, fused=False)
        # a prompt write, then a predict and a write per block but the last
        assert unfused.num_forwards == 2 * blocks and unfused.prefill_tokens == 0
        assert decode(n, steps=1, use_cache=False).num_forwards == blocks  # no prefill
        ar = decode(n, mode="ar")
        assert ar.num_forwards == n and ar.tokens_per_forward == 1.0
        assert ar.prefill_tokens == 2  # the first token of each sequence
        assert decode(n, mode="ar", use_cache=False).num_forwards == n
        # threshold never reached: exactly `steps` forwards per block, 2 commits per step.
        multi = decode(n, steps=4, threshold=2.0)
        assert multi.num_forwards == 4 * blocks  # the first step of block 0 is the prefill
        if n >= B:  # block 0 whole: its first step committed 2 per sequence
            assert multi.prefill_tokens == 2 * 2
        assert decode(n, steps=4, threshold=2.0, fused=False).num_forwards == (
            1 + 4 * blocks + blocks - 1
        )
        full = multi.commit_step[:, : n // B * B].reshape(2, -1, B)  # (batch, blocks, B)
        for s in range(4):
            assert ((full == s).sum(-1) == 2).all()


@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="ar"),
        dict(steps=1),
        dict(steps=1, fused=False),
        dict(steps=3),
        dict(steps=1, use_cache=False),
    ],
)
def test_each_sequence_stops_at_its_own_eos(random_model, pixel_values, monkeypatch, kw):
    model = random_model
    px = pixel_values[: 3 * model.num_patches]
    eos_at = [5, 17, 30]
    _force(model, monkeypatch, eos_at=eos_at, ar=kw.get("mode") == "ar")
    out = generate(model, px, max_new_tokens=48, **kw)
    assert out.lengths.tolist() == eos_at
    for b, e in enumerate(eos_at):
        assert out.tokens[b, e] == model.eos_token_id
        assert (out.tokens[b, :e] != model.eos_token_id).all()
        assert (out.tokens[b, e + 1 :] == model.pad_token_id).all()
    B = model.block_length
    if kw.get("mode") == "ar":
        assert out.tokens.shape[1] == 31 and out.num_forwards == 31
    else:  # stops after the block holding the last eos (block 3 of 8 tokens)
        assert out.tokens.shape[1] == 4 * B
        if kw == dict(steps=1):
            assert out.num_forwards == 4
    generated = sum(e + 1 for e in eos_at) / 3  # tokens per sequence, eos included
    assert out.tokens_per_forward == pytest.approx(generated / out.num_forwards)


@pytest.mark.parametrize(
    "kw", [dict(mode="ar"), dict(steps=1), dict(steps=4), dict(steps=1, temperature=1.0)]
)
def test_no_mask_token_survives_decoding(random_model, pixel_values, monkeypatch, kw):
    model = random_model
    _force(model, monkeypatch, prefer=model.mask_token_id)  # the model WANTS <|mask|>
    out = generate(
        model, pixel_values, max_new_tokens=21, generator=torch.Generator().manual_seed(0), **kw
    )
    assert not (out.tokens == model.mask_token_id).any()
    assert not (out.tokens == model.image_token_id).any()
    real = torch.arange(out.tokens.shape[1]) <= out.lengths[:, None]
    assert not (out.tokens[real] == model.pad_token_id).any()


def test_temperature_sampling_is_seeded_and_fused_equals_unfused(model, pixel_values):
    def run(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        return generate(model, pixel_values, steps=2, temperature=1.0, generator=gen, **kw)

    a, b = run(0), run(0, fused=False)
    _equal(a, b)
    _equal(a, run(0, use_cache=False))
    assert not torch.equal(a.tokens, run(1).tokens)
    greedy = generate(model, pixel_values, steps=2)
    assert not torch.equal(a.tokens, greedy.tokens)


def test_recorded_distributions_are_the_committed_ones(model, pixel_values):
    out = generate(model, pixel_values, steps=1, record_top_k=5)
    assert out.top_k_ids.shape == (*out.tokens.shape, 5)
    real = (
        torch.arange(out.tokens.shape[1]) <= out.lengths.clamp(max=out.tokens.shape[1] - 1)[:, None]
    )
    assert torch.equal(out.top_k_ids[..., 0][real], out.tokens[real])  # greedy = top-1
    probs = out.top_k_probs
    assert (probs[..., :-1] >= probs[..., 1:]).all() and (probs.sum(-1) <= 1 + 1e-5).all()
    assert (out.commit_step == 0).all()  # one step: everything at step 0
    multi = generate(model, pixel_values, steps=4, threshold=2.0, record_top_k=3)
    assert set(multi.commit_step.unique().tolist()) == {0, 1, 2, 3}


def test_generate_rejects_bad_flags(model, pixel_values):
    for kw, message in [
        (dict(mode="beam"), "unknown mode 'beam'"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate(model, pixel_values, **kw)


@pytest.mark.parametrize("mode", ["ar", "multi-step", "one-step-fused"])
def test_on_block_streams_the_final_tokens_block_by_block(mode):
    from echo_ray.decode.modes import decoding_kwargs

    model = trained_model()
    size = model.config.image_size
    images = torch.rand(2, size, size, generator=torch.Generator().manual_seed(3))
    pixel_values = model.preprocess_images(images)
    seen = []
    kwargs = decoding_kwargs(mode, block_length=model.block_length)
    out = generate(model, pixel_values, max_new_tokens=24,
                   on_block=lambda t: seen.append(t.clone()), **kwargs)
    plain = generate(model, pixel_values, max_new_tokens=24, **kwargs)
    assert torch.equal(out.tokens, plain.tokens)  # streaming changes nothing
    Bk = model.block_length
    assert seen and all(s.shape[1] % Bk == 0 or s.shape[1] == out.tokens.shape[1] for s in seen)
    assert [s.shape[1] for s in seen] == sorted({s.shape[1] for s in seen})  # growing prefixes
    for s in seen:  # each streamed prefix is final: the output starts with it
        n = min(s.shape[1], out.tokens.shape[1])
        for b in range(2):
            length = int(out.lengths[b])
            assert torch.equal(s[b, : min(n, length)], out.tokens[b, : min(n, length)])
    assert torch.equal(seen[-1][:, : out.tokens.shape[1]].masked_fill(
        out.tokens == model.pad_token_id, model.pad_token_id), out.tokens)


# ------------------------------------------------------------------ commit confidence


@pytest.mark.parametrize("kw", [
    {"mode": "ar"}, {"steps": 1}, {"steps": 1, "fused": False}, {"steps": 4},
    {"steps": 4, "use_cache": False},
])
def test_recording_confidence_changes_no_token(model, pixel_values, kw):
    plain = generate(model, pixel_values, **kw)
    recorded = generate(model, pixel_values, record_confidence=True, **kw)
    _equal(plain, recorded)
    assert plain.confidence is None
    conf = recorded.confidence
    assert conf.shape == recorded.tokens.shape
    assert bool(((conf > 0) & (conf <= 1)).all())
    after_eos = recorded.tokens == model.pad_token_id
    assert bool((conf[after_eos] == 1).all())


@pytest.mark.parametrize("steps", [1, 4])
def test_confidence_is_the_committed_tokens_probability(model, pixel_values, steps):
    """Two code paths agree: the log-sum-exp confidence and the recorded top-1 of the
    softmax at commit time (greedy commits the top-1 token)."""
    recorded = generate(model, pixel_values, steps=steps, record_confidence=True)
    top = generate(model, pixel_values, steps=steps, record_top_k=1)
    _equal(recorded, top)
    valid = recorded.tokens != model.pad_token_id
    torch.testing.assert_close(recorded.confidence[valid], top.top_k_probs[..., 0][valid],
                               rtol=1e-4, atol=1e-6)


def test_ar_confidence_is_the_likelihood_of_the_greedy_report(model, pixel_values):
    """AR: the product of the tokens' confidences is the report's likelihood, as the
    teacher-forced scorer computes it over the ids a decoder may write (the decoder's
    distribution excludes `model.banned_token_ids`)."""
    from echo_ray.diffusion.losses import _ar_logits, _ar_token_ce, ar_report_nll

    out = generate(model, pixel_values, mode="ar", record_confidence=True)
    n = out.tokens.shape[1]
    ends = torch.clamp(out.lengths + 1, max=n)  # tokens up to and including <eos>
    valid = torch.arange(n)[None] < ends[:, None]
    full, count = ar_report_nll(model, pixel_values, out.tokens, valid)
    assert count.tolist() == ends.tolist()
    with torch.no_grad():
        logits, response, valid = _ar_logits(model, pixel_values, out.tokens, valid)
        logits = logits.index_fill(-1, model.banned_token_ids, float("-inf"))  # (B, L, V)
        ce, scored = _ar_token_ce(logits, response, valid, model.eos_token_id)
    assert scored.sum(1).tolist() == ends.tolist()
    mine = -(out.confidence.log() * valid).sum(1)
    torch.testing.assert_close(mine, ce.sum(1).float(), rtol=1e-4, atol=1e-4)
    assert (mine <= full.float() + 1e-4).all()  # renormalised over fewer ids: more likely
