"""`cluster.yaml` (`ray up`): valid for Ray's own cluster launcher, and the cluster it
describes is the one the README and the jobs expect (a CPU head, a GPU worker group that
autoscales from zero, the project installed with torch pinned first)."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# AWS instance families with GPUs (or other accelerators) the head must not be.
ACCELERATOR_FAMILIES = re.compile(r"^(p\d|g\d|inf\d|trn\d|dl\d)", re.IGNORECASE)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as `ray up` sees it: Ray's AWS defaults filled in, then validated against
    Ray's schema (ray/autoscaler/ray-schema.json) and its cross-field rules."""
    pytest.importorskip("jsonschema")  # what Ray's validation runs on
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_ray_validates_the_cluster_config(prepared, raw):
    # nothing of ours was dropped or renamed on the way (an unknown key fails the schema)
    assert set(raw) <= set(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["available_node_types"].keys() == raw["available_node_types"].keys()


def test_the_head_has_no_gpu_and_runs_no_model(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert not head.get("resources", {}).get("GPU")
    instance = head["node_config"]["InstanceType"]
    assert not ACCELERATOR_FAMILIES.match(instance), instance
    assert head["max_workers"] == 0  # the head is only ever the one head node
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--head" in start and "--num-gpus" not in start.replace("--num-gpus=0", "")


def test_one_gpu_worker_group_autoscales_from_zero(prepared):
    workers = {name: node for name, node in prepared["available_node_types"].items()
               if name != prepared["head_node_type"]}
    assert len(workers) == 1
    (gpu,) = workers.values()
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= prepared["max_workers"]
    assert ACCELERATOR_FAMILIES.match(gpu["node_config"]["InstanceType"])
    assert prepared["idle_timeout_minutes"] > 0  # idle GPU workers go away
    # workers join the head's GCS at the port the head listens on
    port = re.search(r"--port[= ](\d+)", " ".join(prepared["head_start_ray_commands"]))
    assert port and any(f"--address=$RAY_HEAD_IP:{port.group(1)}" in c
                        for c in prepared["worker_start_ray_commands"])


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments of each `pip install` in `commands`, in order."""
    found = []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part)
            for i, word in enumerate(words[:-1]):
                if word.endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2:])
    return found


@pytest.mark.parametrize("commands", ["head_setup_commands", "worker_setup_commands"])
def test_every_node_installs_the_pinned_torch_first_then_the_project_under_constraints(
    prepared, commands
):
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    installs = _pip_installs(prepared[commands])
    torch_at = next(i for i, args in enumerate(installs)
                    if any(a.startswith("torch") for a in args))
    assert f"torch=={pins['torch']}" in installs[torch_at]
    project_at = next(i for i, args in enumerate(installs) if "-e" in args)
    assert torch_at < project_at
    project = installs[project_at]
    assert project[project.index("-c") + 1] == "constraints.txt" and project[-1] == "."
    # the checkout those commands install is the one copied to every node
    assert "~/echo-ray" in prepared["file_mounts"]
    assert ".venv" in prepared["rsync_exclude"]
