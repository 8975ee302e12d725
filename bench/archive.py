"""Bulk archive reporting speed: studies/s with 1 vs 2 actors and batch 1 vs 16, one run.

Writes a synthetic archive, then reports it with `echo_ray.batch.job.report_archive` once per
configuration (actors x batch size: 1x16, 2x16, 1x1), each into a fresh output folder, in
one process on one local Ray: the ratios compare runs on the same machine, same archive,
same model. Without `--checkpoint` the model is the tiny preset, randomly initialised on a
tokenizer trained on synthetic reports: it rarely writes `<eos>`, so nearly every report
runs to `max_response_len` tokens (the worst case).

Figures per configuration:
- studies/s (warm): studies / the busiest actor's time inside its units (reading the
  files, DICOM decoding, the model, writing the part file); actor start-up (process,
  imports, model load) left out: it is paid once per actor, not per study;
- studies/s end to end: studies / the whole run's wall time (discovery, Ray Data, actor
  start-up and consolidation included).

Projection for 100,000 studies on one GPU: from a GPU measurement of the decoder
(`--gpu-ms-per-report`, or `--decode-json`: the JSON line `bench/decode.py` printed on a
GPU machine, its one-step-fused row at the largest batch), assuming file reads and DICOM
decoding keep up (they run in the actors' reader threads, beside the model). Without one it
is null, with the reason.

Prints a table, then one JSON line with every figure.

    python bench/archive.py [--studies 128] [--image-size 128] [--checkpoint DIR]
                            [--gpu-ms-per-report MS | --decode-json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _random_model import random_model

from echo_ray.batch.job import report_archive
from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig
from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.runtime.cluster import init_ray
from echo_ray.synth.archive import synthesize_archive

CONFIGS = ((1, 16), (2, 16), (1, 1))  # (actors, batch size)
PROJECTED_STUDIES = 100_000


def _name(actors: int, batch: int) -> str:
    return f"actors{actors}_batch{batch}"


def _random_checkpoint(preset: str, path: Path, num_reports: int) -> Path:
    config = EchoConfig.from_name(preset)
    torch.manual_seed(0)
    return save_checkpoint(random_model(config, num_reports), path, config)


def gpu_ms_per_report(args: argparse.Namespace) -> tuple[float | None, str]:
    """(ms per report of the decoder on a GPU, where the figure came from) or (None, why)."""
    if args.gpu_ms_per_report:
        return args.gpu_ms_per_report, "--gpu-ms-per-report"
    if not args.decode_json:
        return None, ("no GPU decode benchmark measured: pass --gpu-ms-per-report or "
                      "--decode-json (bench/decode.py's JSON line from a GPU machine)")
    lines = Path(args.decode_json).read_text().strip().splitlines()
    decode = json.loads(lines[-1])
    if not str(decode.get("device", "")).startswith("cuda"):
        return None, f"{args.decode_json} was measured on {decode.get('device')}, not a GPU"
    rows = [r for r in decode["rows"] if r["mode"] == "one-step-fused"]
    best = max(rows, key=lambda r: r["batch"])
    return best["latency_ms"] / best["batch"], (
        f"{args.decode_json}: one-step-fused, batch {best['batch']}, {decode['device']}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=128, help="synthetic studies in the archive")
    p.add_argument("--image-size", type=int, default=128, help="synthetic image side")
    p.add_argument("--checkpoint", default=None, help="a saved model (else a random tiny one)")
    p.add_argument("--preset", default="tiny", help="preset of the random model")
    p.add_argument("--unit-size", type=int, default=16,
                   help="studies per part file (>= the largest batch size, 16)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per actor")
    p.add_argument("--decoding", default="one-step-fused")
    p.add_argument("--gpu-ms-per-report", type=float, default=None,
                   help="the decoder's ms per report on one GPU (bench/decode.py on a GPU)")
    p.add_argument("--decode-json", default=None,
                   help="a file whose last line is bench/decode.py's JSON, run on a GPU")
    p.add_argument("--workdir", default=None, help="where to write (default: a temp folder)")
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="echo-bench-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    archive = work / "archive"
    synth = synthesize_archive(archive, num_studies=args.studies, seed=11,
                               image_size=args.image_size, workers=2)
    checkpoint = Path(args.checkpoint) if args.checkpoint else _random_checkpoint(
        args.preset, work / "model", 2000)
    init_ray(None, num_cpus=4)  # logical CPUs: 2 actors plus Ray Data's own bookkeeping

    rows = []
    for actors, batch in CONFIGS:
        out = work / f"out-{_name(actors, batch)}"
        shutil.rmtree(out, ignore_errors=True)
        config = apply_overrides(EchoConfig(), [
            f"decoding.mode={args.decoding}", f"report.batch_size={batch}",
            f"report.unit_size={args.unit_size}", f"pool.actors={actors}",
            f"pool.cpus_per_actor={args.cpus_per_actor}", f"pool.threads={args.threads}",
        ])
        summary = report_archive(str(checkpoint), str(archive), str(out), config)
        run = summary["this_run"]
        rows.append({
            "config": _name(actors, batch), "actors": actors, "batch_size": batch,
            "studies": run["studies"], "reports": run["reports"], "errors": run["errors"],
            "wall_s": run["wall_time_s"], "busy_s": max(run["actor_busy_s"].values()),
            "studies_per_s": run["busy_studies_per_s"],
            "studies_per_s_end_to_end": run["studies_per_s"],
        })

    print(f"{'actors':>6}{'batch':>7}{'studies':>9}{'errors':>8}{'wall s':>9}{'busy s':>9}"
          f"{'studies/s warm':>16}{'studies/s e2e':>15}")
    for r in rows:
        print(f"{r['actors']:>6}{r['batch_size']:>7}{r['studies']:>9}{r['errors']:>8}"
              f"{r['wall_s']:>9.1f}{r['busy_s']:>9.1f}{r['studies_per_s']:>16.2f}"
              f"{r['studies_per_s_end_to_end']:>15.2f}")
    rate = {r["config"]: r["studies_per_s"] for r in rows}
    batching = rate[_name(1, 16)] / rate[_name(1, 1)]
    actor = rate[_name(2, 16)] / rate[_name(1, 16)]
    ms, source = gpu_ms_per_report(args)
    hours = PROJECTED_STUDIES * ms / 3.6e6 if ms else None
    best = max(rate.values())
    print(f"batching speedup (batch 16 vs 1, one actor) = {batching:.2f}x; "
          f"2 actors vs 1 (batch 16) = {actor:.2f}x")
    print(f"{PROJECTED_STUDIES:,} studies on one GPU: "
          + (f"{hours:.2f} h ({ms:.1f} ms per report, {source})" if hours else f"n/a ({source})"))
    print(f"{PROJECTED_STUDIES:,} studies on this machine at the best rate measured: "
          f"{PROJECTED_STUDIES / best / 3600:.1f} h")
    result = {
        "bench": "archive",
        "model": str(checkpoint) if args.checkpoint else f"random {args.preset}",
        "decoding": args.decoding,
        "studies": args.studies,
        "images": synth["num_images"],
        "image_size": args.image_size,
        "unit_size": args.unit_size,
        "threads_per_actor": args.threads,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "studies_per_s": rate,
        "studies_per_s_end_to_end": {r["config"]: r["studies_per_s_end_to_end"] for r in rows},
        "batching_speedup": batching,
        "actor_speedup": actor,
        "gpu_ms_per_report": ms,
        "projected_hours_100k_one_gpu": hours,
        "projection_source": source,
        "projected_hours_100k_this_machine": PROJECTED_STUDIES / best / 3600,
        "rows": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
