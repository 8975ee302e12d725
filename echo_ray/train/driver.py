"""Ray Train: the vision, AR, RAD and DCD stages, streamed from DICOM shards.

    driver                                    each Ray Train worker (rank r of W)
    ------                                    -----------------------------------
    shards -> Ray Data: read, keep the        model: latest checkpoint of this run, else
    split, decode + tokenize (CPU tasks)  ->  --init, else built from the preset
    TorchTrainer(ScalingConfig, RunConfig,    DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO
    FailureConfig, datasets)                  for each step: grad_accum micro-batches from
    export the last checkpoint to RUN/model   get_dataset_shard -> loss -> clip -> AdamW ->
                                              warm-up + cosine LR; report metrics each step;
                                              validation loss, checkpoints every N steps

- Stages: "ar" trains the causal next-token objective (the baseline, and RAD's start);
  "rad" trains Response-Asymmetric Diffusion from an AR checkpoint (`init`) with the vision
  tower and projector frozen by default, as the paper.
- Metrics: every step to `RUN/metrics.jsonl` (rank 0); to Ray Train every `report_every`
  steps and with every checkpoint (a Ray Train report waits for the controller's poll, about
  2 s here: reporting every step made a 0.5 s step take 2 s).
- A checkpoint is a model directory (Hugging Face weights + tokenizer + echo_config.json, so
  `ReportGenerator.from_checkpoint` loads it) plus `train_state.pt` (step, data position,
  optimizer and LR schedule; with DeepSpeed, every rank's ZeRO shard under `deepspeed/`).
- Recovery: a failed worker group restarts (FailureConfig) from the latest checkpoint, and
  rerunning with the same `out` resumes too. The data position is (epoch, micro-batches
  consumed in it): epochs are deterministic (order preserved, shuffle seeded by epoch and
  rank), so a resumed worker skips exactly the batches it had consumed and the run
  continues as if it had never stopped.
- Rows the pipeline could not use (`ok` False) stay in their batch with no loss weight, so
  every rank still takes the same steps; they are counted (`bad_rows`) and logged. Rows
  whose report is longer than `model.max_response_len - 1` tokens are cut (the response
  ends with `<eos>`) and counted (`truncated_rows`), never silently.
- Placement: `train_summary.json` records `worker_nodes`, the Ray node id of each rank. On
  a multi-node cluster every path must be s3:// or declared shared (`shared_storage`):
  workers on other nodes read `data` and `init` and write `out`.
- Memory: `train.gradient_checkpointing` recomputes activations in the backward pass;
  DeepSpeed with bf16 trains bf16 weights (its optimizer keeps the fp32 masters); ZeRO-3
  builds or loads the model partitioned and saves it from rank 0 (worker.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from echo_ray.config.overrides import apply_overrides, from_dict
from echo_ray.config.schema import STAGES, ConfigError, EchoConfig
from echo_ray.data.ingest import training_dataset
from echo_ray.data.shards import MANIFEST, TOKENIZER_DIR
from echo_ray.data.storage import RUN_MODEL_DIR as MODEL_DIR
from echo_ray.data.storage import Location, resolve, resolve_model_dir
from echo_ray.model.checkpoint import CONFIG_FILE
from echo_ray.runtime.cluster import init_ray, require_shared_storage
from echo_ray.train.worker import DEEPSPEED_DIR, TRAIN_STATE, WORKER_NODES, train_worker

logger = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class TrainResult:
    """What a finished run left behind."""

    run: str
    """The run folder: Ray Train checkpoints, metrics.jsonl, train_summary.json, model/."""
    model: str
    """The final model directory (`RUN/model`), loadable by `ReportGenerator`."""
    checkpoint: str
    """The Ray Train checkpoint the model was exported from."""
    metrics: dict[str, Any]
    """Rank 0's metrics at the last checkpoint."""
    worker_nodes: list[str] = dataclasses.field(default_factory=list)
    """The Ray node id of each worker, by rank, in the last worker group (where it ran)."""


def train(
    stage: str,
    data: str,
    out: str,
    config: EchoConfig,
    *,
    init: str | None = None,
    overrides: tuple[str, ...] = (),
    s3_endpoint: str | None = None,
    ray_address: str | None = None,
    shared_storage: bool = False,
) -> TrainResult:
    """Train `stage` on the shards at `data`; checkpoints and the final model go to `out`.

    Args:
        stage: "vision" (the vision tower on the train split's labels), "ar", "rad" or "dcd".
        data: an `echo-ray prepare` output folder (local or s3://).
        out: the run folder (local or s3://). Rerunning with the same folder resumes from its
            latest checkpoint.
        config: the run's config (preset + overrides).
        init: the model to start from: an echo-ray checkpoint or run folder (its `model/`),
            or a plain Hugging Face Qwen2.5-VL directory. Required for "rad". With an echo-ray
            checkpoint, its saved model section is used (then `overrides` on `model.*`).
        overrides: the `key=value` strings `config` was built with (re-applied to the model
            section of an `init` checkpoint).
        shared_storage: local `data`, `out` and `init` paths are one filesystem shared by
            every Ray node; without it a multi-node cluster refuses them before training
            (`runtime.cluster.require_shared_storage`).

    Raises:
        SharedStorageError: a local path on a multi-node cluster, not declared shared.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {STAGES}")
    if stage == "rad" and init is None:
        raise ConfigError(
            "--stage rad adapts an autoregressive model: pass --init with an AR checkpoint "
            "(the --out folder of `echo-ray train --stage ar`)"
        )
    if stage == "dcd" and init is None:
        raise ConfigError(
            "--stage dcd distils a RAD teacher into a one-step student initialised from it: "
            "pass --init with the teacher checkpoint (the --out folder of `--stage rad`)"
        )
    if stage == "vision" and config.train.strategy == "deepspeed" and config.train.zero_stage == 3:
        raise ConfigError(
            "--stage vision trains a small tower and its label head, which ZeRO-3 would "
            "partition apart: use train.strategy=ddp or train.zero_stage=1 or 2 (a real "
            "checkpoint's tower needs no vision stage: start --stage ar from it)"
        )
    if config.train.attention == "flex" and stage != "ar" and not config.train.use_gpu:
        raise ConfigError(
            f"train.attention=flex trains --stage {stage} on GPU workers only (torch has no "
            "flex-attention backward on CPU): set train.use_gpu=true, or train.attention=auto "
            "or dense"
        )
    start = time.time()
    shards = resolve(data, s3_endpoint=s3_endpoint)
    run = resolve(out, s3_endpoint=s3_endpoint)
    init_loc = resolve_model_dir(init, s3_endpoint=s3_endpoint, what="--init") if init else None
    if init_loc is not None and init_loc.join(CONFIG_FILE).exists():
        config = _with_model_of(config, init_loc, overrides)
    elif init_loc is not None:  # a plain Hugging Face directory
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, pretrained_path=init_loc.uri)
        )
    tcfg = config.train
    if config.model.diagnosis_prompt and tcfg.strategy == "deepspeed" and tcfg.zero_stage == 3:
        raise ConfigError(
            "model.diagnosis_prompt keeps its label head and decision embeddings beside the "
            "backbone, which ZeRO-3 would partition apart: use train.strategy=ddp or "
            "train.zero_stage=1 or 2"
        )
    if stage == "dcd":
        _check_trajectories(shards)
    tokenizer_src = init_loc if init_loc is not None else shards.join(TOKENIZER_DIR)
    if not tokenizer_src.join(TOKENIZER_FILE).exists():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {tokenizer_src.uri}")
    tokenizer_json = tokenizer_src.join(TOKENIZER_FILE).read_text()

    init_ray(ray_address, dashboard=True)
    require_shared_storage({"--data": data, "--out": out, "--init": init},
                           shared=shared_storage, what="train")
    ray.data.DataContext.get_current().enable_progress_bars = False
    _log(stage, f"data {shards.uri} -> run {run.uri} ({tcfg.num_workers} workers, "
         f"{tcfg.strategy}, {'GPU' if tcfg.use_gpu else 'CPU'}, {tcfg.max_steps} steps)")
    datasets = {}
    for split in ("train", "validate"):
        ds = training_dataset(
            data, split, image_size=config.model.image_size, tokenizer_json=tokenizer_json,
            config=config, s3_endpoint=s3_endpoint, labels=_reads_labels(stage, config),
        )
        datasets[split] = ds.materialize() if tcfg.cache_decoded else ds
    if tcfg.cache_decoded:
        _log(stage, f"decoded and cached {datasets['train'].count()} train and "
             f"{datasets['validate'].count()} validation rows")

    worker_config = {
        "stage": stage,
        "config": config.to_dict(),
        # Locations travel with their filesystem (and the driver's S3 credentials and
        # endpoint): workers may have been started with another environment.
        "run": run,
        "init": init_loc,
        "tokenizer_files": _read_folder(shards.join(TOKENIZER_DIR)) if init_loc is None else {},
    }
    storage_path, storage_fs = _storage(run)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers,
            use_gpu=tcfg.use_gpu,
            resources_per_worker={
                "CPU": tcfg.cpus_per_worker, **({"GPU": 1} if tcfg.use_gpu else {})
            },
        ),
        torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=posixpath.basename(run.path.rstrip("/")),
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tcfg.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            execution_options=_ordered_ingest(),
        ),
    )
    result = trainer.fit()  # raises once a failure exceeds train.max_failures restarts
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    ckpt = run.join(posixpath.basename(result.checkpoint.path.rstrip("/")))
    model_dir = run.join(MODEL_DIR)
    model_dir.delete_dir()
    ckpt.copy_to(model_dir, exclude=(TRAIN_STATE, DEEPSPEED_DIR))
    metrics = dict(result.metrics or {})
    worker_nodes = [str(n) for n in metrics.pop(WORKER_NODES, None) or ()]
    summary = {
        "stage": stage,
        "run": run.uri,
        "model": model_dir.uri,
        "checkpoint": ckpt.uri,
        "init": init_loc.uri if init_loc is not None else None,
        "data": shards.uri,
        "metrics": metrics,
        "worker_nodes": worker_nodes,
        "wall_time_s": round(time.time() - start, 1),
        "config": config.run_dict(),
    }
    run.join(SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    val = metrics.get("val_loss")
    cut = metrics.get("truncated_rows")
    _log(stage, f"done in {summary['wall_time_s']} s: step {metrics.get('step')}, loss "
         f"{metrics.get('loss', float('nan')):.4f}, validation loss "
         f"{'n/a' if val is None else f'{val:.4f}'}"
         + (f", {cut} rows cut at model.max_response_len" if cut else "")
         + f"; {len(worker_nodes)} workers on {len(set(worker_nodes))} node(s)"
         + f"; model -> {model_dir.uri}")
    return TrainResult(run=run.uri, model=model_dir.uri, checkpoint=ckpt.uri, metrics=metrics,
                       worker_nodes=worker_nodes)


def _reads_labels(stage: str, config: EchoConfig) -> bool:
    """Whether `stage` reads the shards' CheXpert labels: the vision stage (its targets), and
    AR and RAD with diagnosis tokens (the prompt's findings while they learn to follow them)."""
    return stage == "vision" or (stage in ("ar", "rad") and config.model.diagnosis_prompt)


def _check_trajectories(data: Location) -> None:
    """DCD reads `echo-ray trajectories` output: refuse anything else, or an empty one, on
    the driver (a worker would only find out after the cluster has started)."""
    manifest_loc = data.join(MANIFEST)
    manifest = json.loads(manifest_loc.read_text()) if manifest_loc.exists() else {}
    if not str(manifest.get("format", "")).startswith("echo-ray-trajectories"):
        raise ConfigError(
            f"--stage dcd trains on teacher rollouts: {data.uri} is not the output of "
            "`echo-ray trajectories` (no trajectories manifest.json)"
        )
    kept = manifest.get("splits", {}).get("train", {}).get("rollouts", 0)
    if kept == 0:
        raise ConfigError(
            f"{data.uri} holds no train rollouts to distil (dropped: "
            f"{json.dumps(manifest.get('dropped', {}))}); a teacher that loops or never ends "
            "needs more training, or a looser filter (echo-ray trajectories --min-repeats)"
        )


def _with_model_of(config: EchoConfig, init: Location, overrides: tuple[str, ...]) -> EchoConfig:
    """The run's config with the model section saved in checkpoint `init`, then the user's
    `model.*` overrides: the prompt, block length and shapes must be the checkpoint's."""
    saved = from_dict(json.loads(init.join(CONFIG_FILE).read_text()))
    model = {**dataclasses.asdict(saved.model), "pretrained_path": init.uri}
    merged = from_dict({**config.to_dict(), "model": model})
    return apply_overrides(merged, [o for o in overrides if o.strip().startswith("model.")])


def _read_folder(loc: Location) -> dict[str, str]:
    if not loc.exists():
        raise FileNotFoundError(f"{loc.uri} does not exist: run `echo-ray prepare` first")
    return {name: loc.join(name).read_text() for name in loc.list_files()}


def _storage(run: Location) -> tuple[str, Any]:
    parent = posixpath.dirname(run.path.rstrip("/"))
    if run.is_s3:
        return parent, run.fs
    return parent, None


def _ordered_ingest():
    """Ingest options that keep each worker's shard in a deterministic order, so a resumed
    worker can skip exactly the batches it consumed before the failure."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _log(stage: str, message: str) -> None:
    logger.info(message)
    print(f"[echo-ray train {stage}] {message}", flush=True)
