"""Training step cost: AR vs RAD (`[prompt | x0 | xt]`) vs full-sequence duplication.

Same model, same batch, one process, interleaved round-robin: forward + backward + AdamW
step of `echo_ray.diffusion.losses.compute_ar_loss` / `compute_rad_loss` (layouts "rad" and
"full_copy"). RAD duplicates only the response, prior work the whole sequence (vision tokens
included): the gap is what RAD saves, and it grows with the number of image tokens. The
default layout is vision-heavy: 896 px images (1,024 image tokens), 128 response tokens.

The theoretical speed-up is the ratio of the FLOPs each step executes, counted by
`torch.utils.flop_counter` on one step (matmuls, plus attention with the formula below,
since the counter has none for CPU flash attention). Prints a table, then one JSON line with
every figure (`rad_step_speedup`, `rad_theoretical_speedup`, ...).

    python bench/train_step.py [--batch-size 2] [--response-len 128] [--image-size 896]
                               [--device cuda] [--precision bf16] [model.num_layers=8 ...]

On CUDA the step runs as GPU training does: fp32 master weights, bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig
from echo_ray.diffusion.losses import compute_ar_loss, compute_rad_loss
from echo_ray.diffusion.noise import pad_responses
from echo_ray.model.hf import build_model
from echo_ray.synth.render import render_view
from echo_ray.synth.report import write_report
from echo_ray.synth.sampling import sample_study
from echo_ray.text.tokenizer import train_report_tokenizer

_ATEN = torch.ops.aten


def _attention_fwd_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    batch, heads, q_len, dim = query
    return 4 * batch * heads * q_len * key[-2] * dim  # Q K^T and P V


def _attention_bwd_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    batch, heads, q_len, dim = query
    return 8 * batch * heads * q_len * key[-2] * dim  # dV, dP, dQ, dK


_ATTENTION_FLOPS = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu: _attention_fwd_flops,
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _attention_bwd_flops,
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--response-len", type=int, default=128, help="response tokens per row")
    p.add_argument(
        "--image-size", type=int, default=896,
        help="image side in pixels (896 -> 1,024 image tokens at patch 14, merge 2)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed steps per objective (median)")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (1: on a shared 2-core machine more threads oversubscribe "
        "the cores and a step was measured up to 5x slower, drowning the comparison)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--attention", choices=("dense", "flex"), default="dense",
        help="the losses' attention: dense (B, 1, T, T) masks, or flex (AR: causal SDPA without "
        "a mask; RAD / full copy: a flex-attention BlockMask, whose backward needs a GPU)",
    )
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), default=None,
        help="bf16: autocast over fp32 master weights, as training runs on a GPU "
        "(default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = apply_overrides(
        EchoConfig.from_name(args.preset), [f"model.image_size={args.image_size}", *args.overrides]
    )
    reports = [write_report(sample_study(0, i)) for i in range(500)]
    tokenizer = train_report_tokenizer(reports, vocab_size=config.tokenizer.vocab_size)
    with torch.device(device):  # initialised where it trains (seconds for 7B on a GPU)
        model = build_model(config.model, tokenizer).float().train()
    size = model.config.image_size
    images = torch.stack(
        [
            torch.from_numpy(render_view(sample_study(3, i), image_size=size))
            for i in range(args.batch_size)
        ]
    )
    pixel_values = model.preprocess_images(images).to(device)
    # Rows of exactly response_len tokens (report tokens, cut, then the eos fill).
    ids = [tokenizer(r)["input_ids"] * 8 for r in reports[: args.batch_size]]
    response, valid = pad_responses(
        [row[: args.response_len - 1] for row in ids],
        block_length=model.block_length,
        max_len=args.response_len,
        eos_token_id=model.eos_token_id,
        pad_token_id=model.pad_token_id,
    )
    response, valid = response.to(device), valid.to(device)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    gen = torch.Generator(device).manual_seed(0)
    P, L = model.prompt_length, response.shape[1]
    attention = args.attention
    objectives = {
        "ar": (
            lambda: compute_ar_loss(model, pixel_values, response, valid, attention=attention),
            P + L,
        ),
        "rad": (
            lambda: compute_rad_loss(
                model, pixel_values, response, valid, generator=gen, attention=attention
            )[0],
            P + 2 * L,
        ),
        "full_copy": (
            lambda: compute_rad_loss(
                model, pixel_values, response, valid, layout="full_copy", generator=gen,
                attention=attention,
            )[0],
            2 * P + 2 * L,
        ),
    }

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(loss_fn) -> float:
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - start

    flops = {}
    for name, (fn, _) in objectives.items():  # warm-up, counting the FLOPs of one step
        with FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS) as counter:
            step(fn)
        flops[name] = counter.get_total_flops()
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
                "gflops_per_step": flops[name] / 1e9,
                "response_tokens_per_s": args.batch_size * L / median,
            }
        )
    print(f"{'objective':<12}{'seq len':>9}{'step ms':>10}{'GFLOP':>9}{'resp tok/s':>12}")
    for r in rows:
        print(
            f"{r['objective']:<12}{r['sequence_length']:>9}{r['step_ms']:>10.1f}"
            f"{r['gflops_per_step']:>9.1f}{r['response_tokens_per_s']:>12.0f}"
        )
    by = {r["objective"]: r for r in rows}
    measured = by["full_copy"]["step_ms"] / by["rad"]["step_ms"]
    theoretical = flops["full_copy"] / flops["rad"]
    # Savings as fractions of the full-copy step: measured vs what the FLOPs predict.
    saving, saving_theory = 1 - 1 / measured, 1 - 1 / theoretical
    print(f"RAD vs full copy: {measured:.2f}x faster per step, {theoretical:.2f}x fewer FLOPs; "
          f"saving {saving:.1%} measured vs {saving_theory:.1%} theoretical "
          f"({saving / saving_theory:.0%} of it)")
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
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision,
        "attention": args.attention,
        "machine": platform.machine(),
        "rad_step_speedup": round(measured, 4),
        "rad_theoretical_speedup": round(theoretical, 4),
        "rad_saving_measured": round(saving, 4),
        "rad_saving_theoretical": round(saving_theory, 4),
        "rad_saving_fraction_of_theory": round(saving / saving_theory, 4),
        "rows": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
