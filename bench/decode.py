"""Decode speed: AR vs multi-step vs one-step vs one-step fused, same weights, same machine.

Every mode runs `echo_ray.decode.sampler.generate` on the same model and the same synthetic
phantom radiographs, in one process, interleaved round-robin (so machine load hits every
mode alike). Without `--checkpoint` the model is the tiny preset, randomly initialised on a
tokenizer trained on synthetic reports, and `<eos>` is ignored so every mode decodes exactly
`--max-new-tokens` tokens per sequence. Figures per mode and batch size: forwards per call,
tokens per forward (TPF), median latency, tokens/s end to end (vision + prefill included),
and decode tokens/s (prefill excluded, and so are the tokens the prompt forward yields: AR's
first token, fused one-step's block 0). Also, per batch size, whether fused and unfused
one-step wrote the same tokens, and the forwards one block costs in each (unfused: predict B
rows + write B rows; fused: 2B rows), whose ratio bounds fused vs unfused decoding. Prints a
table, then one JSON line with every figure.

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
from transformers import DynamicCache

from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import DECODING_MODES, EchoConfig
from echo_ray.decode.modes import decoding_kwargs
from echo_ray.decode.predictor import place_model
from echo_ray.decode.sampler import _Runner, generate
from echo_ray.model.checkpoint import load_checkpoint
from echo_ray.model.dvlm import EchoDVLM
from echo_ray.synth.render import render_view
from echo_ray.synth.sampling import sample_study


def _model(args: argparse.Namespace) -> EchoDVLM:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint)[0]
    config = apply_overrides(EchoConfig.from_name(args.preset), args.overrides)
    return random_model(config, args.tokenizer_reports, args.device, vocab=args.vocab)


def _block_forward_costs(model: EchoDVLM, pixel_values: torch.Tensor, repeats: int) -> dict:
    """Median ms of the forwards one block costs, on a cache holding the prompt and 8 blocks:
    unfused, a predict forward (B rows, logits) plus a write forward (B rows, no logits);
    fused, one forward of 2B rows (B logits). Their ratio bounds fused vs unfused decoding:
    the two modes process the same rows, and fused saves one forward's fixed cost a block."""
    Bk, P = model.block_length, model.prompt_length
    batch = pixel_values.shape[0] // model.num_patches
    run = _Runner(model, model.encode_images(pixel_values), "block", 10 * Bk)
    cache = DynamicCache(config=model.backbone.config)
    run(model.prompt_input_ids(batch), 0, cache, logits_from=P)
    ids = model.prompt_ids[-1:].expand(batch, 8 * Bk)  # (B, 8 blocks) any real token
    run(ids, P, cache, logits_from=ids.shape[1])
    cases = {"predict": (Bk, 0), "write": (Bk, Bk), "fused": (2 * Bk, Bk)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(repeats + 3):  # interleaved; the first 3 are warm-up
        for name, (rows, logits_from) in cases.items():
            _sync(model.device)
            start = time.perf_counter()
            run(ids[:, :rows], P + 8 * Bk, cache, logits_from=logits_from)
            _sync(model.device)
            if i >= 3:
                times[name].append(time.perf_counter() - start)
            cache.crop(-rows)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        "--vocab",
        choices=("report", "qwen"),
        default="report",
        help="the random model's tokenizer: a report BPE, or Qwen's with its ~152k embedding rows",
    )
    p.add_argument(
        "--modes",
        default=",".join(DECODING_MODES),
        help="comma-separated decoding modes to time (one-step-fused is always included)",
    )
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
    names = [m for m in DECODING_MODES if m in args.modes.split(",") or m == "one-step-fused"]
    modes = {
        name: decoding_kwargs(name, block_length=model.block_length, threshold=args.threshold)
        for name in names
    }
    rows: list[dict] = []
    agreement: dict[int, float] = {}
    costs: dict[int, dict[str, float]] = {}
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
        with torch.no_grad():
            costs[batch] = _block_forward_costs(model, pixel_values, 10 * args.repeats)
        # Same weights, same greedy picks: fused and unfused one-step must agree token for
        # token (exactly in fp32; in bf16 the two cache layouts round differently).
        if "one-step" in runs:
            agreement[batch] = float(
                (runs["one-step-fused"][0].tokens == runs["one-step"][0].tokens).float().mean()
            )
        for name, outs in runs.items():
            total = statistics.median(o.total_seconds for o in outs)
            decode = statistics.median(o.total_seconds - o.prefill_seconds for o in outs)
            tokens = statistics.median(int((o.tokens != model.pad_token_id).sum()) for o in outs)
            # the tokens of the decode loop: AR's first token and fused one-step's block 0
            # come out of the prompt forward, counted in the prefill
            decoded = tokens - statistics.median(o.prefill_tokens for o in outs)
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
                    "decode_tokens_per_s": decoded / decode,
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
            if base not in by:
                continue
            speedups[f"{key}_b{batch}"] = fused["tokens_per_s"] / by[base]["tokens_per_s"]
            speedups[f"{key}_decode_b{batch}"] = (
                fused["decode_tokens_per_s"] / by[base]["decode_tokens_per_s"]
            )
    for key, value in speedups.items():
        print(f"{key} = {value:.2f}x")
    for batch, value in agreement.items():
        print(f"fused == unfused tokens, batch {batch}: {value:.1%}")
    block_bound = {}
    for batch, c in costs.items():
        block_bound[batch] = (c["predict"] + c["write"]) / c["fused"]
        print(f"one block's forwards, batch {batch}: unfused {c['predict']:.2f} + "
              f"{c['write']:.2f} ms, fused {c['fused']:.2f} ms -> at most "
              f"{block_bound[batch]:.2f}x fused vs unfused decoding")
    # The headline figures the issue names: end to end (prefill included), at the smallest
    # batch measured (batch 1 by default).
    head = min(batch_sizes)
    fused_head = next(r for r in rows if r["batch"] == head and r["mode"] == "one-step-fused")
    headline = {
        "speedup_fused_vs_ar": speedups.get(f"fused_vs_ar_b{head}"),
        "speedup_fused_vs_unfused": speedups.get(f"fused_vs_unfused_b{head}"),
        "tokens_per_forward_fused": fused_head["tokens_per_forward"],
        "headline_batch": head,
    }
    result = {
        "bench": "decode",
        "model": args.checkpoint or " ".join([f"random {args.preset}", *args.overrides]),
        "vocab": None if args.checkpoint else args.vocab,
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
        **{f"block_bound_fused_vs_unfused_b{b}": v for b, v in block_bound.items()},
        "block_forward_ms": {str(b): c for b, c in costs.items()},
        "rows": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
