"""One decoder for every mode, chosen by flags (not copies of `generate`).

- `mode="ar"`: next-token decoding, KV-cached (the speed baseline).
- `mode="diffusion"`: block diffusion over blocks of `block_length` response tokens. Per
  block, up to `steps` forwards; each commits every still-masked position whose confidence
  is >= `threshold`, and at least enough (highest confidence first, at least one) to finish
  the block within `steps`. `steps=1` is one-step decoding (all positions in one forward).
- `fused=True` (diffusion + cache): the first forward of block k takes `[final block k-1 |
  masked block k]` (2 x block_length tokens), keeps only block k-1's KV (block k's was
  computed from mask tokens) and predicts block k: one forward per block at one step,
  instead of a predict forward plus a forward that writes the final block's KV. Block 0's
  is the prefill, `[prompt | masked block 0]`: the prompt's KV is written by the forward
  that predicts block 0, so one-step fused costs exactly ceil(L / block_length) forwards,
  a block of tokens each. Unfused, every KV write is a forward of its own, the prompt's
  included: 2 ceil(L / block_length) (the last block's KV is never written).
- `use_cache=False`: every forward recomputes the whole sequence (prompt included) with
  the same mask: the reference the cached paths must reproduce.

Every forward gets an explicit 4D mask sliced from ONE precomputed mask of the whole
sequence (`diffusion.attention_mask`, "causal" or "block"): rows = the forward's tokens,
columns = everything cached so far plus them. A cached forward over a block without an
explicit mask would be causal inside the block, silently (docs/ARCHITECTURE.md section 5.9).

Batched: every prompt has the same length, so the batch advances in lockstep; each
sequence stops at its own `<eos>` (the tokens after it become `<pad>`) and decoding stops
when every sequence has one, or at `max_new_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from echo_ray.config.schema import DecodingConfig
from echo_ray.diffusion.masks import attention_mask
from echo_ray.model.dvlm import EchoDVLM

MODES = ("ar", "diffusion")


@dataclass
class GenerateOutput:
    """What `generate` returns.

    Attributes:
        tokens: `(B, N)` generated ids, N <= max_new_tokens; `<pad>` after the first `<eos>`.
        lengths: `(B,)` report tokens before the first `<eos>` (N when there is none).
        num_forwards: model forwards, the prefill included (the batch shares them).
        tokens_per_forward: generated tokens (up to and including `<eos>`) per forward,
            averaged over the batch; exactly 1 for AR.
        commit_step: `(B, N)` diffusion only: the step (0-based, within its block) at which
            each token was committed.
        top_k_ids, top_k_probs: `(B, N, k)` diffusion with `record_top_k=k`: the decoder's
            distribution at each position when it was committed.
        confidence: `(B, N)` with `record_confidence`: the probability the decoder gave each
            token when it committed it (its own confidence; 1.0 after `<eos>`).
        prefill_seconds: wall time before the decode loop: the vision tower, and the prompt
            forward (every mode but uncached diffusion, whose forwards all redo the prompt).
            The prompt forward yields the first token (AR) or block (fused diffusion), as
            a time to first token does; unfused diffusion's writes the prompt's KV only.
        prefill_tokens: tokens (over the batch) the prompt forward committed: one per
            sequence (AR), block 0's first-step commits (fused diffusion), none otherwise.
            Per-token decode speed is `(generated - prefill_tokens) / (total - prefill)`.
        total_seconds: wall time of the whole call.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    num_forwards: int
    tokens_per_forward: float
    commit_step: torch.Tensor | None = None
    top_k_ids: torch.Tensor | None = None
    top_k_probs: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    total_seconds: float = 0.0


class _Runner:
    """Runs model forwards over absolute sequence ranges, with or without a KV cache."""

    def __init__(self, model: EchoDVLM, image_embeds: torch.Tensor, layout: str, length: int):
        self.model = model
        self.image_embeds = image_embeds
        P = model.prompt_length
        self.P = P
        self.mask = attention_mask(P, length, model.block_length, layout).to(model.device)
        self.positions = torch.cat(
            [model.prompt_position_ids, model.response_position_ids(length)], dim=2
        )  # (3, 1, P + length)
        cos, sin = model.rotary_embeddings(self.positions)  # (1, P + length, head_dim) each
        self.cos, self.sin = cos, sin
        self.num_forwards = 0

    def __call__(self, ids, start, cache=None, logits_from=0) -> torch.Tensor:
        """Forward `ids` `(B, Q)`, the tokens at absolute positions `start .. start+Q-1`,
        on top of `cache` (which must hold exactly positions `0 .. start-1`)."""
        end = start + ids.shape[1]
        self.num_forwards += 1
        return self.model(
            ids,
            attention_mask=self.mask[:, :, start:end, :end],  # (1, 1, Q, end)
            position_ids=self.positions[:, :, start:end],  # (3, 1, Q)
            image_embeds=self.image_embeds if start == 0 else None,
            past_key_values=cache,
            logits_from=logits_from,
            position_embeddings=(self.cos[:, start:end], self.sin[:, start:end]),
        )  # (B, Q - logits_from, V)


@torch.no_grad()
def generate(
    model: EchoDVLM,
    pixel_values: torch.Tensor,
    *,
    mode: str = "diffusion",
    steps: int = 1,
    threshold: float = DecodingConfig.threshold,
    fused: bool = True,
    use_cache: bool = True,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    record_top_k: int = 0,
    record_confidence: bool = False,
    ignore_eos: bool = False,
    on_block: Callable[[torch.Tensor], None] | None = None,
) -> GenerateOutput:
    """Decode one report per image.

    Args:
        model: the dVLM (in eval mode).
        pixel_values: `model.preprocess_images(images)`, one image per sequence.
        mode: "ar" or "diffusion".
        steps: diffusion forwards per block at most (1 = one-step).
        threshold: tau, the confidence at which a position is committed early.
        fused: fused block KV cache (diffusion with `use_cache` only).
        use_cache: False recomputes everything each forward (reference, slow).
        max_new_tokens: default `model.config.max_response_len`.
        temperature: 0 = greedy; otherwise sample from softmax(logits / temperature).
        generator: for sampling.
        record_top_k: diffusion: record the top-k distribution at commit time.
        record_confidence: record each token's probability at commit time
            (`GenerateOutput.confidence`; one log-sum-exp over the vocabulary per position).
        ignore_eos: never emit `<eos>` (benchmarks: every sequence runs to max_new_tokens).
        on_block: called with the final tokens so far, `(B, n)`, each time a block is final
            (diffusion) or every `block_length` tokens (AR): streaming. Positions after a
            sequence's `<eos>` are not cleaned up yet.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    max_new = model.config.max_response_len if max_new_tokens is None else max_new_tokens
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    start = time.perf_counter()
    image_embeds = model.encode_images(pixel_values.to(model.device))  # (B, N_img, hidden)
    # Ids the decoder must never emit (`EchoDVLM.banned_token_ids`: spare rows and every
    # special token but eos; a mask token must not survive decoding).
    banned = torch.zeros(model.vocab_size, device=model.device)  # (V,)
    banned[model.banned_token_ids] = float("-inf")
    if ignore_eos:
        banned[model.eos_token_id] = float("-inf")
    picker = _Picker(banned, temperature, generator)
    clock = _Clock(start, model.device)
    if mode == "ar":
        tokens, confidence, forwards = _decode_ar(
            model, image_embeds, max_new, use_cache, picker, clock, on_block, record_confidence
        )
        commit_step = top_ids = top_probs = None
    else:
        tokens, commit_step, top_ids, top_probs, confidence, forwards = _decode_blocks(
            model,
            image_embeds,
            max_new,
            steps,
            threshold,
            fused and use_cache,
            use_cache,
            picker,
            record_top_k,
            record_confidence,
            clock,
            on_block,
        )
    tokens = tokens[:, :max_new]  # (B, N)
    is_eos = tokens == model.eos_token_id  # (B, N)
    seen = is_eos.long().cumsum(1)  # (B, N)
    after = (seen - is_eos.long()) > 0  # strictly after the first eos
    tokens = tokens.masked_fill(after, model.pad_token_id)
    has_eos = is_eos.any(1)  # (B,)
    first = torch.where(has_eos, is_eos.long().argmax(1), tokens.shape[1])  # (B,)
    generated = (first + has_eos.long()).float()  # (B,) incl. eos
    if mode == "ar":
        prefill_tokens = tokens.shape[0]
    elif fused and use_cache:
        first_block = commit_step[:, : min(model.block_length, tokens.shape[1])]  # (B, <=Bk)
        prefill_tokens = int((first_block == 0).sum())
    else:
        prefill_tokens = 0
    if confidence is not None:
        confidence = confidence[:, : tokens.shape[1]].masked_fill(after, 1.0)
    if commit_step is not None:
        commit_step = commit_step[:, : tokens.shape[1]]
        top_ids = None if top_ids is None else top_ids[:, : tokens.shape[1]]
        top_probs = None if top_probs is None else top_probs[:, : tokens.shape[1]]
    return GenerateOutput(
        tokens=tokens,
        lengths=first,
        num_forwards=forwards,
        tokens_per_forward=float(generated.mean()) / forwards,
        commit_step=commit_step,
        top_k_ids=top_ids,
        top_k_probs=top_probs,
        confidence=confidence,
        prefill_seconds=clock.prefill,
        prefill_tokens=prefill_tokens,
        total_seconds=clock.elapsed(),
    )


class _Clock:
    """Marks the end of the prefill (vision tower + prompt forward). On CUDA it waits for
    the device first: kernels run asynchronously, and the host clock alone would time only
    their launch."""

    def __init__(self, start: float, device: torch.device):
        self.start = start
        self.device = device
        self.prefill = 0.0

    def elapsed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start

    def prefill_done(self) -> None:
        self.prefill = self.elapsed()


class _Picker:
    """Chooses a token per position and, when asked, its confidence (the chosen token's
    probability) and the distribution."""

    def __init__(self, banned: torch.Tensor, temperature: float, generator):
        self.banned = banned
        self.temperature = temperature
        self.generator = generator

    def __call__(self, logits: torch.Tensor, need_probs: bool = True, need_conf: bool = False):
        """logits `(B, Q, V)` -> (tokens `(B, Q)`, confidence `(B, Q)`, probs `(B, Q, V)`);
        greedy without `need_probs` skips the softmax and returns (tokens, None, None), or
        with `need_conf` (tokens, confidence, None) from one log-sum-exp."""
        logits = logits + self.banned  # (B, Q, V)
        if self.temperature == 0 and not need_probs:
            if not need_conf:
                return logits.argmax(-1), None, None
            top = logits.max(-1)  # values, indices (B, Q)
            conf = torch.exp(top.values.float() - torch.logsumexp(logits.float(), dim=-1))
            return top.indices, conf, None
        if self.temperature > 0:
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)
            flat = probs.reshape(-1, probs.shape[-1])  # (B*Q, V)
            tokens = torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:2])
        else:
            probs = torch.softmax(logits.float(), dim=-1)
            tokens = probs.argmax(-1)  # (B, Q)
        conf = probs.gather(-1, tokens[..., None]).squeeze(-1)  # (B, Q)
        return tokens, conf, probs


def _decode_ar(model, image_embeds, max_new, use_cache, picker, clock, on_block=None,
               record_confidence=False):
    batch, P = image_embeds.shape[0], model.prompt_length
    run = _Runner(model, image_embeds, "causal", max_new)
    prompt = model.prompt_input_ids(batch)  # (B, P)
    tokens = torch.full((batch, max_new), model.pad_token_id, device=model.device)  # (B, N)
    done = torch.zeros(batch, dtype=torch.bool, device=model.device)  # (B,)
    confidence = torch.ones(batch, max_new, device=model.device) if record_confidence else None
    cache = DynamicCache(config=model.backbone.config) if use_cache else None
    logits = run(prompt, 0, cache, logits_from=P - 1)  # (B, 1, V) prefill
    clock.prefill_done()
    for i in range(max_new):
        tok, conf, _ = picker(logits[:, -1:], need_probs=False, need_conf=record_confidence)
        tokens[:, i : i + 1] = tok  # (B, 1)
        if record_confidence:
            confidence[:, i : i + 1] = conf
        done |= tok[:, 0] == model.eos_token_id
        finished = i == max_new - 1 or bool(done.all())
        if on_block is not None and (finished or (i + 1) % model.block_length == 0):
            on_block(tokens[:, : i + 1])
        if finished:
            conf_out = None if confidence is None else confidence[:, : i + 1]
            return tokens[:, : i + 1], conf_out, run.num_forwards
        if use_cache:
            logits = run(tok, P + i, cache)  # (B, 1, V)
        else:
            ids = torch.cat([prompt, tokens[:, : i + 1]], dim=1)  # (B, P + i + 1)
            logits = run(ids, 0, None, logits_from=P + i)  # (B, 1, V)
    raise AssertionError("unreachable")


def _decode_blocks(
    model, image_embeds, max_new, steps, threshold, fused, use_cache, picker, record_top_k,
    record_confidence, clock, on_block=None,
):
    batch, P, Bk = image_embeds.shape[0], model.prompt_length, model.block_length
    num_blocks = -(-max_new // Bk)
    length = num_blocks * Bk
    device = model.device
    run = _Runner(model, image_embeds, "block", length)
    prompt = model.prompt_input_ids(batch)  # (B, P)
    tokens = torch.full((batch, length), model.mask_token_id, device=device)  # (B, L)
    commit_step = torch.full((batch, length), -1, dtype=torch.long, device=device)  # (B, L)
    top_ids = top_probs = None
    if record_top_k:
        top_ids = torch.zeros(batch, length, record_top_k, dtype=torch.long, device=device)
        top_probs = torch.zeros(batch, length, record_top_k, device=device)
    confidence = torch.ones(batch, length, device=device) if record_confidence else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    cache = first_logits = None
    if use_cache:
        cache = DynamicCache(config=model.backbone.config)
        if fused:  # [prompt | masked block 0]: keep the prompt's KV, predict block 0
            ids = torch.cat([prompt, tokens[:, :Bk]], dim=1)  # (B, P + Bk)
            first_logits = run(ids, 0, cache, logits_from=P)  # (B, Bk, V)
            cache.crop(-Bk)
        else:
            run(prompt, 0, cache, logits_from=P)  # prefill: KV only, no logits
    clock.prefill_done()
    ranks = torch.arange(Bk, device=device).expand(batch, -1)  # (B, Bk)
    all_masked = torch.ones(batch, Bk, dtype=torch.bool, device=device)  # (B, Bk)
    for k in range(num_blocks):
        lo, hi = k * Bk, (k + 1) * Bk  # response indices of block k
        masked = all_masked  # (B, Bk) positions of block k still masked
        for step in range(steps):
            if not use_cache:
                ids = torch.cat([prompt, tokens[:, :hi]], dim=1)  # (B, P + hi)
                logits = run(ids, 0, None, logits_from=P + lo)  # (B, Bk, V)
            elif fused and step == 0 and k == 0:
                logits = first_logits  # from the prefill forward
            elif fused and step == 0:
                # [final block k-1 | block k]: keep k-1's KV, drop k's.
                logits = run(tokens[:, lo - Bk : hi], P + lo - Bk, cache, logits_from=Bk)
                cache.crop(-Bk)
            else:
                logits = run(tokens[:, lo:hi], P + lo, cache)  # (B, Bk, V)
                cache.crop(-Bk)
            last = step == steps - 1
            cand, conf, probs = picker(logits, need_probs=bool(record_top_k) or not last,
                                       need_conf=record_confidence)
            if last:  # the last step (the only one when steps == 1) commits the rest
                commit = masked
            else:  # conf >= tau, and at least ceil(remaining / steps left) (>= 1) per row
                conf = conf.masked_fill(~masked, float("-inf"))  # (B, Bk)
                remaining = masked.sum(1)  # (B,)
                n_min = -(-remaining // (steps - step))  # (B,)
                n_tau = ((conf >= threshold) & masked).sum(1)  # (B,)
                order = conf.argsort(dim=1, descending=True, stable=True)  # (B, Bk)
                rank = torch.empty_like(order).scatter_(1, order, ranks)  # (B, Bk)
                commit = masked & (rank < torch.maximum(n_min, n_tau)[:, None])  # (B, Bk)
            tokens[:, lo:hi] = torch.where(commit, cand, tokens[:, lo:hi])
            commit_step[:, lo:hi].masked_fill_(commit, step)
            if record_confidence:  # committed positions were masked: their conf is intact
                confidence[:, lo:hi] = torch.where(commit, conf, confidence[:, lo:hi])
            if record_top_k:
                p, i = probs.topk(record_top_k, dim=-1)  # (B, Bk, k)
                top_probs[:, lo:hi] = torch.where(commit[..., None], p, top_probs[:, lo:hi])
                top_ids[:, lo:hi] = torch.where(commit[..., None], i, top_ids[:, lo:hi])
            if last:
                break
            masked = masked & ~commit
            if not bool(masked.any()):
                break
        done |= (tokens[:, lo:hi] == model.eos_token_id).any(1)
        if on_block is not None:
            on_block(tokens[:, :hi])
        if k == num_blocks - 1 or bool(done.all()):
            conf_out = None if confidence is None else confidence[:, :hi]
            return tokens[:, :hi], commit_step, top_ids, top_probs, conf_out, run.num_forwards
        if use_cache and not fused:
            run(tokens[:, lo:hi], P + lo, cache, logits_from=Bk)  # write the final block's KV
    raise AssertionError("unreachable")
