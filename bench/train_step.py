"""Training step cost: AR vs RAD (`[prompt | x0 | xt]`) vs full-sequence duplication.

Same model, same batch, one process, interleaved round-robin: forward + backward + AdamW
step of `echo_ray.diffusion.compute_ar_loss` / `compute_rad_loss` (layouts "rad" and
"full_copy"). RAD duplicates only the response, prior work the whole sequence (vision tokens
included): the gap is what RAD saves, and it grows with the number of image tokens.
Prints a table, then one JSON line with every figure.

    python bench/train_step.py [--batch-size 8] [--response-len 64] [model.image_size=224 ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from echo_ray.config import EchoConfig, apply_overrides
from echo_ray.diffusion import compute_ar_loss, compute_rad_loss, pad_responses
from echo_ray.model import build_model
from echo_ray.synth import render_view, sample_study, write_report
from echo_ray.tokenizer import train_report_tokenizer


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--response-len", type=int, default=64, help="response tokens per row")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per objective (median)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = apply_overrides(EchoConfig.from_name(args.preset), args.overrides)
    reports = [write_report(sample_study(0, i)) for i in range(500)]
    tokenizer = train_report_tokenizer(reports, vocab_size=config.tokenizer.vocab_size)
    model = build_model(config.model, tokenizer).train()
    size = model.config.image_size
    images = torch.stack(
        [
            torch.from_numpy(render_view(sample_study(3, i), image_size=size))
            for i in range(args.batch_size)
        ]
    )
    pixel_values = model.preprocess_images(images)
    # Rows of exactly response_len tokens (report tokens, cut, then the eos fill).
    ids = [tokenizer(r)["input_ids"] * 8 for r in reports[: args.batch_size]]
    response, valid = pad_responses(
        [row[: args.response_len - 1] for row in ids],
        block_length=model.block_length,
        max_len=args.response_len,
        eos_token_id=model.eos_token_id,
        pad_token_id=model.pad_token_id,
    )
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    P, L = model.prompt_length, response.shape[1]
    objectives = {
        "ar": (lambda: compute_ar_loss(model, pixel_values, response, valid), P + L),
        "rad": (
            lambda: compute_rad_loss(model, pixel_values, response, valid, generator=gen)[0],
            P + 2 * L,
        ),
        "full_copy": (
            lambda: compute_rad_loss(
                model, pixel_values, response, valid, layout="full_copy", generator=gen
            )[0],
            2 * P + 2 * L,
        ),
    }

    def step(loss_fn) -> float:
        start = time.perf_counter()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    for fn, _ in objectives.values():  # warm-up
        step(fn)
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for _ in range(args.repeats):
        for name, (fn, _) in objectives.items():
            times[name].append(step(fn))
    rows = []
    for name, (_, seq) in objectives.items():
        median = statistics.median(times[name])
        rows.append(
            {
                "objective": name,
                "sequence_length": seq,
                "step_ms": 1000 * median,
                "response_tokens_per_s": args.batch_size * L / median,
            }
        )
    print(f"{'objective':<12}{'seq len':>9}{'step ms':>10}{'resp tok/s':>12}")
    for r in rows:
        print(
            f"{r['objective']:<12}{r['sequence_length']:>9}{r['step_ms']:>10.1f}"
            f"{r['response_tokens_per_s']:>12.0f}"
        )
    by = {r["objective"]: r for r in rows}
    rad_vs_full = by["full_copy"]["step_ms"] / by["rad"]["step_ms"]
    print(f"rad_vs_full_copy = {rad_vs_full:.2f}x faster per step")
    result = {
        "bench": "train_step",
        "preset": args.preset,
        "overrides": args.overrides,
        "parameters": sum(q.numel() for q in model.parameters()),
        "batch_size": args.batch_size,
        "prompt_length": P,
        "image_tokens": model.num_image_tokens,
        "response_length": L,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "rad_vs_full_copy": rad_vs_full,
        "rows": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
