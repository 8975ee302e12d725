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
from typing import TYPE_CHECKING

from echo_ray.config.flags import Flag, add_flags, default_text, flag_overrides
from echo_ray.config.overrides import load_config
from echo_ray.config.schema import STAGES, ConfigError, EchoConfig

if TYPE_CHECKING:
    from echo_ray.data.storage import Location


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each plain argument's default (config flags show theirs in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.dest.startswith("cfg__") or action.default in (None, argparse.SUPPRESS, []):
            return action.help
        return super()._get_help_string(action)


_CONFIG_EPILOG = (
    "Config flags show their config field and the default preset's value (and other presets' "
    "values where they differ); --preset or --config replace the defaults, flags apply on top, "
    "--set KEY=VALUE last. Every field and its documentation: echo_ray/config/schema.py."
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from echo_ray.config.presets import PRESETS

    p.add_argument("--preset", default=EchoConfig().name,
                   help=f"named config preset ({', '.join(PRESETS)})")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON config file, e.g. a run's echo_config.json (replaces --preset)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.image_size=224 (repeatable; applied "
             "after the other flags)",
    )
    p.epilog = _CONFIG_EPILOG


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--s3-endpoint", default=None, metavar="URL",
                   help="S3 endpoint, e.g. http://minio.local:9000 (else $AWS_ENDPOINT_URL, "
                        "else AWS)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="Ray cluster to join (else $RAY_ADDRESS, set inside `ray job submit`; "
                        "else a new local Ray)")
    p.add_argument("--shared-storage", action="store_true",
                   help="the local paths given are the same shared filesystem (NFS, EFS, ...) "
                        "on every Ray node; without it a multi-node cluster takes s3:// paths "
                        "only, so no output lands on one worker's disk")


def _pool_flags(replicas: str) -> tuple[Flag, ...]:
    """The actor pool of a batch-inference job (one model per actor)."""
    return (
        Flag("--actors", "pool.actors", help=replicas),
        Flag("--cpus-per-actor", "pool.cpus_per_actor"),
        Flag("--gpus-per-actor", "pool.gpus_per_actor"),
        Flag("--threads", "pool.threads"),
        Flag("--decode-cpus", "pool.decode_cpus"),
        Flag("--decode-in-actors", "pool.decode_in_actors"),
    )


def _multi_step_flags() -> tuple[Flag, ...]:
    return (Flag("--steps", "decoding.steps"), Flag("--threshold", "decoding.threshold"))


# Each command's config flags (the rest of its arguments are inputs and outputs).
FLAGS: dict[str, tuple[Flag, ...]] = {
    "prepare": (
        Flag("--rows-per-shard", "data.rows_per_shard"),
        Flag("--max-dimension", "data.max_dimension"),
        Flag("--modalities", "data.modalities"),
        Flag("--cpus-per-task", "data.num_cpus_per_task"),
        Flag("--vocab-size", "tokenizer.vocab_size"),
    ),
    "train": (
        Flag("--max-steps", "train.max_steps"),
        Flag("--batch-size", "train.batch_size"),
        Flag("--grad-accum", "train.grad_accum"),
        Flag("--lr", "train.lr"),
        Flag("--num-workers", "train.num_workers"),
        Flag("--use-gpu", "train.use_gpu"),
        Flag("--cpus-per-worker", "train.cpus_per_worker"),
        Flag("--strategy", "train.strategy"),
        Flag("--zero-stage", "train.zero_stage"),
        Flag("--precision", "train.precision"),
        Flag("--checkpoint-every", "train.checkpoint_every"),
        Flag("--eval-every", "train.eval_every"),
    ),
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
        Flag("--bootstrap-samples", "evaluate.bootstrap_samples"),
        Flag("--bootstrap-seed", "evaluate.bootstrap_seed"),
        Flag("--bootstrap-unit", "evaluate.bootstrap_unit"),
        Flag("--compare-to", "evaluate.compare_to", metavar="NAME"),
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
        Flag("--fhir-patient-ref", "report.fhir_patient_ref", metavar="TEMPLATE"),
        Flag("--include-phi", "report.include_phi"),
        Flag("--retry-errors", "report.retry_errors"),
        Flag("--io-threads", "report.io_threads"),
        Flag("--sr", "report.sr"),
        Flag("--store-sr", "report.store_sr"),
        Flag("--sr-destination", "report.sr_destination", metavar="URI"),
        *_pool_flags("model replicas"),
    ),
    "listen": (
        Flag("--ae-title", "listen.ae_title"),
        Flag("--host", "listen.host"),
        Flag("--port", "listen.port"),
        Flag("--allowed-callers", "listen.allowed_callers"),
        Flag("--quiet-s", "listen.quiet_s"),
        Flag("--destination", "listen.destination", metavar="URI"),
        Flag("--batch-size", "listen.batch_size"),
        Flag("--decoding", "decoding.mode"),
        Flag("--max-new-tokens", "decoding.max_new_tokens"),
        Flag("--threads", "pool.threads"),
    ),
    "serve": (
        Flag("--host", "serve.host"),
        Flag("--port", "serve.port"),
        Flag("--api-keys-file", "serve.api_keys_file", metavar="FILE"),
        Flag("--insecure", "serve.insecure"),
        Flag("--decoding", "decoding.mode", help="the default decoding mode of requests"),
        Flag("--modes", "serve.modes"),
        Flag("--low-confidence", "decoding.low_confidence"),
        Flag("--max-new-tokens", "decoding.max_new_tokens"),
        Flag("--max-batch-size", "serve.max_batch_size"),
        Flag("--batch-wait-ms", "serve.batch_wait_timeout_s", type=float, metavar="MS",
             help="how long a replica waits for a batch to fill, in milliseconds",
             to_config=lambda ms: ms / 1000),
        Flag("--min-replicas", "serve.min_replicas"),
        Flag("--max-replicas", "serve.max_replicas"),
        Flag("--cpus-per-replica", "serve.num_cpus"),
        Flag("--gpus-per-replica", "serve.num_gpus"),
        Flag("--decoder-min-replicas", "serve.decoder_min_replicas"),
        Flag("--decoder-max-replicas", "serve.decoder_max_replicas"),
        Flag("--cpus-per-decoder", "serve.decoder_num_cpus"),
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
    add_flags(p, FLAGS["prepare"])
    _add_cluster_args(p)
    _add_config_args(p)


def prepare(args: argparse.Namespace) -> dict:
    from echo_ray.data.prepare import prepare_shards, summarize_manifest

    manifest = prepare_shards(
        args.archive, args.out, command_config("prepare", args), s3_endpoint=args.s3_endpoint,
        ray_address=args.ray_address, shared_storage=args.shared_storage,
    )
    print(summarize_manifest(manifest))
    return manifest


# --- train -------------------------------------------------------------------------------------


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, choices=STAGES,
                   help="vision: vision tower pre-trained on the train split's labels (stands in "
                        "for a pretrained checkpoint's tower; --init of ar); ar: autoregressive "
                        "baseline; rad: block-diffusion teacher from --init (an AR run); dcd: "
                        "one-step student distilled from --init (the teacher) on `echo-ray "
                        "trajectories` output")
    p.add_argument("--data", required=True,
                   help="`echo-ray prepare` output (vision, ar, rad) or `echo-ray trajectories` "
                        "output (dcd); folder or s3://")
    p.add_argument("--out", required=True,
                   help="run folder (folder or s3://); rerunning with the same folder resumes")
    p.add_argument("--init", default=None,
                   help="start from this checkpoint, run folder or Hugging Face model directory "
                        "(required for --stage rad and dcd)")
    add_flags(p, FLAGS["train"])
    _add_cluster_args(p)
    _add_config_args(p)


def train(args: argparse.Namespace):
    from echo_ray.train.driver import train as run_training

    return run_training(
        args.stage, args.data, args.out, command_config("train", args), init=args.init,
        overrides=tuple(args.overrides), s3_endpoint=args.s3_endpoint,
        ray_address=args.ray_address, shared_storage=args.shared_storage,
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
                                 s3_endpoint=args.s3_endpoint, ray_address=args.ray_address,
                                 shared_storage=args.shared_storage)


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

    evaluation = run_evaluation(args.data, args.out, _systems(args),
                                command_config("evaluate", args),
                                s3_endpoint=args.s3_endpoint, ray_address=args.ray_address,
                                shared_storage=args.shared_storage)
    print(evaluation.table())
    if intervals := evaluation.intervals():
        print("\n" + intervals)
    return evaluation


# --- report ------------------------------------------------------------------------------------


def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="the model: a run folder or checkpoint directory (local or s3://)")
    p.add_argument("--archive", required=True,
                   help="MIMIC-style tree or flat folder of DICOM files (folder or s3://), or "
                        "a PACS: dicomweb://HOST:PORT/PATH (QIDO-RS + WADO-RS; dicomwebs:// "
                        "for https; credentials from $ECHO_RAY_DICOMWEB_USER and "
                        "$ECHO_RAY_DICOMWEB_PASSWORD, $ECHO_RAY_DICOMWEB_TOKEN or the file "
                        "$ECHO_RAY_DICOMWEB_CREDENTIALS, never on the command line)")
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
                             s3_endpoint=args.s3_endpoint, ray_address=args.ray_address,
                             shared_storage=args.shared_storage)
    print(format_summary(summary))
    return summary


# --- listen ------------------------------------------------------------------------------------


def listen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="the model directory (a run's model/, local or s3://)")
    p.add_argument("--spool", required=True,
                   help="local folder for received files, the node's ledger and the SRs it "
                        "wrote; the same folder after a restart continues where it stopped")
    add_flags(p, FLAGS["listen"])
    p.add_argument("--s3-endpoint", default=None, metavar="URL",
                   help="S3 endpoint for an s3:// --checkpoint (else $AWS_ENDPOINT_URL)")
    _add_config_args(p)


def listen(args: argparse.Namespace) -> None:
    """Run the DICOM node until SIGINT / SIGTERM."""
    from echo_ray.listener.node import run_listener

    run_listener(args.checkpoint, args.spool, command_config("listen", args),
                 s3_endpoint=args.s3_endpoint)


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

    from echo_ray.runtime.cluster import init_ray, require_shared_storage
    from echo_ray.serving.app import build_app

    try:
        app = build_app(app_args(config, args.checkpoint, s3_endpoint=args.s3_endpoint))
    except ValueError as e:
        print(f"echo-ray serve: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    init_ray(args.ray_address)
    require_shared_storage({"--checkpoint": args.checkpoint}, shared=args.shared_storage,
                           what="serve")

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
    from echo_ray.quickstart import QUICKSTART_STEPS as steps

    p.add_argument("--vision-steps", type=int, default=steps["vision"],
                   help="training steps of the vision stage (0 skips it)")
    p.add_argument("--ar-steps", type=int, default=steps["ar"],
                   help="training steps of the AR stage")
    p.add_argument("--rad-steps", type=int, default=steps["rad"],
                   help="training steps of the RAD stage")
    p.add_argument("--dcd-steps", type=int, default=steps["dcd"],
                   help="training steps of the DCD stage")
    p.add_argument("--trajectory-min-repeats", type=int, default=None,
                   help="drop teacher rollouts that repeat an n-gram this many times in a row "
                        "(0: keep all that end; trajectories.min_repeats; "
                        f"{default_text('trajectories.min_repeats')})")
    p.add_argument("--examples", type=int, default=3, help="test images whose reports are shown")
    p.add_argument("--eval-limit", type=int, default=None,
                   help="evaluate on the first N test images (0 = the whole test split; "
                        f"evaluate.limit; {default_text('evaluate.limit')})")
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
        steps={"vision": args.vision_steps, "ar": args.ar_steps, "rad": args.rad_steps,
               "dcd": args.dcd_steps},
        examples=args.examples,
    )


# --- up-front checks ---------------------------------------------------------------------------
#
# Each command checks its inputs and outputs before it imports its job or starts Ray: a wrong
# path fails in a second with one line that says what to pass instead (PathError), not after
# the cluster started. Config errors come first (the same order as the commands' own checks).

# What an existing folder holds, told by the file each stage writes into it: (kind, marker,
# prefix of the marker's JSON "format" or None, description). The names are those of
# data/shards.py, distill/rollout.py, batch/job.py, train/ and eval/tables.py
# (tests/test_cli.py checks them against those modules).
_KINDS: tuple[tuple[str, str, str | None, str], ...] = (
    ("trajectories", "manifest.json", "echo-ray-trajectories", "an `echo-ray trajectories` output"),
    ("shards", "manifest.json", "echo-ray-shards", "an `echo-ray prepare` output"),
    ("report", "summary.json", "echo-ray-archive-report", "an `echo-ray report` output"),
    ("report", "parts", None, "an `echo-ray report` output"),
    ("run", "train_summary.json", None, "an `echo-ray train` run folder"),
    ("run", "metrics.jsonl", None, "an `echo-ray train` run folder"),
    ("model", "config.json", None, "a model directory"),
    ("evaluation", "results.json", None, "an `echo-ray evaluate` output"),
    ("archive", "files", None, "a MIMIC-CXR archive"),
)
_DESCRIBE = {kind: text for kind, _, _, text in _KINDS}
_UNKNOWN = "?"  # S3 could not be asked: the check is left to the job
_PREPARE_HINT = "run `echo-ray prepare --archive ARCHIVE --out {uri}` first"
_MODEL_HINT = ("pass a run folder of `echo-ray train` (its model/ is used) or one of its "
               "checkpoint_* folders")


def _kind(loc) -> str | None:
    """The kind of folder `loc` is (see _KINDS), None when none, _UNKNOWN when S3 failed."""
    try:
        for kind, marker, fmt, _ in _KINDS:
            path = loc.join(marker)
            if not path.exists():
                continue
            if fmt is None:
                return kind
            try:
                found = str(json.loads(path.read_text()).get("format", ""))
            except (ValueError, AttributeError):
                continue
            if found.startswith(fmt):
                return kind
    except OSError:
        return _UNKNOWN
    return None


def _check_dataset(uri: str, flag: str, s3_endpoint: str | None, want: str = "shards") -> None:
    """`uri` is a finished `echo-ray prepare` output (want="shards") or trajectories folder."""
    from echo_ray.data.shards import SHARDS_DIR
    from echo_ray.data.storage import PathError, check_input_folder

    hint = (_PREPARE_HINT if want == "shards" else
            "run `echo-ray trajectories --teacher RUN_RAD --data SHARDS --out {uri}` first")
    hint = hint.format(uri=uri)
    loc = check_input_folder(uri, flag=flag, missing_hint=hint, s3_endpoint=s3_endpoint)
    kind = _kind(loc)
    if kind in (want, _UNKNOWN):
        return
    if kind == "archive":
        raise PathError(f"{flag} {uri} is a DICOM archive, not a prepared dataset: run "
                        f"`echo-ray prepare --archive {uri} --out SHARDS` and pass SHARDS")
    if want == "shards" and kind == "trajectories":
        raise PathError(f"{flag} {uri} is an `echo-ray trajectories` output (what `train "
                        "--stage dcd` reads); pass the `echo-ray prepare` output here")
    if want == "trajectories" and kind == "shards":
        raise PathError(f"{flag} {uri} is an `echo-ray prepare` output; --stage dcd trains on "
                        f"the teacher's rollouts: run `echo-ray trajectories --teacher RUN_RAD "
                        f"--data {uri} --out TRAJECTORIES` and pass TRAJECTORIES")
    if kind is not None:
        raise PathError(f"{flag} {uri} is {_DESCRIBE[kind]}, not {_DESCRIBE[want]}; {hint}")
    try:
        unfinished = loc.join(SHARDS_DIR).exists()
    except OSError:
        return
    if unfinished:
        raise PathError(f"{flag} {uri} has shards but no manifest.json (written last): the run "
                        f"that writes it did not finish; rerun it with --out {uri}")
    raise PathError(f"{flag} {uri} is not {_DESCRIBE[want]} (no manifest.json); {hint}")


def _check_model(uri: str, flag: str, s3_endpoint: str | None, hint: str = _MODEL_HINT
                 ) -> Location | None:
    """`uri` is a model directory, or a run folder with its final `model/`: the model
    directory, or None when it could not be told (S3 unreachable, an unknown folder). A
    local plain Hugging Face folder (no echo_config.json) must be a loadable Qwen2.5-VL
    checkpoint (`model.folder.check_hf_model_folder`)."""
    from echo_ray.data.storage import PathError, check_input_folder, resolve_model_dir
    from echo_ray.model.folder import CONFIG_FILE, check_hf_model_folder

    loc = check_input_folder(uri, flag=flag, missing_hint=hint, s3_endpoint=s3_endpoint)
    try:
        model = resolve_model_dir(uri, s3_endpoint=s3_endpoint, what=flag)
    except FileNotFoundError:
        pass
    except OSError:
        return None  # S3 could not be asked: the job reports it
    else:
        if not model.is_s3 and not model.join(CONFIG_FILE).exists():
            try:
                check_hf_model_folder(model.path)
            except (ValueError, FileNotFoundError) as e:
                raise PathError(f"{flag} {uri}: {e}") from None
        return model
    kind = _kind(loc)
    if kind == _UNKNOWN:
        return None
    if kind == "run":
        raise PathError(f"{flag} {uri} is a training run without its final model/ (not "
                        "finished): pass one of its checkpoint_* folders, or wait for the run")
    what = _DESCRIBE[kind] if kind else "not a model (no config.json in it or in its model/)"
    raise PathError(f"{flag} {uri} is {what}; {hint}")


def _check_trained_mode(uri: str, model: Location, mode: str) -> None:
    """A model decodes only in the modes its training stage made it for (`train.stage` in
    its echo_config.json; `decode.modes.TRAINED_MODES`): an AR mode on a diffusion model, or
    the reverse, writes garbled text, so a bulk run refuses it before it starts."""
    from echo_ray.data.storage import PathError
    from echo_ray.decode.modes import trained_modes
    from echo_ray.model.folder import CONFIG_FILE

    try:
        stage = json.loads(model.join(CONFIG_FILE).read_text()).get("train", {}).get("stage")
    except (OSError, ValueError):  # no echo-ray config (a plain HF folder), or S3 unreachable
        return
    try:
        modes = trained_modes(stage)
    except ValueError as e:  # a vision checkpoint, or an unknown stage
        raise PathError(f"--checkpoint {uri}: {e}") from None
    if mode not in modes:
        raise PathError(f"--checkpoint {uri} was trained by `--stage {stage}`: it decodes with "
                        f"{', '.join(modes)}, not {mode}; pass --decoding {modes[0]}")


def _check_archive(uri: str, flag: str, s3_endpoint: str | None) -> None:
    from echo_ray.data.storage import PathError, check_input_folder

    hint = ("pass a DICOM archive folder (a MIMIC-CXR tree or a folder of DICOM files), e.g. "
            "one written by `echo-ray synth --out FOLDER`")
    loc = check_input_folder(uri, flag=flag, missing_hint=hint, s3_endpoint=s3_endpoint)
    kind = _kind(loc)
    if kind not in (None, _UNKNOWN, "archive"):
        raise PathError(f"{flag} {uri} is {_DESCRIBE[kind]}, not a DICOM archive; {hint}")


def _check_output(uri: str, flag: str, s3_endpoint: str | None, own: str | None) -> None:
    """`uri` can take this command's output: new, or a folder of no other stage's kind."""
    from echo_ray.data.storage import PathError, check_output_folder

    loc = check_output_folder(uri, flag=flag, s3_endpoint=s3_endpoint)
    kind = _kind(loc)
    if kind in (None, _UNKNOWN, own):
        return
    again = f" (or an earlier {_DESCRIBE[own].split(' ', 1)[1]}, to continue it)" if own else ""
    raise PathError(f"{flag} {uri} is {_DESCRIBE[kind]}; writing here would mix outputs: pass "
                    f"a new folder{again}")


def _preflight(command: str, args: argparse.Namespace) -> None:
    """Check `command`'s config, then its inputs, then its outputs (see the section comment)."""
    from echo_ray.data.storage import check_input_file

    if command == "synth":
        _check_output(args.out, "--out", None, "archive")
        return
    if command == "quickstart":
        load_config(args.preset, args.overrides, args.config)
        _check_output(args.out, "--out", None, None)
        return
    config = command_config(command, args)
    ep = args.s3_endpoint
    if command == "prepare":
        _check_archive(args.archive, "--archive", ep)
        _check_output(args.out, "--out", ep, "shards")
    elif command == "train":
        _check_dataset(args.data, "--data", ep, "trajectories" if args.stage == "dcd" else "shards")
        if args.init:
            _check_model(args.init, "--init", ep, hint=(
                "pass the --out folder of an earlier `echo-ray train` (ar for rad, rad for "
                "dcd), one of its checkpoint_* folders, or a Hugging Face Qwen2.5-VL folder"))
        _check_output(args.out, "--out", ep, "run")
    elif command == "trajectories":
        _check_model(args.teacher, "--teacher", ep)
        _check_dataset(args.data, "--data", ep)
        _check_output(args.out, "--out", ep, "trajectories")
    elif command == "evaluate":
        for system in _systems(args):
            _check_model(system.path, f"--system {system.name}:", ep)
        if config.evaluate.fluency_model:
            _check_model(config.evaluate.fluency_model, "--fluency-model", ep)
        _check_dataset(args.data, "--data", ep)
        _check_output(args.out, "--out", ep, "evaluation")
    elif command == "report":
        from echo_ray.interop.dicomweb import check_dicomweb_archive, is_dicomweb

        model = _check_model(args.checkpoint, "--checkpoint", ep)
        if model is not None:
            _check_trained_mode(args.checkpoint, model, config.decoding.mode)
        if is_dicomweb(args.archive):
            check_dicomweb_archive(args.archive)
        else:
            _check_archive(args.archive, "--archive", ep)
        if config.report.store_sr and config.report.sr_destination is None \
                and not is_dicomweb(args.archive):
            raise ConfigError("--store-sr stores SRs back to a dicomweb:// --archive; with a "
                              "folder or s3:// archive also pass --sr-destination "
                              "(dicomweb://HOST:PORT/PATH or dimse://AE_TITLE@HOST:PORT)")
        _check_output(args.out, "--out", ep, "report")
    elif command == "listen":
        if not config.listen.allowed_callers:
            raise ConfigError("--allowed-callers is required: the calling AE titles (e.g. "
                              "ORTHANC,MODALITY1) this node accepts studies from; any other "
                              "caller is refused")
        _check_model(args.checkpoint, "--checkpoint", ep)
    elif command == "serve":
        _check_model(args.checkpoint, "--checkpoint", ep)
        if config.serve.api_keys_file:
            check_input_file(config.serve.api_keys_file, flag="--api-keys-file",
                             missing_hint="pass a file with one API key a line")


def _systems(args: argparse.Namespace) -> list:
    from echo_ray.eval.systems import System

    try:
        return [System.parse(spec) for spec in args.systems]
    except ValueError as e:
        raise ConfigError(str(e)) from None


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], object], Callable, str]] = {
    "synth": (synth, synth_args, "write a synthetic chest X-ray archive (MIMIC-CXR layout)"),
    "prepare": (prepare, prepare_args, "archive -> Parquet DICOM shards + tokenizer (Ray Data)"),
    "train": (train, train_args,
              "train the vision tower, the AR model, the RAD teacher or the DCD student "
              "with Ray Train"),
    "trajectories": (trajectories, trajectories_args,
                     "roll the RAD teacher out (multi-step, top-k records) for DCD (Ray Data)"),
    "evaluate": (evaluate, evaluate_args,
                 "quality (CE F1, SemScore, ROUGE-L, BLEU-4, fluency) and speed of systems"),
    "report": (report, report_args,
               "report every study of an archive exactly once, resumably (Ray Data)"),
    "listen": (listen, listen_args,
               "a DICOM node (C-STORE SCP): reports each study routed to it, sends the SR on"),
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


# What a job's interpreter must have: a `python` that is not echo-ray's environment (the
# system one, when the Ray head was started without the venv active) still imports echo_ray
# from the uploaded working dir, then fails deep inside a job.
_JOB_REQUIREMENTS = ("ray", "pyarrow", "torch", "transformers")


def job_entry(command: str) -> Callable[[Sequence[str] | None], object]:
    """The `main` of a jobs/*.py script: `command` with the script's arguments."""

    def main(argv: Sequence[str] | None = None) -> object:
        import importlib.util

        missing = [m for m in _JOB_REQUIREMENTS if importlib.util.find_spec(m) is None]
        if missing:
            print(f"echo-ray {command}: this job's python ({sys.executable}) has no "
                  f"{', '.join(missing)}: it is not echo-ray's environment. Start the Ray head "
                  "from the venv (`source .venv/bin/activate` before `ray start`), so the "
                  "job's `python` is the venv's", file=sys.stderr)
            raise SystemExit(2)
        return run(command, sys.argv[1:] if argv is None else argv)

    return main


def _dispatch(command: str, args: argparse.Namespace) -> object:
    from echo_ray.data.storage import PathError
    from echo_ray.runtime.cluster import SharedStorageError

    try:
        _preflight(command, args)
        return COMMANDS[command][0](args)
    except ConfigError as e:
        print(f"echo-ray {command}: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (PathError, SharedStorageError, FileNotFoundError, NotADirectoryError) as e:
        print(f"echo-ray {command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _dispatch(args.command, args)


if __name__ == "__main__":
    main()
