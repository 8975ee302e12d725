"""Bulk archive reporting speed: the CPU decode stage against decoding in the model actor.

Writes a synthetic archive (`echo-ray synth`'s mix of transfer syntaxes at `--image-size`),
then reports it with `echo_ray.batch.job.report_archive` twice, each into a fresh output
folder, on one local Ray, with one model actor each:

- "in-actor" (`pool.decode_in_actors`): the model actor reads, decodes and resizes its
  studies itself, serially with the model (the design before the decode stage);
- "decode-stage": `--decode-cpus` CPU tasks (default: this machine's cores) read and
  prepare the units ahead of the actor, which only runs the model.

Same machine, archive, model, unit and batch size; the ratios are what matter. Each run is
its own driver process (so its peak RSS is the job's own), on the bench's local Ray, which
has enough logical CPUs for the actor and the decode tasks at once. The actor stands in
for a GPU actor: on a GPU the model is far faster, so the decode stage's share is larger
still. On a 2-core machine the actor's model and the decode tasks share the same two
cores, so the speed-up is bounded by about 2x. Without `--checkpoint` the model is the tiny
preset, randomly initialised (its reports run to `max_response_len` tokens: the worst case).

Figures per configuration:
- studies/s end to end: studies / the job's wall time (discovery, Ray Data, actor start-up
  and consolidation included);
- studies/s warm: studies / the slowest stage's time: the actor's seconds inside its units,
  or the decode tasks' summed seconds / the tasks at once (start-up left out, the stages
  assumed to overlap, as they do in a long run);
- actor start s: the actor's start-up (torch, the model, its warm-up); on this CPU-only
  machine it takes cores from the decode tasks, which "warm" then counts against them;
- actor busy fraction: the actor's seconds inside its units / the pipeline's wall time;
- decode images/s: DICOM files read and prepared per second of one decode task (one CPU)
  (decode-stage only);
- peak RSS (MB) of the driver, a decode task's process and the actor.

Then, on one core of this process before Ray starts: decode ms per image per transfer
syntax (`decode_dicom` at the archive's size, resized to `--decode-size`, 448 the
Qwen2.5-VL grid: the bytes in memory, header + pixels + VOI + resize), and the decode cores
a GPU actor needs to be fed `--target` studies/s (one frontal image decoded per study).

Before the runs, two processes decode at once to see how many cores' worth this machine
gives now (`effective_cores`, 2.0 on two free cores): the decode stage can only gain what
is there. `--repeats N` alternates the two configurations N times and shows each one's median run
(by end-to-end rate); the machine's load average is printed and recorded: other work on
the cores skews the comparison (more of this job's processes get more of a shared CPU).

Prints a table, then one JSON line with every figure.

    python bench/archive.py --image-size 2560 [--studies 48] [--archive DIR] [--copies 4]
    python bench/archive.py --image-size 256 --studies 128
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _random_model import random_model

from echo_ray.config.schema import EchoConfig
from echo_ray.data.dicom import decode_dicom
from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.synth.archive import synthesize_archive

CONFIGS = {"in-actor": ["pool.decode_in_actors=true"], "decode-stage": []}


def _random_checkpoint(preset: str, path: Path, num_reports: int) -> Path:
    config = EchoConfig.from_name(preset)
    torch.manual_seed(0)
    return save_checkpoint(random_model(config, num_reports), path, config)


_JOB = """
import json, sys
from echo_ray.batch.job import report_archive
from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig
checkpoint, archive, out, address, overrides = json.loads(sys.argv[1])
config = apply_overrides(EchoConfig(), overrides)
report_archive(checkpoint, archive, out, config, ray_address=address)
"""


def run_job(checkpoint: Path, archive: Path, out: Path, overrides: list[str],
            address: str) -> dict:
    """One report run in its own driver process (no torch there; its own peak RSS)."""
    spec = json.dumps([str(checkpoint), str(archive), str(out), address, overrides])
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", _JOB, spec], check=True, env=env)
    return json.loads((out / "summary.json").read_text())


def _row(name: str, repeat: int, run: dict) -> dict:
    return {
        "config": name, "repeat": repeat, "studies": run["studies"], "images": run["images"],
        "reports": run["reports"], "errors": run["errors"],
        "wall_s": run["wall_time_s"], "pipeline_s": run["pipeline_s"],
        "actor_busy_s": max(run["actor_busy_s"].values()),
        "actor_start_s": max(run["actor_start_s"].values()),
        "decode_cpus": run["decode_cpus"], "decode_task_s": run["decode_task_s"],
        "studies_per_s_end_to_end": run["studies_per_s"],
        "studies_per_s_warm": run["warm_studies_per_s"],
        "actor_busy_fraction": run["actor_busy_fraction"],
        "decode_images_per_s_per_task": run["decode_images_per_s"],
        "decode_images_per_s_total": (round(run["images"] / run["pipeline_s"], 2)
                                      if run["decode_cpus"] else None),
        "peak_rss_mb": run["peak_rss_mb"],
    }


def _median(runs: list[dict]) -> dict:
    """The run with the median end-to-end rate (all its figures from that one run)."""
    ranked = sorted(runs, key=lambda r: r["studies_per_s_end_to_end"])
    return ranked[(len(ranked) - 1) // 2]


def _decode_files(paths: list[str]) -> float:
    start = time.perf_counter()
    for path in paths:
        decode_dicom(Path(path).read_bytes(), size=448, modalities=None)
    return time.perf_counter() - start


def effective_cores(archive: Path, num_files: int = 8) -> float:
    """How many cores' worth two processes decoding at once get here now: 2 x (one
    process's time alone) / (the slower of two at once). 2.0 on two free cores; other work
    on the machine (or a CPU quota) shows as less."""
    paths = sorted(str(p) for p in (archive / "files").rglob("*.dcm"))[:num_files]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=spawn) as pool:
        list(pool.map(_decode_files, [paths[:1], paths[:1]]))  # both started, imports done
        alone = pool.submit(_decode_files, paths).result()
        together = max(pool.map(_decode_files, [paths, paths]))
    return round(2 * alone / together, 2)


def replicate(archive: Path, out: Path, copies: int) -> Path:
    """`copies` x the MIMIC-layout studies of `archive` in `out`: copy k of study folder
    `sN` is `sN` + k (hard links to the same files). The bulk job keys MIMIC studies by
    their folder, so each copy is a study of its own, with the same pixels to decode."""
    shutil.rmtree(out, ignore_errors=True)
    for path in sorted((archive / "files").rglob("*.dcm")):
        rel = path.relative_to(archive / "files")
        for k in range(copies):
            dst = out / "files" / rel.parent.parent / f"{rel.parent.name}{k}" / rel.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, dst)
    return out


def decode_per_syntax(archive: Path, size: int) -> dict[str, dict]:
    """Per transfer syntax: one-core ms per image of `decode_dicom(data, size=size)` over
    every file of that syntax in `archive` (bytes already in memory)."""
    syntax = {}
    with open(archive / "metadata.csv") as f:
        for row in csv.DictReader(f):
            syntax[row["dicom_id"]] = row["TransferSyntax"]
    times: dict[str, list[float]] = {}
    for path in sorted((archive / "files").rglob("*.dcm")):
        data = path.read_bytes()
        start = time.perf_counter()
        decode_dicom(data, size=size, modalities=None)
        times.setdefault(syntax[path.stem], []).append(1000 * (time.perf_counter() - start))
    return {name: {"images": len(ms), "ms_per_image": round(statistics.mean(ms), 1)}
            for name, ms in sorted(times.items())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=48, help="synthetic studies in the archive")
    p.add_argument("--image-size", type=int, default=2560, help="synthetic image side")
    p.add_argument("--archive", default=None,
                   help="report this archive instead (a synthetic one: metadata.csv)")
    p.add_argument("--checkpoint", default=None, help="a saved model (else a random tiny one)")
    p.add_argument("--preset", default="tiny", help="preset of the random model")
    p.add_argument("--unit-size", type=int, default=8, help="studies per part file")
    p.add_argument("--batch-size", type=int, default=8, help="studies per model call")
    p.add_argument("--decode-cpus", type=int, default=os.cpu_count() or 1,
                   help="decode tasks at once (decode-stage)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the actor")
    p.add_argument("--decoding", default="one-step-fused")
    p.add_argument("--decode-size", type=int, default=448,
                   help="the per-syntax decode table's target side (448: Qwen2.5-VL's)")
    p.add_argument("--target", type=float, default=7.0,
                   help="studies/s a GPU actor must be fed (the decode-cores column)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each configuration, alternating (the median run is shown)")
    p.add_argument("--copies", type=int, default=1,
                   help="report N copies of the archive's studies (hard links under new study "
                        "folders): a longer run spreads the actor's start-up, as a night does")
    p.add_argument("--workdir", default=None, help="where to write (default: a temp folder)")
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="echo-bench-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.archive:
        archive = Path(args.archive)
        images = sum(1 for _ in (archive / "files").rglob("*.dcm"))
        studies = len({p.parent for p in (archive / "files").rglob("*.dcm")})
        with open(archive / "metadata.csv") as f:
            image_size = max(int(r["Rows"]) for r in csv.DictReader(f))
    else:
        archive = work / "archive"
        synth = synthesize_archive(archive, num_studies=args.studies, seed=11,
                                   image_size=args.image_size, workers=os.cpu_count() or 1)
        images, studies, image_size = synth["num_images"], args.studies, args.image_size
    syntax_archive = archive
    if args.copies > 1:
        archive = replicate(archive, work / f"archive-x{args.copies}", args.copies)
        images, studies = images * args.copies, studies * args.copies
    checkpoint = Path(args.checkpoint) if args.checkpoint else _random_checkpoint(
        args.preset, work / "model", 2000)

    syntaxes = decode_per_syntax(syntax_archive, args.decode_size)  # one core, before Ray starts
    for row in syntaxes.values():
        row["cores_for_target"] = round(args.target * row["ms_per_image"] / 1000, 2)

    import ray

    # Logical CPUs: the actor (1) and the decode tasks at once, plus one for Ray Data.
    ray.init(num_cpus=1 + args.decode_cpus + 1, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    common = [f"decoding.mode={args.decoding}", f"report.batch_size={args.batch_size}",
              f"report.unit_size={args.unit_size}", "pool.actors=1",
              "pool.cpus_per_actor=1", f"pool.threads={args.threads}",
              f"pool.decode_cpus={args.decode_cpus}"]
    cores = effective_cores(syntax_archive)
    rows, load = [], {"before": os.getloadavg()[0]}
    for repeat in range(args.repeats):  # the configurations alternate: the same load
        for name, overrides in CONFIGS.items():
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            summary = run_job(checkpoint, archive, out, common + overrides, address)
            rows.append(_row(name, repeat, summary["this_run"]))
    load["after"] = os.getloadavg()[0]
    ray.shutdown()

    runs = rows
    rows = [_median([r for r in runs if r["config"] == name]) for name in CONFIGS]
    by = {r["config"]: r for r in rows}
    speedup = {kind: (round(new / old, 2) if new and old else None)
               for kind in ("end_to_end", "warm")
               for new, old in [(by["decode-stage"][f"studies_per_s_{kind}"],
                                 by["in-actor"][f"studies_per_s_{kind}"])]}

    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    print(f"{studies} studies, {images} images at {image_size} px, unit {args.unit_size}, "
          f"batch {args.batch_size}, 1 model actor ({args.threads} torch thread), "
          f"{os.cpu_count()} cores")
    print(f"{'config':<13}{'decode':>7}{'wall s':>8}{'start s':>8}{'st/s e2e':>10}"
          f"{'st/s warm':>11}{'busy':>6}{'img/s task':>11}{'img/s all':>10}"
          f"{'RSS MB driver/decode/actor':>28}")
    for r in rows:
        rss = r["peak_rss_mb"]
        print(f"{r['config']:<13}{r['decode_cpus']:>7}{r['wall_s']:>8.1f}"
              f"{r['actor_start_s']:>8.1f}{r['studies_per_s_end_to_end']:>10.2f}{r['studies_per_s_warm']:>11.2f}"
              f"{r['actor_busy_fraction']:>6.2f}"
              f"{cell(r['decode_images_per_s_per_task'], '.1f'):>11}"
              f"{cell(r['decode_images_per_s_total'], '.1f'):>10}"
              f"{cell(rss['driver'], '.0f'):>12}/{cell(rss['decode'], '.0f')}"
              f"/{cell(rss['actor'], '.0f')}")
    print(f"speed-up decode-stage / in-actor: {speedup['end_to_end']:.2f}x end to end, "
          f"{speedup['warm']:.2f}x warm")
    print(f"two decode processes got {cores:.2f} cores' worth just before the runs (2.00: "
          f"two free cores); load average (1 min) {load['before']:.1f} before the runs, "
          f"{load['after']:.1f} after (other work on the machine shows here)"
          + (f"; median of {args.repeats} alternating runs each" if args.repeats > 1 else ""))
    print(f"\none-core decode at {image_size} px -> {args.decode_size} px, and decode cores "
          f"per GPU actor for {args.target:g} studies/s:")
    print(f"{'transfer syntax':<20}{'images':>7}{'ms/image':>10}{'cores':>7}")
    for name, r in syntaxes.items():
        print(f"{name:<20}{r['images']:>7}{r['ms_per_image']:>10.1f}"
              f"{r['cores_for_target']:>7.2f}")
    result = {
        "bench": "archive",
        "model": str(checkpoint) if args.checkpoint else f"random {args.preset}",
        "decoding": args.decoding,
        "studies": studies,
        "copies": args.copies,
        "images": images,
        "image_size": image_size,
        "unit_size": args.unit_size,
        "batch_size": args.batch_size,
        "threads_per_actor": args.threads,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "effective_cores": cores,
        "load_average_1min": load,
        "speedup": speedup,
        "rows": rows,
        "runs": runs,
        "decode_size": args.decode_size,
        "target_studies_per_s": args.target,
        "decode_per_syntax": syntaxes,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
