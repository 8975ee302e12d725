"""`echo-ray` command line: one sub-command per pipeline stage.

Each sub-command is a plain function taking parsed arguments; `COMMANDS` maps names to
(function, argument builder, help). Options are config fields: a command's flags are
declared from the config tree (`config/flags.py`: type, default and help come from the
field), and every command also takes `--preset`, `--config` and `--set KEY=VALUE`. Inputs
and outputs (`--data`, `--out`, `--checkpoint`, ...) are plain arguments. jobs/*.py run the
same commands, so `ray job submit ... python jobs/X.py` accepts exactly the CLI's arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from echo_ray.config.flags import Flag, add_flags, flag_overrides
from echo_ray.config.overrides import load_config
from echo_ray.config.schema import ConfigError, EchoConfig


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each plain argument's default (config flags show theirs in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest.startswith("cfg__") or action.default in (None, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="named config preset (tiny, base-7b)")
    p.add_argument("--config", default=None,
                   help="JSON config file, e.g. a run's echo_config.json (replaces --preset)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.image_size=224 (repeatable; applied "
             "after the other flags)",
    )


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (else local)")


def _pool_flags(replicas: str) -> tuple[Flag, ...]:
    """The actor pool of a batch-inference job (one model per actor)."""
    return (
        Flag("--actors", "pool.actors", help=replicas),
        Flag("--cpus-per-actor", "pool.cpus_per_actor"),
        Flag("--gpus-per-actor", "pool.gpus_per_actor"),
        Flag("--threads", "pool.threads"),
    )


def _multi_step_flags() -> tuple[Flag, ...]:
    return (Flag("--steps", "decoding.steps"), Flag("--threshold", "decoding.threshold"))


# Each command's config flags (the rest of its arguments are inputs and outputs).
FLAGS: dict[str, tuple[Flag, ...]] = {
    "trajectories": (
        Flag("--splits", "trajectories.splits"),
        Flag("--top-k", "trajectories.top_k"),
        *_multi_step_flags(),
        Flag("--min-repeats", "trajectories.min_repeats"),
        Flag("--batch-size", "trajectories.batch_size"),
        Flag("--fail-after-shards", "trajectories.fail_after_shards"),
        *_pool_flags("teacher replicas"),
    ),
    "evaluate": (
        Flag("--split", "evaluate.split"),
        Flag("--limit", "evaluate.limit"),
        Flag("--batch-size", "evaluate.batch_size"),
        Flag("--fluency-model", "evaluate.fluency_model"),
        Flag("--semscore-model", "evaluate.semscore_model"),
        Flag("--ratescore", "evaluate.ratescore"),
        Flag("--reference-labels", "evaluate.reference_labels"),
        *_pool_flags("model replicas per system"),
        *_multi_step_flags(),
    ),
    "report": (
        Flag("--decoding", "decoding.mode"),
        *_multi_step_flags(),
        Flag("--max-new-tokens", "decoding.max_new_tokens"),
        Flag("--batch-size", "report.batch_size"),
        Flag("--unit-size", "report.unit_size"),
        Flag("--since", "report.since", metavar="YYYY-MM-DD"),
        Flag("--fhir", "report.fhir"),
        Flag("--include-phi", "report.include_phi"),
        Flag("--retry-errors", "report.retry_errors"),
        Flag("--io-threads", "report.io_threads"),
        *_pool_flags("model replicas"),
    ),
    "serve": (
        Flag("--host", "serve.host"),
        Flag("--port", "serve.port"),
        Flag("--api-keys-file", "serve.api_keys_file", metavar="FILE"),
        Flag("--insecure", "serve.insecure"),
        Flag("--decoding", "decoding.mode", help="the default decoding mode of requests"),
        Flag("--max-new-tokens", "decoding.max_new_tokens"),
        Flag("--max-batch-size", "serve.max_batch_size"),
        Flag("--batch-wait-ms", "serve.batch_wait_timeout_s", type=float, metavar="MS",
             help="how long a replica waits for a batch to fill, in milliseconds",
             to_config=lambda ms: ms / 1000),
        Flag("--min-replicas", "serve.min_replicas"),
        Flag("--max-replicas", "serve.max_replicas"),
        Flag("--cpus-per-replica", "serve.num_cpus"),
        Flag("--gpus-per-replica", "serve.num_gpus"),
        Flag("--threads", "serve.threads"),
        Flag("--max-upload-mb", "serve.max_upload_mb"),
        Flag("--max-files", "serve.max_files"),
        Flag("--timeout-s", "serve.request_timeout_s"),
        Flag("--include-phi", "serve.include_phi"),
    ),
}


def command_config(command: str, args: argparse.Namespace) -> EchoConfig:
    """The config a command runs with: preset or file, then its flags, then `--set`."""
    overrides = [*flag_overrides(args, FLAGS.get(command, ())), *args.overrides]
    return load_config(args.preset, overrides, args.config)


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
    from echo_ray.data.prepare import prepare_shards, summarize_manifest

    manifest = prepare_shards(
        args.archive, args.out, command_config("prepare", args), s3_endpoint=args.s3_endpoint,
        ray_address=args.ray_address,
    )
    print(summarize_manifest(manifest))
    return manifest


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
        args.stage, args.data, args.out, command_config("train", args), init=args.init,
        overrides=tuple(args.overrides), s3_endpoint=args.s3_endpoint,
        ray_address=args.ray_address,
    )


# --- trajectories ------------------------------------------------------------------------------


def trajectories_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="RAD teacher: run folder or checkpoint")
    p.add_argument("--data", required=True, help="`echo-ray prepare` output (folder or s3://)")
    p.add_argument("--out", required=True,
                   help="trajectories folder (or s3://); rerunning with it skips finished shards")
    add_flags(p, FLAGS["trajectories"])
    _add_cluster_args(p)
    _add_config_args(p)


def trajectories(args: argparse.Namespace) -> dict:
    from echo_ray.distill.rollout import generate_trajectories

    return generate_trajectories(args.teacher, args.data, args.out,
                                 command_config("trajectories", args),
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
    add_flags(p, FLAGS["evaluate"])
    _add_cluster_args(p)
    _add_config_args(p)


def evaluate(args: argparse.Namespace):
    from echo_ray.eval.job import evaluate as run_evaluation
    from echo_ray.eval.systems import System

    try:
        systems = [System.parse(spec) for spec in args.systems]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    evaluation = run_evaluation(args.data, args.out, systems, command_config("evaluate", args),
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
    add_flags(p, FLAGS["report"])
    _add_cluster_args(p)
    _add_config_args(p)


def report(args: argparse.Namespace) -> dict:
    from echo_ray.batch.job import format_summary, report_archive

    summary = report_archive(args.checkpoint, args.archive, args.out,
                             command_config("report", args),
                             s3_endpoint=args.s3_endpoint, ray_address=args.ray_address)
    print(format_summary(summary))
    return summary


# --- serve -------------------------------------------------------------------------------------

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="the model directory (a run's model/, local or s3://)")
    add_flags(p, FLAGS["serve"])
    _add_cluster_args(p)
    _add_config_args(p)


def serve_cmd(args: argparse.Namespace) -> None:
    """Start the endpoint on a local Ray (or `--ray-address`) and block until Ctrl-C."""
    from echo_ray.serving.options import app_args

    config = command_config("serve", args)
    host, port = config.serve.host, config.serve.port
    if config.serve.insecure and host not in _LOOPBACK:
        print(f"echo-ray serve: --insecure serves without API keys; refused on {host} "
              f"(use {_LOOPBACK[0]}, or configure keys)", file=sys.stderr)
        raise SystemExit(2)
    from ray import serve

    from echo_ray.runtime.cluster import init_ray
    from echo_ray.serving.app import build_app

    try:
        app = build_app(app_args(config, args.checkpoint, s3_endpoint=args.s3_endpoint))
    except ValueError as e:
        print(f"echo-ray serve: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    init_ray(args.ray_address)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a backgrounded process ignores Ctrl-C's SIGINT
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="echo-ray", route_prefix="/")
        print(f"echo-ray serve: {args.checkpoint} at http://{host}:{port}/ "
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
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic archive")
    p.add_argument("--ar-steps", type=int, default=500, help="training steps of the AR stage")
    p.add_argument("--rad-steps", type=int, default=500, help="training steps of the RAD stage")
    p.add_argument("--dcd-steps", type=int, default=300, help="training steps of the DCD stage")
    p.add_argument("--trajectory-min-repeats", type=int, default=None,
                   help="drop teacher rollouts that repeat an n-gram this many times in a row "
                        "(0: keep all that end; default: trajectories.min_repeats)")
    p.add_argument("--examples", type=int, default=3, help="test images whose reports are shown")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate on the first N test images (0 = the whole test split; "
                        "default: evaluate.limit)")
    _add_config_args(p)


def quickstart(args: argparse.Namespace) -> dict:
    from echo_ray.quickstart import run_quickstart

    overrides = list(args.overrides)
    if args.trajectory_min_repeats is not None:
        overrides.insert(0, f"trajectories.min_repeats={args.trajectory_min_repeats}")
    if args.eval_limit is not None:
        overrides.insert(0, f"evaluate.limit={args.eval_limit}")
    return run_quickstart(
        args.out, preset=args.preset, config_file=args.config, overrides=overrides,
        studies=args.studies, image_size=args.image_size, seed=args.seed,
        steps={"ar": args.ar_steps, "rad": args.rad_steps, "dcd": args.dcd_steps},
        examples=args.examples,
    )


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
        p = argparse.ArgumentParser(prog=f"echo-ray {command}", description=help_text,
                                    formatter_class=_HelpFormatter)
        add_args(p)
        return p
    parser = argparse.ArgumentParser(prog="echo-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text,
                                formatter_class=_HelpFormatter))
    return parser


def run(command: str, argv: Sequence[str] | None = None) -> object:
    """Parse `argv` for one sub-command and run it (the entry point of jobs/*.py)."""
    args = build_parser(command).parse_args(argv)
    return _dispatch(command, args)


def job_entry(command: str) -> Callable[[Sequence[str] | None], object]:
    """The `main` of a jobs/*.py script: `command` with the script's arguments."""

    def main(argv: Sequence[str] | None = None) -> object:
        return run(command, sys.argv[1:] if argv is None else argv)

    return main


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
