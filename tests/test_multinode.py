"""Every Ray stage on a multi-node cluster with its data on S3, and the rule that keeps a
multi-node job's files off the workers' own disks.

The cluster is three `ray start` nodes on this machine: a head with
no CPUs, where only drivers run (as on `cluster.yaml`'s head, nothing that holds a model),
and two worker nodes of 3 logical CPUs. S3 is a moto server on loopback. Each stage runs as
the user runs it, `python -m echo_ray.cli ... --ray-address --s3-endpoint` in a subprocess,
reading and writing s3://: prepare, train --stage ar with two workers that can only fit
one per node, trajectories, evaluate, the bulk report job, and Serve with its model replica
on a worker node. A local --out is refused before any work (exit 2, one line); with
--shared-storage the same command (train --stage rad from the S3 run) writes it.

The pytest process never joins this cluster (it asks the dashboard's state API over HTTP),
so the session `ray_cluster` is not disturbed, and the cluster's address is written in its
own temp dir, not /tmp/ray/ray_current_cluster where another `ray.init()` would find it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers.processes import stop_process_group

from echo_ray.runtime import cluster as runtime_cluster
from echo_ray.runtime.cluster import SharedStorageError, require_shared_storage

BUCKET = "multinode"
# A tiny model (56 px images, 16-token reports in blocks of 4) trained for a step or two.
MODEL = ("model.image_size=56", "model.max_response_len=16", "model.block_length=4")
TRAIN = (*MODEL, "train.batch_size=2", "train.warmup_steps=1", "train.eval_batches=1",
         "train.shuffle_buffer=8", "train.checkpoint_every=2", "train.eval_every=2")


def _sets(settings) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("shared", [False, True])
def test_local_paths_are_refused_on_more_than_one_node_unless_declared_shared(
    monkeypatch, shared
):
    monkeypatch.setattr(runtime_cluster, "alive_nodes", lambda: 3)
    monkeypatch.setattr(runtime_cluster, "_autoscales", lambda: False)
    paths = {"--data": "s3://b/shards", "--out": "/runs/ar", "--init": None}
    if shared:
        require_shared_storage(paths, shared=True, what="train")
        return
    with pytest.raises(SharedStorageError) as e:
        require_shared_storage(paths, shared=False, what="train")
    message = str(e.value)
    assert "\n" not in message and "--data" not in message  # S3 and unset paths are fine
    assert message.startswith("--out /runs/ar is a local path on a Ray cluster of 3 nodes")
    assert "use s3://" in message and "--shared-storage if /runs/ar is the same" in message


def test_one_node_takes_local_paths_and_an_autoscaling_one_does_not(monkeypatch):
    monkeypatch.setattr(runtime_cluster, "alive_nodes", lambda: 1)
    monkeypatch.setattr(runtime_cluster, "_autoscales", lambda: False)
    paths = {"--archive": "/data/archive", "--out": "out"}
    require_shared_storage(paths, shared=False, what="prepare")
    monkeypatch.setattr(runtime_cluster, "_autoscales", lambda: True)  # `ray up`, no worker yet
    with pytest.raises(SharedStorageError, match="^--archive /data/archive and --out out are "
                       "local paths on a Ray cluster that adds nodes as it scales"):
        require_shared_storage(paths, shared=False, what="prepare")
    require_shared_storage({"--out": "s3://b/out"}, shared=False, what="prepare")


# ----------------------------------------------------------------------------- the cluster


class _Cluster:
    """The running cluster as the tests see it: addresses, node ids, a CLI runner."""

    def __init__(self, address: str, dashboard: str, head: str, workers: list[str],
                 s3_endpoint: str) -> None:
        self.address, self.dashboard, self.s3_endpoint = address, dashboard, s3_endpoint
        self.head, self.workers = head, workers

    def cli_args(self, command: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "echo_ray.cli", command, *args,
                "--ray-address", self.address, "--s3-endpoint", self.s3_endpoint]

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        return env

    def cli(self, command: str, *args: str, check: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess:
        done = subprocess.run(self.cli_args(command, *args), env=self.env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        if check:
            assert done.returncode == 0, f"echo-ray {command} failed:\n{done.stdout[-4000:]}"
        return done


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block ...` in its own process group (stopped with killpg), its output
    in `log` (shown when a node does not come up)."""
    ray_bin = Path(sys.executable).parent / "ray"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(ray_bin), "start", "--block", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def _tails(nodes: list[subprocess.Popen]) -> str:
    return "\n".join(f"--- {p.log.name} (exit {p.poll()}):\n"
                     + p.log.read_text(errors="replace")[-3000:] for p in nodes)


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """Three `ray start` nodes: separate processes, so nothing of this cluster lives in the
    pytest process (an in-process `ray.cluster_utils.Cluster` left the session's Ray Train
    runs dying after it was torn down). The head's temp dir is its own (its address file
    too, never /tmp/ray/ray_current_cluster)."""
    from ray._private.services import get_node_ip_address
    from ray.util.state import list_nodes

    # the AWS test credentials included; no token auth (Ray 2.60 turns it on for a head when
    # ~/.ray/auth_token exists, which another test's `ray start` may have written, and then
    # this process's state API calls and the joining nodes are refused)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")  # short: socket path limit
    gcs, dashboard = _free_port(), _free_port()
    address, url = f"{get_node_ip_address()}:{gcs}", f"http://127.0.0.1:{dashboard}"
    nodes = [_ray_start([
        "--head", f"--port={gcs}", "--num-cpus=0", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}", f"--object-store-memory={200 << 20}",
    ], env, Path(temp_dir) / "head.log")]

    def alive() -> list:
        assert all(p.poll() is None for p in nodes), _tails(nodes)
        try:
            return [n for n in list_nodes(address=url, raise_on_missing_output=False)
                    if n.state == "ALIVE"]
        except Exception:  # noqa: BLE001 - the dashboard is not up yet
            return []

    def wait_for(count: int) -> list:
        deadline = time.time() + 180
        while len(up := alive()) < count:
            assert time.time() < deadline, (
                f"{len(up)} of {count} Ray nodes came up\n{_tails(nodes)}")
            time.sleep(2)
        return up

    def start_worker(i: int) -> None:
        """One worker node, joined before the next starts: a raylet gives up when the GCS
        has not seen it within 30 s (hard-coded in Ray), which two nodes starting at once on
        a loaded 2-core machine can miss; such a node is started again (twice at most)."""
        for attempt in range(3):
            nodes.append(_ray_start([
                f"--address={address}", "--num-cpus=3", f"--object-store-memory={200 << 20}",
                # two nodes on one machine: no fixed default port may be shared
                *(f"--{name}-port={_free_port()}" for name in (
                    "dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export",
                    "node-manager", "object-manager", "runtime-env-agent")),
                "--min-worker-port=0", "--max-worker-port=0",
            ], env, Path(temp_dir) / f"worker{i}-{attempt}.log"))
            try:
                wait_for(2 + i)
                return
            except AssertionError:
                if nodes[-1].poll() is None or attempt == 2:
                    raise
                nodes.pop()  # exited during its start-up: try again

    try:
        wait_for(1)  # the head, before the workers join it
        for i in range(2):
            start_worker(i)
        up = wait_for(3)
        yield _Cluster(address, url, next(n.node_id for n in up if n.is_head_node),
                       [n.node_id for n in up if not n.is_head_node], s3_endpoint)
    finally:
        for proc in reversed(nodes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(nodes):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


def _keys(s3, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _json(s3, key: str):
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


@pytest.fixture(scope="module")
def archive(s3, tmp_path_factory) -> Path:
    """A 12-study frontal-only synthetic archive, uploaded to s3://multinode/archive."""
    from echo_ray.synth.archive import synthesize_archive

    folder = tmp_path_factory.mktemp("archive")
    synthesize_archive(folder, num_studies=12, seed=5, image_size=64, lateral_fraction=0.0)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"archive/{path.relative_to(folder).as_posix()}")
    return folder


@pytest.fixture(scope="module")
def shards(cluster, archive, s3) -> str:
    cluster.cli("prepare", "--archive", f"s3://{BUCKET}/archive",
                "--out", f"s3://{BUCKET}/shards")
    assert _json(s3, "shards/manifest.json")["format"].startswith("echo-ray-shards")
    return f"s3://{BUCKET}/shards"


@pytest.fixture(scope="module")
def ar_run(cluster, shards) -> str:
    """Two workers of 2 CPUs on nodes of 3: one per worker node."""
    cluster.cli("train", "--stage", "ar", "--data", shards, "--out", f"s3://{BUCKET}/runs/ar",
                "--num-workers", "2", "--cpus-per-worker", "2", "--max-steps", "2",
                *_sets(TRAIN))
    return f"s3://{BUCKET}/runs/ar"


RAD = ("--stage", "rad", "--num-workers", "1", "--cpus-per-worker", "2", "--max-steps", "1")


@pytest.fixture(scope="module")
def rad_run(cluster, shards, ar_run, s3, tmp_path_factory) -> tuple[Path, str]:
    """RAD from the S3 AR run into a local folder declared shared (--shared-storage; it is:
    every node is this machine), its model then copied to S3 for the stage that reads it:
    (the local run folder, the S3 run folder)."""
    out = tmp_path_factory.mktemp("rad") / "run"
    cluster.cli("train", *RAD, "--init", ar_run, "--data", shards, "--out", str(out),
                "--shared-storage", *_sets(TRAIN))
    for path in sorted((out / "model").rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, f"runs/rad/{path.relative_to(out).as_posix()}")
    return out, f"s3://{BUCKET}/runs/rad"


@pytest.mark.ray
@pytest.mark.slow
def test_training_runs_one_worker_on_each_worker_node_into_s3(cluster, ar_run, s3):
    summary = _json(s3, "runs/ar/train_summary.json")
    nodes = summary["worker_nodes"]
    assert len(nodes) == 2 and set(nodes) == set(cluster.workers)  # two nodes, not the head
    assert summary["model"] == f"{ar_run}/model" and summary["metrics"]["step"] == 2
    keys = _keys(s3, "runs/ar/")
    assert {"runs/ar/checkpoint_0000002/model.safetensors",
            "runs/ar/checkpoint_0000002/train_state.pt", "runs/ar/model/model.safetensors",
            "runs/ar/model/echo_config.json", "runs/ar/metrics.jsonl",
            "runs/ar/train_summary.json"} <= keys
    assert "runs/ar/model/train_state.pt" not in keys
    rows = s3.get_object(Bucket=BUCKET, Key="runs/ar/metrics.jsonl")["Body"].read().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]
    assert all("worker_nodes" not in json.loads(r) for r in rows)


@pytest.mark.ray
@pytest.mark.slow
def test_a_local_out_is_refused_before_any_work_and_taken_when_declared_shared(
    cluster, shards, ar_run, rad_run, tmp_path
):
    out = tmp_path / "run"
    done = cluster.cli("train", *RAD, "--init", ar_run, "--data", shards, "--out", str(out),
                       *_sets(TRAIN), check=False)
    assert done.returncode == 2, done.stdout[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"echo-ray train: --out {out} is a local path on a Ray cluster of "
                           "3 nodes"), done.stdout[-3000:]
    assert "use s3://" in last and f"--shared-storage if {out} is the same shared" in last
    assert "Traceback" not in done.stdout and "TorchTrainer" not in done.stdout
    assert not out.exists()  # nothing written, no worker started
    # The same command with --shared-storage (rad_run): RAD from the S3 run folder, trained
    # on a worker node, into the local folder.
    summary = json.loads((rad_run[0] / "train_summary.json").read_text())
    assert summary["init"] == f"{ar_run}/model" and summary["metrics"]["step"] == 1
    assert len(summary["worker_nodes"]) == 1 and summary["worker_nodes"][0] in cluster.workers
    assert (rad_run[0] / "model" / "model.safetensors").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_the_teacher_rolls_out_from_s3_into_s3(cluster, shards, rad_run, s3):
    cluster.cli("trajectories", "--teacher", rad_run[1], "--data", shards,
                "--out", f"s3://{BUCKET}/trajectories", "--steps", "4", "--min-repeats", "0",
                "--batch-size", "4", "--decode-cpus", "2", *_sets(MODEL))
    manifest = _json(s3, "trajectories/manifest.json")
    assert manifest["format"].startswith("echo-ray-trajectories")
    # every train and validate image rolled out: kept, or dropped with its reason (a teacher
    # trained for one step rarely ends its reports)
    splits = _json(s3, "shards/manifest.json")["splits"]
    assert manifest["rollouts"] + sum(manifest["dropped"].values()) == (
        splits["train"]["images"] + splits["validate"]["images"])
    assert any(k.endswith(".parquet") for k in _keys(s3, "trajectories/shards/"))


@pytest.mark.ray
@pytest.mark.slow
def test_evaluation_reads_and_writes_s3(cluster, shards, ar_run, s3):
    cluster.cli("evaluate", "--data", shards, "--out", f"s3://{BUCKET}/eval",
                "--system", f"ar={ar_run}:ar", "--batch-size", "4", "--decode-cpus", "2",
                *_sets(MODEL))
    results = _json(s3, "eval/results.json")
    assert results["ar"]["num_reports"] > 0
    assert "eval/reports.parquet" in _keys(s3, "eval/")


@pytest.mark.ray
@pytest.mark.slow
def test_the_bulk_job_reports_the_s3_archive_into_s3(cluster, archive, ar_run, s3):
    cluster.cli("report", "--checkpoint", ar_run, "--archive", f"s3://{BUCKET}/archive",
                "--out", f"s3://{BUCKET}/reports", "--decoding", "ar", "--max-new-tokens", "8",
                "--decode-cpus", "2")
    summary = _json(s3, "reports/summary.json")
    assert summary["studies"] == 12 and summary["reports"] == 12 and summary["errors"] == 0
    assert any(k.startswith("reports/parts/") for k in _keys(s3, "reports/"))


@pytest.mark.ray
@pytest.mark.slow
def test_serve_places_the_model_replica_on_a_worker_node(cluster, archive, ar_run):
    import requests
    from ray.util.state import list_actors

    port = _free_port()
    proc = subprocess.Popen(
        cluster.cli_args("serve", "--checkpoint", f"{ar_run}/model", "--insecure",
                         "--host", "127.0.0.1", "--port", str(port), "--decoding", "ar",
                         "--max-new-tokens", "8", "--max-replicas", "1"),
        env=cluster.env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            try:
                if requests.get(f"{url}/readyz", timeout=15).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or /readyz slow to answer
                pass
            time.sleep(2)
        else:
            pytest.fail("the Serve app did not become ready")
        dicom = next(p for p in sorted(archive.rglob("*.dcm")))
        r = requests.post(f"{url}/v1/reports", data=dicom.read_bytes(), timeout=120,
                          headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200, r.text
        assert r.json()["report"] and r.json()["model_id"] == "ar"
        actors = list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")],
                             limit=1000, raise_on_missing_output=False)
        replicas = [a for a in actors if a.class_name.endswith(":ReportModel")]
        assert replicas, sorted(a.class_name for a in actors)
        assert {a.node_id for a in replicas} <= set(cluster.workers)  # not the driver's head
    finally:
        stop_process_group(proc)
