"""`echo-ray trajectories` (Ray Data batch inference of the teacher) and `train --stage dcd`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from helpers.prepared_shards import edit_first_shard, prepare_test_shards

from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import ConfigError, EchoConfig, ModelConfig
from echo_ray.data.dicom import decode_dicom
from echo_ray.data.shards import shard_files
from echo_ray.data.storage import resolve
from echo_ray.decode.sampler import generate
from echo_ray.diffusion.losses import compute_rad_loss
from echo_ray.diffusion.noise import pad_responses
from echo_ray.distill.rollout import STATS_KEY, actor_input, generate_trajectories
from echo_ray.model.checkpoint import save_checkpoint
from echo_ray.model.hf import build_model
from echo_ray.text.tokenizer import load_tokenizer
from echo_ray.train.driver import train

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "validate")


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory):
    """30 studies in shards of 4 rows (many shards: resumption has something to skip), one
    train DICOM corrupted in storage."""
    out = prepare_test_shards(tmp_path_factory, num_studies=30, seed=3, image_size=64,
                              overrides=["data.rows_per_shard=4"])

    def corrupt(rows):
        broken = next(r for r in rows if r["split"] == "train")
        broken["dicom"] = b"not a DICOM" * 20
        return broken["dicom_id"]

    return out, edit_first_shard(out, corrupt)


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory):
    """A tiny RAD teacher that ends its reports: 8-token responses (block 4), overfit in
    process on the train split's reports for a few seconds."""
    out = shards[0]
    tokenizer = load_tokenizer(out / "tokenizer")
    rows = [r for r in pq.read_table(out / "shards").to_pylist()
            if r["split"] == "train" and r["report_normalized"] and r["dicom_id"] != shards[1]
            ][:16]
    torch.manual_seed(0)
    config = EchoConfig()
    config.model = ModelConfig(image_size=56, max_response_len=8, block_length=4)
    model = build_model(config.model, tokenizer)
    images = np.stack([decode_dicom(r["dicom"], size=56).pixels for r in rows])
    ids = [tokenizer(r["report_normalized"], add_special_tokens=False)["input_ids"] for r in rows]
    response, valid = pad_responses(ids, block_length=4, max_len=8,
                                    eos_token_id=model.eos_token_id,
                                    pad_token_id=model.pad_token_id)
    pixel_values = model.preprocess_images(images)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    threshold = EchoConfig().decoding.threshold  # the job's default
    # Trained until it ends most of its training reports as the job decodes them (60 steps
    # have always been enough here, but one CI run's job found a teacher that ended none):
    # a job that drops everything below then points at the job, not at this fixture.
    for step in range(60, 301, 20):
        model.train()
        for _ in range(20 if step > 60 else 60):
            loss, _ = compute_rad_loss(model, pixel_values, response, valid, generator=generator)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        out = generate(model, pixel_values, steps=4, threshold=threshold)
        ended = float((out.tokens == model.eos_token_id).any(1).float().mean())
        if ended >= 0.75:
            break
    print(f"teacher: {step} steps, ends {ended:.0%} of its training reports")  # on failure
    assert ended >= 0.75, f"the teacher ends {ended:.0%} of its training reports after {step} steps"
    return save_checkpoint(model, tmp_path_factory.mktemp("teacher") / "model", config)


ROLLOUT = ["trajectories.top_k=4", "trajectories.batch_size=4", "trajectories.min_repeats=0",
           "pool.cpus_per_actor=0.5", "pool.threads=1"]


@pytest.fixture(scope="module")
def rolled_out(shards, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("trajectories")
    options = apply_overrides(EchoConfig(), ROLLOUT)
    manifest = generate_trajectories(str(teacher), str(shards[0]), str(out), options)
    return out, manifest


def _selected(shards_dir: Path) -> list[dict]:
    return [r for r in pq.read_table(shards_dir / "shards").to_pylist() if r["split"] in SPLITS]


def test_every_selected_image_is_a_rollout_or_a_counted_drop(shards, rolled_out):
    out, manifest = rolled_out
    selected = _selected(shards[0])
    assert manifest["rollouts"] + sum(manifest["dropped"].values()) == len(selected)
    assert manifest["dropped"]["decode_error"] == 1  # the corrupted DICOM, counted not fatal
    assert manifest["rollouts"] > len(selected) // 2, manifest["dropped"]
    rows = pq.read_table(out / "shards").to_pylist()
    assert len(rows) == manifest["rollouts"]
    assert shards[1] not in {r["dicom_id"] for r in rows}
    assert {r["split"] for r in rows} <= set(SPLITS)
    # One output shard per input shard, same names; its counts ride in the Parquet metadata.
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == sorted(
        p.name for p in (shards[0] / "shards").glob("*.parquet"))
    stats = [json.loads(pq.read_metadata(p).metadata[STATS_KEY])
             for p in (out / "shards").glob("*.parquet")]
    assert sum(s["rollouts"] for s in stats) == manifest["rollouts"]
    masses = [m for r in rows for m in r["mass"]]
    assert manifest["top_k_mass_mean"] == pytest.approx(sum(masses) / len(masses), rel=1e-5)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    # The output rows carry their DICOM bytes (training decodes them), read back from the
    # input shards: the teachers never held them.
    dicoms = {r["dicom_id"]: r["dicom"] for r in selected}
    assert all(r["dicom"] == dicoms[r["dicom_id"]] for r in rows)
    # How the rollout ran: one CPU decode task per CPU of the cluster, apart from the actors.
    assert manifest["decode_cpus"] == int(ray.cluster_resources()["CPU"])
    assert manifest["rollout_wall_s"] > 0 and 0.0 < manifest["actor_busy_fraction"] <= 1.0
    assert all(manifest["peak_rss_mb"][p] > 0 for p in ("driver", "decode", "actor"))


def test_the_decode_stage_gives_the_same_trajectories_as_teachers_that_decode(
    shards, teacher, rolled_out, tmp_path
):
    """`pool.decode_in_actors` (each teacher decodes its own DICOM bytes) writes the very
    same shards as the CPU decode stage: rows, tokens, records, DICOM bytes, counts."""
    options = apply_overrides(EchoConfig(), [*ROLLOUT, "pool.decode_in_actors=true"])
    manifest = generate_trajectories(str(teacher), str(shards[0]), str(tmp_path), options)
    staged = sorted((rolled_out[0] / "shards").glob("*.parquet"))
    assert [p.name for p in staged] == sorted(p.name for p in (tmp_path / "shards").glob("*"))
    for path in staged:
        assert pq.read_table(tmp_path / "shards" / path.name).equals(pq.read_table(path),
                                                                     check_metadata=True)
    assert manifest["dropped"] == rolled_out[1]["dropped"]
    assert manifest["dropped"]["decode_error"] == 1  # the broken DICOM, dropped as before
    assert manifest["decode_cpus"] is None and manifest["peak_rss_mb"]["decode"] is None
    assert 0.0 < manifest["actor_busy_fraction"] <= 1.0
    assert manifest["options"]["decode_in_actors"] is True


def test_the_teachers_receive_decoded_images_never_dicom_bytes(shards, teacher):
    """What streams into the teachers: the teacher's (S, S) float32 images, exactly
    `decode_dicom`'s, the broken file marked as a decode_error drop; no `dicom` column."""
    src = resolve(str(shards[0]))
    config = apply_overrides(EchoConfig(), ROLLOUT)
    rows = actor_input(shard_files(src), src, config, resolve(str(teacher)),
                       decode_cpus=2).take_all()
    selected = {r["dicom_id"]: r["dicom"] for r in _selected(shards[0])}
    assert sorted(r["dicom_id"] for r in rows) == sorted(selected)
    assert "dicom" not in rows[0] and "image" in rows[0]
    for row in rows:
        if row["dicom_id"] == shards[1]:
            assert row["image"] is None and row["decode_error"] == "not_dicom"
            continue
        assert row["decode_error"] is None
        image = np.frombuffer(row["image"], np.float32).reshape(56, 56)  # the teacher's side
        assert np.array_equal(image, decode_dicom(selected[row["dicom_id"]], size=56).pixels)


def test_the_decode_stage_imports_no_torch():
    """The CPU decode tasks load the job's module (their function is pickled by reference):
    it must not pull torch into every decode worker."""
    code = ("import sys, echo_ray.distill.rollout; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_trajectory_records_are_consistent(teacher, rolled_out):
    out, manifest = rolled_out
    model_steps = 4  # block_length: the default number of steps
    eos = load_tokenizer(teacher).eos_token_id
    for r in pq.read_table(out / "shards").to_pylist():
        n = len(r["tokens"])
        # Every position up to and including <eos> was committed exactly once.
        assert len(r["commit_step"]) == len(r["top_ids"]) == len(r["top_probs"]) == n + 1
        assert all(0 <= s < model_steps for s in r["commit_step"])
        for i, (ids, probs, mass) in enumerate(zip(r["top_ids"], r["top_probs"], r["mass"],
                                                   strict=True)):
            assert len(ids) == len(probs) == 4
            assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1 + 1e-5
            assert mass == pytest.approx(sum(probs), abs=1e-5)
            assert list(probs) == sorted(probs, reverse=True)
            # Greedy decoding commits the argmax of the recorded distribution.
            committed = r["tokens"][i] if i < n else eos
            assert ids[0] == committed
        # Within a whole block, positions are committed at steps 0, 1, ... without gaps.
        for b in range(0, (n + 1) // 4 * 4, 4):
            steps = sorted(set(r["commit_step"][b:b + 4]))
            assert steps == list(range(len(steps)))


def test_rerun_after_the_job_died_redoes_only_the_unfinished_shards(
    ray_cluster, shards, teacher, rolled_out, tmp_path
):
    # The ray-job entry point, in its own process, dies half way (the fault drill).
    out = tmp_path / "traj"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "jobs" / "trajectories.py"), "--teacher", str(teacher),
           "--data", str(shards[0]), "--out", str(out), "--top-k", "4", "--batch-size", "4",
           "--cpus-per-actor", "0.5", "--threads", "1", "--min-repeats", "0",
           "--fail-after-shards", "3",
           "--ray-address", ray_cluster.get_runtime_context().gcs_address]
    died = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert died.returncode != 0 and "fault drill" in died.stderr
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    total = len(list((shards[0] / "shards").glob("*.parquet")))
    assert len(done) == 3 < total
    assert not (out / "manifest.json").exists()  # a dead job never looks complete

    options = apply_overrides(EchoConfig(), ROLLOUT)
    manifest = generate_trajectories(str(teacher), str(shards[0]), str(out), options)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.parquet")}
    assert len(after) == total
    assert all(after[name] == mtime for name, mtime in done.items())  # not redone
    # The same rollouts as the run that never died (greedy, same teacher).
    assert manifest["rollouts"] == rolled_out[1]["rollouts"]
    assert manifest["dropped"] == rolled_out[1]["dropped"]
    resumed = pq.read_table(out / "shards").sort_by("dicom_id")
    whole = pq.read_table(rolled_out[0] / "shards").sort_by("dicom_id")
    assert resumed.column("tokens").to_pylist() == whole.column("tokens").to_pylist()


def test_dcd_trains_a_student_from_the_trajectories(shards, teacher, rolled_out, tmp_path):
    config = apply_overrides(EchoConfig.from_name("tiny"), [
        "train.num_workers=2", "train.batch_size=2", "train.max_steps=3", "train.warmup_steps=1",
        "train.checkpoint_every=100", "train.eval_every=100", "train.eval_batches=1",
        "train.shuffle_buffer=0",
    ])
    result = train("dcd", str(rolled_out[0]), str(tmp_path / "dcd"), config, init=str(teacher))
    assert result.metrics["step"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "dcd" / "metrics.jsonl").read_text()
               .splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 3 and all(np.isfinite(losses))
    summary = json.loads((tmp_path / "dcd" / "train_summary.json").read_text())
    assert summary["stage"] == "dcd" and summary["init"] == str(teacher)
    # The student keeps the teacher's shapes and block length.
    saved = json.loads((tmp_path / "dcd" / "model" / "echo_config.json").read_text())
    assert saved["model"]["block_length"] == 4 and saved["model"]["max_response_len"] == 8


def test_dcd_refuses_data_that_is_not_trajectories(shards, teacher, tmp_path):
    config = EchoConfig.from_name("tiny")
    with pytest.raises(ConfigError, match="not the output of `echo-ray trajectories`"):
        train("dcd", str(shards[0]), str(tmp_path / "dcd"), config, init=str(teacher))
    with pytest.raises(ConfigError, match="--init"):
        train("dcd", str(shards[0]), str(tmp_path / "dcd"), config)
