"""DCD trajectory records (docs/ARCHITECTURE.md section 4.5): a teacher rollout -> one record
per report, records -> the tensors of `diffusion.dcd.dcd_loss`, and the repetition-loop filter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from echo_ray.config.schema import TrajectoriesConfig
from echo_ray.decode.sampler import GenerateOutput
from echo_ray.diffusion.noise import pad_responses


def trajectory_records(out: GenerateOutput, eos_token_id: int) -> list[dict]:
    """A teacher rollout (`generate(mode="diffusion", record_top_k=k)`) -> one record per row.

    Each record keeps the positions up to and including the row's first `<eos>` (everything
    after it is the lockstep batch's filler, never part of the report):

    - "tokens": list[int], the report tokens (no `<eos>`);
    - "commit_step": list[int], one per kept position (len(tokens) + 1 with the `<eos>`);
    - "top_ids": list[list[int]] and "top_probs": list[list[float]], the teacher's top-k at
      each kept position's commit time;
    - "mass": list[float], sum of "top_probs" per kept position (the mass the records cover);
    - "ended": bool, whether the row produced `<eos>` (False: cut at max_new_tokens, and the
      lists have len(tokens) entries).
    """
    if out.commit_step is None or out.top_k_ids is None or out.top_k_probs is None:
        raise ValueError(
            "the rollout has no recorded distributions: call generate(mode='diffusion', "
            "record_top_k=k) with k >= 1"
        )
    tokens = out.tokens.cpu()
    steps = out.commit_step.cpu()
    ids = out.top_k_ids.cpu()
    probs = out.top_k_probs.float().cpu()
    records = []
    for b in range(tokens.shape[0]):
        row = tokens[b].tolist()
        ended = eos_token_id in row
        n = row.index(eos_token_id) if ended else len(row)  # report tokens
        kept = n + int(ended)
        p = probs[b, :kept]  # (kept, K)
        records.append(
            {
                "tokens": row[:n],
                "commit_step": steps[b, :kept].tolist(),
                "top_ids": ids[b, :kept].tolist(),
                "top_probs": p.tolist(),
                "mass": p.sum(-1).tolist(),
                "ended": ended,
            }
        )
    return records


def collate_trajectories(
    records: Sequence[dict],
    *,
    block_length: int,
    max_len: int,
    eos_token_id: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trajectory records (as `trajectory_records` makes them) -> the tensors of `dcd_loss`.

    Returns:
        `(response, valid, commit_step, top_ids, top_probs)`: `(B, L)` long, `(B, L)` bool
        (both from `pad_responses`), `(B, L)` long, `(B, L, K)` long, `(B, L, K)` float32.
        Positions without a record (the `<eos>` fill, pads, a report cut at `max_len - 1`
        tokens) hold 0. Every record must have the same K.
    """
    if not records:
        raise ValueError("collate_trajectories needs at least one record")
    ks = {len(r["top_ids"][0]) for r in records if len(r["top_ids"])}
    if len(ks) > 1:
        raise ValueError(f"records have different top-k sizes {sorted(ks)}: use one k per run")
    K = ks.pop() if ks else 1
    response, valid = pad_responses(
        [list(r["tokens"]) for r in records],
        block_length=block_length,
        max_len=max_len,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )  # (B, L) each
    B, L = response.shape
    commit_step = torch.zeros(B, L, dtype=torch.long)  # (B, L)
    top_ids = torch.zeros(B, L, K, dtype=torch.long)  # (B, L, K)
    top_probs = torch.zeros(B, L, K, dtype=torch.float32)  # (B, L, K)
    for b, r in enumerate(records):
        n = min(len(r["commit_step"]), L)
        if n == 0:
            continue
        commit_step[b, :n] = torch.as_tensor(list(r["commit_step"][:n]), dtype=torch.long)
        top_ids[b, :n] = torch.as_tensor([list(x) for x in r["top_ids"][:n]], dtype=torch.long)
        top_probs[b, :n] = torch.as_tensor(
            [list(x) for x in r["top_probs"][:n]], dtype=torch.float32
        )
    return response, valid, commit_step, top_ids, top_probs


def is_degenerate(
    tokens: Sequence[int],
    *,
    max_ngram: int = TrajectoriesConfig.max_ngram,
    min_repeats: int = TrajectoriesConfig.min_repeats,
) -> bool:
    """Whether a rollout fell into a repetition loop (docs/ARCHITECTURE.md section 4.5: such
    rollouts are dropped from the trajectory set and counted).

    The rule: True iff for some n in 1..max_ngram some n-gram occurs `min_repeats` times in
    a row, back to back, anywhere in `tokens`, i.e. some window of n * min_repeats tokens
    has period n (`tokens[j] == tokens[j + n]` for every j in the window but its last n).
    With the defaults: "a a a", "a b a b a b", "a b c a b c a b c" and "a b c d" x 3 are
    loops; "a a", "a b a b" and a 5-gram repeated are not. Whether the rollout ended with
    `<eos>` is a separate check (`trajectory_records`' "ended").
    """
    if max_ngram < 1 or min_repeats < 2:
        raise ValueError(
            f"need max_ngram >= 1 and min_repeats >= 2, got {max_ngram}, {min_repeats}"
        )
    seq = list(tokens)
    for n in range(1, max_ngram + 1):
        need = n * (min_repeats - 1)  # consecutive j with seq[j] == seq[j + n]
        run = 0
        for j in range(len(seq) - n):
            run = run + 1 if seq[j] == seq[j + n] else 0
            if run >= need:
                return True
    return False
