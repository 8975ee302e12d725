"""The per-worker training loop that Ray Train runs on every rank (train_worker): the model
from this run's latest checkpoint, else --init, else the preset; DDP or DeepSpeed around its
Objective; then steps, validation loss, metrics.jsonl and checkpoints (model directory plus
train_state.pt, which holds the step, the data position, optimizer and LR schedule).

Memory at scale: DDP trains fp32 weights under bf16 autocast; DeepSpeed with bf16 loads the
model in bf16 (its optimizer keeps the fp32 master copy, so no fp32 model is ever made here);
ZeRO-3 builds or loads the model partitioned over the ranks and saves the model directory
from a state dict gathered layer by layer to rank 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import Checkpoint

from echo_ray.config.overrides import from_dict
from echo_ray.config.schema import ModelConfig
from echo_ray.data.prepare import is_truncated
from echo_ray.data.storage import Location
from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.train.objectives import (
    Objective,
    lr_lambda,
    set_up_for_training,
    training_attention,
    vision_frozen,
)
from echo_ray.train.zero import (
    deepspeed_config,
    initialize_partitioned,
    partitioned_construction,
    partitioned_loading,
)

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
DEEPSPEED_DIR = "deepspeed"
METRICS_FILE = "metrics.jsonl"
# Reported to Ray Train beside rank 0's metrics (not in metrics.jsonl): the Ray node id of
# each rank, by rank; the driver writes it to train_summary.json.
WORKER_NODES = "worker_nodes"


def train_worker(cfg: dict[str, Any]) -> None:
    """The per-worker training loop (runs inside Ray Train)."""
    from echo_ray.model.hf import load_pretrained

    stage = cfg["stage"]
    config = from_dict(cfg["config"])
    tcfg = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if tcfg.torch_threads:
        torch.set_num_threads(tcfg.torch_threads)
    ray.data.DataContext.get_current().enable_progress_bars = False
    _quiet_report_log()
    device = ray.train.torch.get_device() if tcfg.use_gpu else torch.device("cpu")
    bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and tcfg.use_gpu)
    deepspeed = tcfg.strategy == "deepspeed"
    ds_config = deepspeed_config(tcfg, bf16) if deepspeed else None
    zero3 = ds_config if deepspeed and tcfg.zero_stage == 3 else None
    # The weights' training dtype, loaded as such (no second copy): DDP keeps fp32 weights
    # and runs bf16 compute under autocast; DeepSpeed with bf16 trains bf16 weights and its
    # optimizer keeps the fp32 master copy.
    model_config = dataclasses.replace(
        config.model, dtype="bfloat16" if deepspeed and bf16 else "float32"
    )

    # ---- model: this run's latest checkpoint, else --init, else built from the preset
    state: dict[str, Any] = {}
    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        ds_resume = None
        if checkpoint is not None:
            with checkpoint.as_directory() as d, partitioned_loading(zero3):
                model = load_pretrained(d, model_config)
                state = torch.load(Path(d) / TRAIN_STATE, weights_only=False)
                if deepspeed:  # keep the ZeRO shards until the engine has loaded them
                    ds_resume = Path(tmp) / DEEPSPEED_DIR
                    shutil.copytree(Path(d) / DEEPSPEED_DIR, ds_resume)
        else:
            model = _initial_model(cfg, model_config, Path(tmp), zero3)
        freeze = vision_frozen(tcfg, stage)
        set_up_for_training(model, freeze_vision=freeze,
                            gradient_checkpointing=tcfg.gradient_checkpointing,
                            freeze_language=stage == "vision")
        # the run's config records the values used and the stage (checkpoints save them)
        config = dataclasses.replace(
            config, train=dataclasses.replace(tcfg, freeze_vision=freeze, stage=stage)
        )
        tcfg = config.train
        model.config = config.model
        if zero3 is None:  # partitioned parameters are already in their dtype and place
            model.to(getattr(torch, model_config.dtype))
        model.to(device).train()

        objective = Objective(model, stage, dcd_step_weighting=tcfg.dcd_step_weighting,
                              dcd_eos_weight=tcfg.dcd_eos_weight, dcd_target=tcfg.dcd_target,
                              attention=training_attention(tcfg.attention, device))
        if state.get("label_head") is not None:  # the vision stage's probe, resumed
            objective.label_head.load_state_dict(state["label_head"])
        # the objective's own parameters (the vision stage's label head) train too
        params = [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=tcfg.lr, weight_decay=tcfg.weight_decay, betas=(0.9, 0.95)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_lambda(
                s, warmup=tcfg.warmup_steps, total=tcfg.max_steps, floor=tcfg.min_lr_ratio
            ),
        )
        if deepspeed:
            engine = _deepspeed_engine(objective, optimizer, scheduler, ds_config)
            if ds_resume is not None:
                engine.load_checkpoint(str(ds_resume), tag="state")
            runner = engine
        else:
            if state:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            runner = ray.train.torch.prepare_model(objective, move_to_device=False)
            engine = None

    loop = _Loop(cfg, config, stage, rank, world, device, bf16, model, runner, engine,
                 optimizer, scheduler, state, params, objective)
    loop.run()


def _quiet_report_log() -> None:
    """Ray Train logs every report of every rank at INFO (a line per step per worker), on a
    logger named after its module file."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # pragma: no cover - another Ray layout
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _initial_model(cfg: dict[str, Any], config: ModelConfig, tmp: Path,
                   zero3: dict[str, Any] | None):
    """The model of a run's first start: `--init` (a checkpoint or a plain Hugging Face
    folder), else built from `config`'s shapes on the prepared tokenizer. `zero3`: the
    DeepSpeed config when ZeRO-3 partitions the model as it is built or loaded."""
    from echo_ray.model.hf import build_model
    from echo_ray.text.tokenizer import load_tokenizer

    init: Location | None = cfg["init"]
    if init is not None:
        path = init.path
        if init.is_s3:
            path = str(tmp / "init")
            init.copy_to(Location(pafs.LocalFileSystem(), path, path))
        with partitioned_loading(zero3):
            return build_model(dataclasses.replace(config, pretrained_path=path))
    folder = tmp / "tokenizer"
    folder.mkdir()
    for name, text in cfg["tokenizer_files"].items():
        (folder / name).write_text(text)
    tokenizer = load_tokenizer(folder)
    if zero3 is None:
        return build_model(config, tokenizer)
    with partitioned_construction(zero3):
        model = build_model(config, tokenizer)
    initialize_partitioned(model, config.seed)
    return model


def _deepspeed_engine(objective, optimizer, scheduler, ds_config: dict[str, Any]):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False,
    )
    return engine


class _Collate(NumpyBatchCollateFn):
    """Pipeline rows -> tensors: pixels `(N, S, S)`, padded `response` / `valid` `(N, L)`,
    and `truncated` `(N,)`: usable rows whose report lost tokens to `max_response_len`;
    `labels` `(N, 14)` when the rows carry them (the vision stage; AR and RAD with diagnosis
    tokens)."""

    def __init__(self, model) -> None:
        self.image_size = model.config.image_size
        self.pad = {
            "block_length": model.block_length,
            "max_len": model.config.max_response_len,
            "eos_token_id": model.eos_token_id,
            "pad_token_id": model.pad_token_id,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from echo_ray.diffusion.noise import pad_responses
        from echo_ray.distill.records import collate_trajectories

        size = self.image_size
        extra = {}
        if "top_ids" in batch:  # DCD: the teacher's rollouts and their recorded targets
            records = [
                {"tokens": list(t), "commit_step": list(c), "top_ids": [list(x) for x in i],
                 "top_probs": [list(x) for x in p]}
                for t, c, i, p in zip(batch["tokens"], batch["commit_step"], batch["top_ids"],
                                      batch["top_probs"], strict=True)
            ]
            response, valid, commit_step, top_ids, top_probs = collate_trajectories(
                records, **self.pad
            )
            extra = {"commit_step": commit_step, "top_ids": top_ids, "top_probs": top_probs}
        else:
            response, valid = pad_responses([list(t) for t in batch["tokens"]], **self.pad)
        if "labels" in batch:  # the vision stage's targets, or the diagnosis slots' findings
            extra["labels"] = torch.from_numpy(
                np.stack([np.asarray(x, np.float32) for x in batch["labels"]])
            )
        ok = torch.as_tensor(np.asarray(batch["ok"], bool))
        valid[~ok] = False  # unusable rows: in the batch, with no loss weight
        cut = [is_truncated(len(t), self.pad["max_len"]) for t in batch["tokens"]]
        truncated = torch.as_tensor(cut, dtype=torch.bool) & ok
        pixels = np.stack([np.asarray(p, np.float32) for p in batch["pixels"]])
        return {
            "pixels": torch.from_numpy(pixels.reshape(-1, size, size)),
            "response": response,
            "valid": valid,
            **extra,
            "ok": ok,
            "truncated": truncated,
            "dicom_id": [str(x) for x in batch["dicom_id"]],
            "error": [str(x) for x in batch["error"]],
        }


class _Loop:
    """Steps, evaluation, metrics and checkpoints of one worker."""

    def __init__(self, cfg, config, stage, rank, world, device, bf16, model, runner, engine,
                 optimizer, scheduler, state, params, objective):
        self.cfg, self.config, self.tcfg, self.stage = cfg, config, config.train, stage
        self.rank, self.world, self.device, self.bf16 = rank, world, device, bf16
        self.model, self.runner, self.engine = model, runner, engine
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params, self.objective = params, objective
        self.step = int(state.get("step", 0))
        self.epoch = int(state.get("epoch", 0))
        self.batches_in_epoch = int(state.get("batches_in_epoch", 0))
        self.bad_rows = int(state.get("bad_rows", 0))
        self.truncated_rows = int(state.get("truncated_rows", 0))
        self.resumed_from = self.step if state else None
        self.run_dir: Location = cfg["run"]
        self.log = (
            _MetricsLog(self.run_dir.join(METRICS_FILE), self.resumed_from) if rank == 0 else None
        )
        self.last_val: float | None = state.get("val_loss")
        self.worker_nodes = self._gather(ray.get_runtime_context().get_node_id())

    # ---- data

    def _batches(self, split: str, seed: int | None, shuffle: bool):
        shard = ray.train.get_dataset_shard(split)
        return shard.iter_torch_batches(
            batch_size=self.tcfg.batch_size,
            collate_fn=_Collate(self.model),
            drop_last=split == "train",
            local_shuffle_buffer_size=self.tcfg.shuffle_buffer if shuffle else None,
            local_shuffle_seed=seed if shuffle else None,
            prefetch_batches=2,
        )

    # ---- one micro-batch

    def _loss(self, batch, generator) -> torch.Tensor:
        pixel_values = self.model.preprocess_images(batch["pixels"].to(self.device))
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.bf16 and self.engine is None):
            extra = {k: batch[k].to(self.device)
                     for k in ("commit_step", "top_ids", "top_probs", "labels") if k in batch}
            return self.runner(
                pixel_values, batch["response"].to(self.device), batch["valid"].to(self.device),
                generator, **extra,
            )

    def _generator(self, *key: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(
            hash((self.tcfg.seed, self.rank, *key)) % (2**62)
        )

    def _tokens(self, batch) -> int:
        if self.stage == "vision":  # image tokens only
            return batch["pixels"].shape[0] * self.model.num_image_tokens
        length = batch["response"].shape[1]
        seq = self.model.prompt_length + (2 * length if self.stage != "ar" else length)
        return batch["response"].shape[0] * seq

    # ---- the loop

    def run(self) -> None:
        tcfg = self.tcfg
        if self.log is not None and self.resumed_from is not None:
            self.log.add({"event": "resumed", "step": self.step, "epoch": self.epoch,
                          "batches_in_epoch": self.batches_in_epoch, "time": time.time()})
        # A step may span two epochs (grad_accum > 1); checkpoints are taken at step ends, so
        # a resumed worker always starts at a step boundary.
        micro, step_loss, step_tokens, t0 = 0, 0.0, 0, time.perf_counter()
        step_bad = step_truncated = 0
        while self.step < tcfg.max_steps:
            skip, consumed = self.batches_in_epoch, 0
            batches = self._batches(
                "train", seed=tcfg.seed * 100_003 + self.epoch, shuffle=bool(tcfg.shuffle_buffer)
            )
            for batch in batches:
                consumed += 1
                if consumed <= skip:  # resumed mid-epoch: these were trained on already
                    continue
                if (
                    tcfg.fail_at_step and self.resumed_from is None
                    and self.step + 1 == tcfg.fail_at_step and self.rank == tcfg.fail_rank
                ):
                    raise RuntimeError(
                        f"fault drill: rank {self.rank} fails at step {self.step + 1}"
                    )
                step_bad += int((~batch["ok"]).sum())
                if self.stage != "vision":  # the vision stage reads no report
                    step_truncated += int(batch["truncated"].sum())
                for i in np.flatnonzero(~batch["ok"].numpy()):
                    logger.warning("rank %d skipped row %s: %s", self.rank, batch["dicom_id"][i],
                                   batch["error"][i])
                generator = self._generator(self.step, micro)
                loss = self._backward(batch, generator, last=micro + 1 == tcfg.grad_accum)
                step_loss += loss
                step_tokens += self._tokens(batch)
                micro += 1
                if micro < tcfg.grad_accum:
                    continue
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                grad_norm = self._optimizer_step()
                self.step += 1
                elapsed = time.perf_counter() - t0
                self.batches_in_epoch = consumed
                self._end_step(step_loss / micro, step_tokens, step_bad, step_truncated, lr,
                               grad_norm, elapsed)
                micro, step_loss, step_tokens, t0 = 0, 0.0, 0, time.perf_counter()
                step_bad = step_truncated = 0
                if self.step >= tcfg.max_steps:
                    break
            else:
                if consumed == 0:
                    raise RuntimeError(
                        f"the train split gives worker {self.rank} no full batch of "
                        f"{tcfg.batch_size} rows: lower train.batch_size or train.num_workers"
                    )
                self.epoch += 1
                self.batches_in_epoch = 0
                continue
            break

    def _backward(self, batch, generator, last: bool) -> float:
        if self.engine is not None:  # DeepSpeed scales by grad_accum and steps at boundaries
            loss = self._loss(batch, generator)
            self.engine.backward(loss)
            return float(loss.detach())
        defer_sync = not last and hasattr(self.runner, "no_sync")
        with self.runner.no_sync() if defer_sync else contextlib.nullcontext():
            loss = self._loss(batch, generator)
            (loss / self.tcfg.grad_accum).backward()
        return float(loss.detach())

    def _optimizer_step(self) -> float:
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        params = self.params
        if self.tcfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _end_step(
        self, loss: float, tokens: int, bad: int, truncated: int, lr: float, grad_norm: float,
        elapsed: float,
    ) -> None:
        tcfg = self.tcfg
        totals = self._all_reduce([loss, tokens, bad, truncated])
        self.bad_rows += int(totals[2])
        self.truncated_rows += int(totals[3])
        metrics = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": totals[0] / self.world,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": totals[1] / max(elapsed, 1e-9),
            "step_time_s": elapsed,
            "bad_rows": self.bad_rows,
            "truncated_rows": self.truncated_rows,
        }
        final = self.step >= tcfg.max_steps
        if final or (tcfg.eval_every and self.step % tcfg.eval_every == 0):
            self.last_val = self._evaluate()
            if self.last_val is not None:  # None: the validation split is empty
                metrics["val_loss"] = self.last_val
        if self.resumed_from is not None:
            metrics["resumed_from"] = self.resumed_from
        if self.log is not None:
            self.log.add({**metrics, "time": time.time()})
            if final or self.step % 10 == 0 or self.step == 1:
                val = f" val {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
                cut = f" truncated rows {self.truncated_rows}" if self.truncated_rows else ""
                # to the process's real stdout: Ray Train's patched print would log it twice
                print(f"[echo-ray train {self.stage}] step {self.step}/{tcfg.max_steps} epoch "
                      f"{self.epoch} loss {metrics['loss']:.4f}{val} lr {metrics['lr']:.2e} "
                      f"{metrics['tokens_per_s']:.0f} tok/s bad rows {self.bad_rows}{cut}",
                      file=sys.__stdout__, flush=True)
        reported = {**metrics, WORKER_NODES: self.worker_nodes}
        if final or (tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0):
            self._checkpoint(reported)
        elif tcfg.report_every and self.step % tcfg.report_every == 0:
            ray.train.report(reported)

    def _all_reduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(t)
        return t.tolist()

    def _gather(self, value: str) -> list[str]:
        """`value` of every rank, by rank (every rank takes part)."""
        if self.world == 1 or not dist.is_initialized():
            return [value]
        values: list[str | None] = [None] * self.world
        dist.all_gather_object(values, value)
        return [str(v) for v in values]

    @torch.no_grad()
    def _evaluate(self) -> float | None:
        """Mean validation loss over up to `eval_batches` batches per worker, fixed noise."""
        self.model.eval()
        total, rows = 0.0, 0
        for i, batch in enumerate(self._batches("validate", seed=None, shuffle=False)):
            if i >= self.tcfg.eval_batches:
                break
            n = int(batch["ok"].sum())
            if n == 0:
                continue
            loss = self._loss(batch, self._generator(-1, i))
            total += float(loss) * n
            rows += n
        self.model.train()
        total, rows = self._all_reduce([total, rows])
        return total / rows if rows else None

    def _checkpoint(self, metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp)
            if self.engine is not None:
                self.engine.save_checkpoint(str(path / DEEPSPEED_DIR), tag="state")
                self._save_model_deepspeed(path)
            elif self.rank == 0:
                save_checkpoint(self.model, path, self.config)
            if self.rank == 0:
                torch.save(
                    {
                        "stage": self.stage,
                        "step": self.step,
                        "epoch": self.epoch,
                        "batches_in_epoch": self.batches_in_epoch,
                        "bad_rows": self.bad_rows,
                        "truncated_rows": self.truncated_rows,
                        "val_loss": self.last_val,
                        "optimizer": self.optimizer.state_dict() if self.engine is None else None,
                        "scheduler": self.scheduler.state_dict() if self.engine is None else None,
                        "label_head": (self.objective.label_head.state_dict()
                                       if self.stage == "vision" else None),
                    },
                    path / TRAIN_STATE,
                )
                self.log.flush()
            has_files = any(path.iterdir())
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(tmp) if has_files else None,
                checkpoint_dir_name=f"checkpoint_{self.step:07d}",
            )

    def _save_model_deepspeed(self, path: Path) -> None:
        if self.tcfg.zero_stage == 3:
            # Every rank takes part; the parameters are gathered one module at a time to
            # rank 0 only (in their training dtype), never the whole model on every rank.
            state = self.engine._zero3_consolidated_16bit_state_dict()
            if self.rank == 0:
                prefix = "model.backbone."  # Objective.model.backbone: the HF model
                weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                save_checkpoint(self.model, path, self.config, state_dict=weights)
        elif self.rank == 0:
            save_checkpoint(self.model, path, self.config)


class _MetricsLog:
    """`metrics.jsonl` of a run (rank 0): one JSON object per step, plus events. On resume the
    rows after the restored step are dropped, so the file reads as one continuous run."""

    def __init__(self, loc: Location, resumed_from: int | None) -> None:
        self.loc = loc
        self.rows: list[str] = []
        if resumed_from is not None and loc.exists():
            for line in loc.read_text().splitlines():
                row = json.loads(line)
                if row.get("step", 0) <= resumed_from:
                    self.rows.append(line)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(json.dumps(row, default=float))
        if len(self.rows) % 10 == 0:
            self.flush()

    def flush(self) -> None:
        self.loc.write_text("\n".join(self.rows) + "\n")
