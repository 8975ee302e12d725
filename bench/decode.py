"""Decode speed: AR vs multi-step vs one-step vs one-step fused, same weights, same machine.

Every mode runs `echo_ray.sampling.generate` on the same model and the same synthetic
phantom radiographs, in one process, interleaved round-robin (so machine load hits every
mode alike). Without `--checkpoint` the model is the tiny preset, randomly initialised on a
tokenizer trained on synthetic reports, and `<eos>` is ignored so every mode decodes exactly
`--max-new-tokens` tokens per sequence. Figures per mode and batch size: forwards per call,
tokens per forward (TPF), median latency, tokens/s end to end (vision + prefill included),
and decode tokens/s (prefill excluded). Prints a table, then one JSON line with every figure.

    python bench/decode.py [--checkpoint DIR] [--batch-sizes 1,4] [--max-new-tokens 128]
                           [--device cuda] [--cpu-kernels dense]
                           [model.hidden_size=128 ...]   (overrides of the random model)

The model is placed as the product places it (`predictor.place_model`): bf16 on CUDA; on
CPU its own dtype with prepacked decoder weights (`--cpu-kernels dense` keeps plain
`F.linear`, to measure what the packing buys). Every mode runs on the same kernels.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch
from _random_model import random_model

from echo_ray.checkpoint import load_checkpoint
from echo_ray.config import EchoConfig, apply_overrides
from echo_ray.decoding import DECODING_MODES, decoding_kwargs
from echo_ray.model import EchoDVLM
from echo_ray.predictor import place_model
from echo_ray.sampling import generate
from echo_ray.synth import render_view, sample_study


def _model(args: argparse.Namespace) -> EchoDVLM:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)[0]
    config = apply_overrides(EchoConfig.from_name(args.preset), args.overrides)
    return random_model(config, args.tokenizer_reports, args.device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a saved run (else a random tiny model)")
    p.add_argument("--preset", default="tiny", help="preset of the random model")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated, e.g. 1,4")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per mode (median kept)")
    p.add_argument("--threshold", type=float, default=0.9, help="tau of the multi-step mode")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--cpu-kernels",
        choices=("packed", "dense"),
        default="packed",
        help="CPU linear layers: prepacked weights (the product's default) or plain F.linear",
    )
    p.add_argument("--tokenizer-reports", type=int, default=2000)
    p.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode max-new-tokens whatever the model says (default: on without a checkpoint)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of the random model")
    args = p.parse_args(argv)
    if args.checkpoint and args.overrides:
        p.error("overrides apply to the random model only, not to --checkpoint")
    if args.threads:
        torch.set_num_threads(args.threads)
    ignore_eos = args.ignore_eos if args.ignore_eos is not None else args.checkpoint is None
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    model = _model(args).eval()
    if args.cpu_kernels == "dense" and torch.device(args.device).type == "cpu":
        model.to(args.device)
    else:
        place_model(model, args.device)
    size = model.config.image_size
    images = np.stack(
        [render_view(sample_study(7, i), image_size=size) for i in range(max(batch_sizes))]
    )
    modes = {
        name: decoding_kwargs(name, block_length=model.block_length, threshold=args.threshold)
        for name in DECODING_MODES
    }
    rows: list[dict] = []
    agreement: dict[int, float] = {}
    for batch in batch_sizes:
        pixel_values = model.preprocess_images(images[:batch])

        def call(kw: dict):
            return generate(
                model,
                pixel_values,
                max_new_tokens=args.max_new_tokens,
                ignore_eos=ignore_eos,
                **kw,
            )

        for kw in modes.values():  # warm-up
            call(kw)
        runs: dict[str, list] = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, kw in modes.items():
                runs[name].append(call(kw))
        # Same weights, same greedy picks: fused and unfused one-step must agree token for
        # token (exactly in fp32; in bf16 the two cache layouts round differently).
        agreement[batch] = float(
            (runs["one-step-fused"][0].tokens == runs["one-step"][0].tokens).float().mean()
        )
        for name, outs in runs.items():
            total = statistics.median(o.total_seconds for o in outs)
            decode = statistics.median(o.total_seconds - o.prefill_seconds for o in outs)
            tokens = statistics.median(int((o.tokens != model.pad_token_id).sum()) for o in outs)
            rows.append(
                {
                    "mode": name,
                    "batch": batch,
                    "tokens": tokens,
                    "forwards": statistics.median(o.num_forwards for o in outs),
                    "tokens_per_forward": statistics.median(o.tokens_per_forward for o in outs),
                    "latency_ms": 1000 * total,
                    "prefill_ms": 1000 * statistics.median(o.prefill_seconds for o in outs),
                    "tokens_per_s": tokens / total,
                    "decode_tokens_per_s": tokens / decode,
                }
            )

    print(
        f"{'mode':<16}{'batch':>6}{'tokens':>8}{'forwards':>10}{'TPF':>7}{'latency ms':>12}"
        f"{'prefill ms':>12}{'tokens/s':>10}{'decode tok/s':>14}"
    )
    for r in rows:
        print(
            f"{r['mode']:<16}{r['batch']:>6}{r['tokens']:>8.0f}{r['forwards']:>10.0f}"
            f"{r['tokens_per_forward']:>7.2f}{r['latency_ms']:>12.1f}{r['prefill_ms']:>12.1f}"
            f"{r['tokens_per_s']:>10.0f}{r['decode_tokens_per_s']:>14.0f}"
        )
    speedups = {}
    for batch in batch_sizes:
        by = {r["mode"]: r for r in rows if r["batch"] == batch}
        fused = by["one-step-fused"]
        for base, key in (("ar", "fused_vs_ar"), ("one-step", "fused_vs_unfused")):
            speedups[f"{key}_b{batch}"] = fused["tokens_per_s"] / by[base]["tokens_per_s"]
            speedups[f"{key}_decode_b{batch}"] = (
                fused["decode_tokens_per_s"] / by[base]["decode_tokens_per_s"]
            )
    for key, value in speedups.items():
        print(f"{key} = {value:.2f}x")
    for batch, value in agreement.items():
        print(f"fused == unfused tokens, batch {batch}: {value:.1%}")
    # The headline figures the issue names: end to end (prefill included), at the smallest
    # batch measured (batch 1 by default).
    head = min(batch_sizes)
    fused_head = next(r for r in rows if r["batch"] == head and r["mode"] == "one-step-fused")
    headline = {
        "speedup_fused_vs_ar": speedups[f"fused_vs_ar_b{head}"],
        "speedup_fused_vs_unfused": speedups[f"fused_vs_unfused_b{head}"],
        "tokens_per_forward_fused": fused_head["tokens_per_forward"],
        "headline_batch": head,
    }
    result = {
        "bench": "decode",
        "model": args.checkpoint or " ".join([f"random {args.preset}", *args.overrides]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "block_length": model.block_length,
        "prompt_length": model.prompt_length,
        "max_new_tokens": args.max_new_tokens,
        "ignore_eos": ignore_eos,
        "threads": torch.get_num_threads(),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "cpu_kernels": args.cpu_kernels if model.device.type == "cpu" else None,
        "machine": platform.machine(),
        "repeats": args.repeats,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **headline,
        **speedups,
        **{f"fused_unfused_token_agreement_b{b}": v for b, v in agreement.items()},
        "rows": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
