"""Ray Train: the streamed input pipeline, AR and RAD runs, checkpoints, fault recovery, jobs/."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers.prepared_shards import edit_first_shard, prepare_test_shards
from helpers.processes import stop_process_group
from safetensors.torch import load_file

from echo_ray.cli import main, run
from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import ConfigError, EchoConfig
from echo_ray.data.ingest import training_dataset
from echo_ray.decode.predictor import ReportGenerator
from echo_ray.model.checkpoint import load_checkpoint, load_config, save_checkpoint
from echo_ray.model.diagnosis import DIAGNOSIS_FILE
from echo_ray.model.hf import build_model
from echo_ray.text.tokenizer import load_tokenizer
from echo_ray.train.driver import MODEL_DIR, train
from echo_ray.train.objectives import lr_lambda
from echo_ray.train.worker import METRICS_FILE

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
# Small and quick: 56 px images (4 image tokens), short responses, 2 workers, 2 rows each.
SETTINGS = (
    "model.image_size=56",
    "model.max_response_len=32",
    "train.num_workers=2",
    "train.batch_size=2",
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.shuffle_buffer=8",
    "train.lr=3e-3",
)
BROKEN = {"not_dicom": 2, "no_report": 1}


def _config(*extra: str) -> EchoConfig:
    return apply_overrides(EchoConfig.from_name("tiny"), [*SETTINGS, *extra])


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory):
    """Prepared shards with bad rows planted in the train split after prepare (a DICOM
    corrupted in storage, twice, and a row with no report)."""
    out = prepare_test_shards(tmp_path_factory, num_studies=24, seed=11, image_size=96,
                              overrides=["data.rows_per_shard=8"])

    def plant(rows):
        train_rows = [r for r in rows if r["split"] == "train"]
        assert len(train_rows) >= 3
        for r in train_rows[:2]:
            r["dicom"] = b"not a DICOM file at all" * 10
        train_rows[2]["report_normalized"] = ""
        return {r["dicom_id"] for r in train_rows[:3]}

    return out, edit_first_shard(out, plant)


@pytest.fixture(scope="module")
def ar_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ar"
    result = train("ar", str(shards[0]), str(out), _config())
    return out, result


def _metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def _steps(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _metric_rows(run) if "event" not in r}


# ---------------------------------------------------------------------- pure pieces


def test_unknown_set_key_is_refused_with_the_allowed_keys(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--stage", "ar", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
              "--set", "train.learning_rate=1e-3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.learning_rate'" in err
    assert "'lr'" in err  # the allowed keys are listed


def test_rad_without_init_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--init"):
        train("rad", str(tmp_path), str(tmp_path / "r"), _config())


def test_vision_stage_under_zero3_is_refused_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="ZeRO-3"):
        train("vision", str(tmp_path), str(tmp_path / "r"),
              _config("train.strategy=deepspeed", "train.zero_stage=3"))


@pytest.mark.parametrize("stage", ["rad", "dcd"])
def test_flex_attention_for_block_diffusion_on_cpu_is_refused_before_ray(tmp_path, stage):
    # torch has no flex-attention backward on CPU; AR's "flex" is causal SDPA, which has one
    with pytest.raises(ConfigError, match="train.use_gpu=true"):
        train(stage, str(tmp_path), str(tmp_path / "r"), _config("train.attention=flex"),
              init=str(tmp_path))


def test_train_config_validates_strategy_and_sizes():
    with pytest.raises(ConfigError, match="train.strategy"):
        _config("train.strategy=fsdp")
    with pytest.raises(ConfigError, match="train.batch_size"):
        _config("train.batch_size=0")


# ---------------------------------------------------------------------- the input pipeline


def test_training_dataset_decodes_tokenizes_and_flags_bad_rows(shards):
    out, bad_ids = shards
    tokenizer = load_tokenizer(out / "tokenizer")
    ds = training_dataset(
        str(out), "train", image_size=56,
        tokenizer_json=(out / "tokenizer" / "tokenizer.json").read_text(), config=EchoConfig(),
    )
    rows = ds.take_all()
    shard_rows = pq.read_table(out / "shards").to_pylist()
    expected = {r["dicom_id"]: r for r in shard_rows if r["split"] == "train"}
    assert {r["dicom_id"] for r in rows} == set(expected)  # exactly the train split
    for row in rows:
        if row["dicom_id"] in bad_ids:
            assert not row["ok"]
            assert row["error"] in BROKEN
            continue
        assert row["ok"] and row["error"] == ""
        pixels = np.asarray(row["pixels"])
        assert pixels.shape == (56 * 56,) and 0 <= pixels.min() and pixels.max() <= 1
        assert pixels.std() > 0.01  # an image, not a blank
        report = expected[row["dicom_id"]]["report_normalized"]
        assert list(row["tokens"]) == tokenizer(report, add_special_tokens=False)["input_ids"]
    errors = sorted(r["error"] for r in rows if not r["ok"])
    assert errors == ["no_report", "not_dicom", "not_dicom"]


def test_training_dataset_needs_a_finished_prepare(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        training_dataset(str(tmp_path), "train", image_size=56, tokenizer_json="{}",
                         config=EchoConfig())


# ---------------------------------------------------------------------- runs


def test_two_worker_ar_run_checkpoints_a_loadable_model(ar_run, shards):
    run, result = ar_run
    assert Path(result.model) == run / MODEL_DIR
    steps = _steps(run)
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in steps.values())
    for step, row in steps.items():  # the schedule's rate for the step that used it
        assert row["lr"] == pytest.approx(3e-3 * lr_lambda(step - 1, warmup=1, total=4,
                                                            floor=0.1))
    assert "val_loss" in steps[2] and "val_loss" in steps[4]
    # the three planted rows were counted, and training went on
    assert steps[4]["bad_rows"] >= 1
    # Every report is longer than model.max_response_len=32 tokens (68 and more): each usable
    # row a step consumed (2 workers x 2 rows) is counted as cut, cumulatively, as bad_rows.
    for step, row in steps.items():
        assert row["truncated_rows"] + row["bad_rows"] == 4 * step
    assert result.metrics["step"] == 4
    checkpoints = sorted(p.name for p in run.glob("checkpoint_*") if p.is_dir())
    assert checkpoints == ["checkpoint_0000002", "checkpoint_0000004"]
    assert (run / "checkpoint_0000004" / "train_state.pt").is_file()
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["stage"] == "ar" and summary["metrics"]["step"] == 4
    assert summary["metrics"]["truncated_rows"] == steps[4]["truncated_rows"] > 0
    # where each rank ran: this one-node cluster's node, twice (tests/test_multinode.py: two)
    assert summary["worker_nodes"] == result.worker_nodes and len(result.worker_nodes) == 2
    assert all("worker_nodes" not in row for row in steps.values())

    # the exported model is the last checkpoint's, and the product loads it
    model, config = load_checkpoint(run / MODEL_DIR)
    assert config.train.num_workers == 2 and config.model.image_size == 56
    last = load_file(run / "checkpoint_0000004" / "model.safetensors")
    for name, value in load_file(run / MODEL_DIR / "model.safetensors").items():
        assert torch.equal(value, last[name])
    generator = ReportGenerator.from_checkpoint(run / MODEL_DIR, decoding="ar",
                                                max_new_tokens=16)
    dicom = pq.read_table(shards[0] / "shards", columns=["dicom", "split"]).to_pylist()
    blobs = [r["dicom"] for r in dicom if r["split"] != "train"][:2]
    reports = generator.generate_dicom(blobs)
    assert len(reports) == 2 and all(0 < r["num_tokens"] <= 16 for r in reports)


def test_training_changes_the_weights_it_should(ar_run, tmp_path):
    run, _ = ar_run
    first = load_file(run / "checkpoint_0000002" / "model.safetensors")
    last = load_file(run / "checkpoint_0000004" / "model.safetensors")
    changed = [name for name in last if not torch.equal(first[name], last[name])]
    assert any("visual" in n for n in changed)  # AR trains the vision tower
    assert any(n.startswith("model.layers.") for n in changed)


def test_a_failed_worker_resumes_from_the_checkpoint_with_the_same_data(ar_run, shards,
                                                                         tmp_path):
    clean_run, _ = ar_run
    run = tmp_path / "ar_fail"
    # rank 1 raises before step 3; the last checkpoint is step 2
    result = train("ar", str(shards[0]), str(run), _config("train.fail_at_step=3"))
    assert result.metrics["step"] == 4
    rows = _metric_rows(run)
    events = [r for r in rows if r.get("event") == "resumed"]
    assert [e["step"] for e in events] == [2]  # resumed from the checkpoint, not step 0
    assert events[0]["batches_in_epoch"] == 2
    resumed = _steps(run)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed[4]["resumed_from"] == 2
    # Same data position and state: the steps after the restart see the same batches and
    # noise as the uninterrupted run, so their losses are the same numbers.
    clean = _steps(clean_run)
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(clean[step]["loss"], rel=1e-5)
        assert resumed[step]["truncated_rows"] == clean[step]["truncated_rows"]
    a = load_file(run / MODEL_DIR / "model.safetensors")
    b = load_file(clean_run / MODEL_DIR / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_vision_stage_trains_the_tower_on_the_labels_and_ar_starts_from_it(shards, tmp_path):
    run = tmp_path / "vision"
    result = train("vision", str(shards[0]), str(run), _config("train.max_steps=2"))
    assert result.metrics["step"] == 2 and math.isfinite(result.metrics["loss"])
    first = load_file(run / "checkpoint_0000002" / "model.safetensors")
    _, config = load_checkpoint(run / MODEL_DIR)
    assert config.train.stage == "vision" and config.train.freeze_vision is False
    # a vision checkpoint writes no reports: refused, with the way out
    with pytest.raises(ValueError, match="writes no reports.*--stage ar"):
        ReportGenerator.from_checkpoint(run / MODEL_DIR)
    ar = tmp_path / "ar_from_vision"
    train("ar", str(shards[0]), str(ar), _config("train.max_steps=1"), init=str(run))
    assert json.loads((ar / "train_summary.json").read_text())["init"] == str(run / MODEL_DIR)
    started = load_file(ar / "checkpoint_0000001" / "model.safetensors")
    assert set(started) == set(first)  # the label head is not part of the model
    # the vision stage trained the tower and left the language model as built (same seed)
    # (the run's config names the run as its pretrained path: build from the test's own)
    save_checkpoint(build_model(_config().model, load_tokenizer(shards[0] / "tokenizer")),
                    tmp_path / "built", _config())
    built = load_file(tmp_path / "built" / "model.safetensors")
    fixed = [k for k in first if "visual" not in k]
    assert fixed and all(torch.equal(first[k], built[k]) for k in fixed)
    assert any(not torch.equal(first[k], built[k]) for k in first if "visual" in k)


def test_rad_starts_from_the_ar_run_with_the_vision_tower_frozen(ar_run, shards, tmp_path):
    ar, _ = ar_run
    run = tmp_path / "rad"
    result = train("rad", str(shards[0]), str(run), _config("train.max_steps=2"), init=str(ar))
    assert result.metrics["step"] == 2 and math.isfinite(result.metrics["loss"])
    before = load_file(ar / MODEL_DIR / "model.safetensors")
    after = load_file(run / MODEL_DIR / "model.safetensors")
    visual = [k for k in after if "visual" in k]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    text = [k for k in after if k.startswith("model.layers.")]
    assert any(not torch.equal(before[k], after[k]) for k in text)
    _, config = load_checkpoint(run / MODEL_DIR)
    assert config.train.freeze_vision is True  # the value the run used, recorded
    assert config.train.stage == "rad"  # servers offer the modes of the stage (decode.modes)
    assert config.model.image_size == 56  # the AR checkpoint's model section


def test_rad_trains_the_vision_tower_when_the_config_says_so_with_checkpointing(
    ar_run, shards, tmp_path
):
    ar, _ = ar_run
    run = tmp_path / "rad_unfrozen"
    result = train("rad", str(shards[0]), str(run), _config(
        "train.max_steps=1", "train.freeze_vision=false", "train.gradient_checkpointing=true"),
        init=str(ar))
    assert result.metrics["step"] == 1 and math.isfinite(result.metrics["loss"])
    before = load_file(ar / MODEL_DIR / "model.safetensors")
    after = load_file(run / MODEL_DIR / "model.safetensors")
    visual = [k for k in after if "visual" in k]
    assert any(not torch.equal(before[k], after[k]) for k in visual)  # not overridden
    _, config = load_checkpoint(run / MODEL_DIR)
    assert config.train.freeze_vision is False and config.train.gradient_checkpointing


# ---------------------------------------------------------------------- ray job submit


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path):
    """A separate `ray start --head --block` cluster, stopped by killing the process group this
    test started (never `ray stop`, which would stop every Ray on the machine)."""
    ray_bin = Path(sys.executable).parent / "ray"
    gcs, dashboard, client, agent, metrics = _free_ports(5)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0",
           # the job's `python` is this environment's, as for a user with the venv active
           "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # its own temp dir (short: Ray's socket paths have a length limit), so its address file
    # never points other `ray.init()` calls of this machine at it
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}",
         f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", "--num-cpus=4", "--include-dashboard=true"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            status = subprocess.run([str(ray_bin), "job", "list", "--address", address],
                                    env=env, capture_output=True, text=True)
            if status.returncode == 0:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(2)
        else:
            pytest.fail("ray head did not come up")
        yield address, env
    finally:
        stop_process_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_jobs_train_runs_through_ray_job_submit(ray_head, shards, tmp_path):
    address, env = ray_head
    ray_bin = Path(sys.executable).parent / "ray"
    run = tmp_path / "job_run"
    cmd = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--", "python", "jobs/train.py", "--stage", "ar", "--data", str(shards[0]),
           "--out", str(run), *[a for s in SETTINGS for a in ("--set", s)],
           "--set", "train.max_steps=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert sorted(_steps(run)) == [1, 2]
    assert (run / MODEL_DIR / "model.safetensors").is_file()
    shutil.rmtree(run)


# ---------------------------------------------------------------------- DeepSpeed, GPU


NEEDS_DEEPSPEED = pytest.mark.skipif(
    not os.environ.get("ECHO_RAY_TEST_DEEPSPEED"),
    reason="DeepSpeed JIT-compiles its CPU comm op on first use (about 70 s); "
    "set ECHO_RAY_TEST_DEEPSPEED=1 to run",
)


@pytest.mark.slow
@NEEDS_DEEPSPEED
def test_zero3_builds_and_loads_the_model_partitioned(tmp_path, monkeypatch):
    """One process group of one rank (gloo): what each ZeRO-3 worker does before
    `deepspeed.initialize`."""
    import torch.distributed as dist
    from helpers.tiny_dvlm import make_model

    from echo_ray.config.schema import TrainConfig
    from echo_ray.model.checkpoint import save_checkpoint
    from echo_ray.model.hf import load_pretrained
    from echo_ray.train.worker import _initial_model
    from echo_ray.train.zero import deepspeed_config, partitioned_loading

    for key, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    port = _free_ports(1)[0]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        import deepspeed

        ds_config = deepspeed_config(TrainConfig(zero_stage=3, batch_size=1), bf16=False)
        reference = make_model()
        config = reference.config
        (tmp_path / "tokenizer").mkdir()
        reference.tokenizer.save_pretrained(tmp_path / "tokenizer")
        files = {p.name: p.read_text() for p in (tmp_path / "tokenizer").iterdir()}
        (tmp_path / "build").mkdir()
        built = _initial_model({"init": None, "tokenizer_files": files}, config,
                               tmp_path / "build", ds_config)
        save_checkpoint(reference, tmp_path / "checkpoint")
        with partitioned_loading(ds_config):
            loaded = load_pretrained(tmp_path / "checkpoint", config)
        for model in (built, loaded):  # every parameter is a partition, none held whole
            params = list(model.parameters())
            assert all(hasattr(p, "ds_id") for p in params)
            assert sum(p.numel() for p in params) == 0
            assert sum(p.ds_numel for p in params) == sum(
                p.numel() for p in reference.parameters())
        with deepspeed.zero.GatheredParameters(list(loaded.parameters())):
            weights = {k: v.clone() for k, v in loaded.state_dict().items()}
        assert all(torch.equal(weights[k], v) for k, v in reference.state_dict().items())
        # built at random as transformers initialises it (N(0, 0.02)), not torch's defaults
        embedding = built.backbone.get_input_embeddings().weight
        with deepspeed.zero.GatheredParameters([embedding]):
            std = float(embedding.detach().std())
        expected = float(reference.backbone.get_input_embeddings().weight.std())
        assert std == pytest.approx(expected, rel=0.1)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@NEEDS_DEEPSPEED
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_trains_and_resumes_on_cpu(shards, tmp_path, zero_stage):
    run = tmp_path / f"zero{zero_stage}"
    result = train("ar", str(shards[0]), str(run), _config(
        "train.strategy=deepspeed", f"train.zero_stage={zero_stage}", "train.fail_at_step=3"))
    assert result.metrics["step"] == 4 and math.isfinite(result.metrics["loss"])
    assert [e["step"] for e in _metric_rows(run) if e.get("event") == "resumed"] == [2]
    ckpt = run / "checkpoint_0000004"
    assert len(list((ckpt / "deepspeed").rglob("*optim_states.pt"))) == 2  # one per rank
    model, _ = load_checkpoint(run / MODEL_DIR)  # a consolidated HF model directory
    # it holds the trained weights: those of the ZeRO shards (fp32 training: the masters)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state")
    prefix = "model.backbone."  # the engine wraps the Objective
    trained = {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix)}
    saved = model.backbone.state_dict()
    assert trained and set(trained) <= set(saved)
    for name, value in trained.items():
        assert torch.equal(saved[name], value), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_one_gpu_worker_trains_in_bf16(shards, tmp_path, strategy):
    run = tmp_path / strategy
    result = train("ar", str(shards[0]), str(run), _config(
        "train.num_workers=1", "train.use_gpu=true", f"train.strategy={strategy}",
        "train.precision=bf16"))
    assert result.metrics["step"] == 4 and math.isfinite(result.metrics["loss"])
    generator = ReportGenerator.from_checkpoint(run / MODEL_DIR, decoding="one-step-fused")
    assert generator.generate(np.zeros((1, 56, 56), np.float32))[0]["num_tokens"] > 0


@pytest.mark.slow
def test_quickstart_runs_the_whole_pipeline_and_ends_with_the_evaluation_table(
    ray_cluster, tmp_path, capsys
):
    # Toy size: 8-token reports (block 4) let a 40-step RAD teacher finish its rollouts; the
    # repetition filter is off, as such a teacher still loops.
    settings = [*SETTINGS, "model.max_response_len=8", "model.block_length=4",
                "train.checkpoint_every=100", "train.eval_every=100"]
    out = tmp_path / "qs"
    try:
        summary = run("quickstart", [
            "--out", str(out), "--studies", "16", "--image-size", "96", "--vision-steps", "2",
            "--ar-steps", "2",
            "--rad-steps", "80", "--dcd-steps", "2", "--examples", "2",
            "--trajectory-min-repeats", "0", *[a for s in settings for a in ("--set", s)],
        ])
    except SystemExit as e:  # the stage and the reason, in the failure's summary line
        captured = capsys.readouterr()
        stages = [line for line in captured.out.splitlines() if re.match(r"\[\d+/9\]", line)]
        err = captured.err.strip().splitlines()[-3:] or ["(nothing on stderr)"]
        pytest.fail(f"quickstart exited {e.code} in {stages[-1] if stages else 'no stage'}: "
                    + " | ".join(err)[-800:])
    printed = capsys.readouterr().out
    for header in ("[1/9] synth", "[2/9] prepare", "[3/9] train vision", "[4/9] train ar",
                   "[5/9] train rad", "[6/9] trajectories", "[7/9] train dcd", "[8/9] evaluate",
                   "[9/9] reports"):
        assert header in printed
    assert printed.count("reference:") == 2
    assert printed.count("teacher_onestep:") == 2 and printed.count("   echo:") == 2
    assert "multi-step" in printed and "one-step-fused" in printed
    for stage in ("vision", "ar", "rad", "dcd"):
        assert Path(summary["runs"][stage], "model.safetensors").is_file()
        # diagnosis tokens: every stage's model carries the vision stage's head
        assert Path(summary["runs"][stage], DIAGNOSIS_FILE).is_file()
        assert load_config(summary["runs"][stage]).model.diagnosis_prompt
    # the head is the vision stage's, frozen after it; the language stages train the slots
    vision, student = (load_file(Path(summary["runs"][s], DIAGNOSIS_FILE))
                       for s in ("vision", "dcd"))
    assert torch.equal(vision["head.proj.weight"], student["head.proj.weight"])
    assert not torch.equal(vision["decisions"], student["decisions"])
    assert _steps(out / "runs" / "dcd")[2]["step"] == 2
    # the student learned the teacher's tokens, each weighing the same
    dcd = load_config(summary["runs"]["dcd"]).train
    assert (dcd.dcd_target, dcd.dcd_step_weighting) == ("hard", "uniform")
    trajectories = json.loads((out / "trajectories" / "manifest.json").read_text())
    assert trajectories["splits"]["train"]["rollouts"] > 0
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results) == {"ar", "teacher", "teacher_onestep", "echo"}
    # One forward per block: the student's forwards are the teacher-one-step's, not more.
    assert results["echo"]["forwards_per_report"] <= results["teacher"]["forwards_per_report"]
    # It ends with the table: one row per system, after the example reports.
    table = printed[printed.rindex("| system |"):]
    for name in results:
        assert f"| {name} |" in table
    # then the next steps, with the student the run just wrote
    assert f"echo-ray serve --checkpoint {out / 'runs' / 'dcd' / 'model'}" in printed
    assert f"echo-ray report --checkpoint {out / 'runs' / 'dcd' / 'model'}" in printed
