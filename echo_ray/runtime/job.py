"""Where a command runs: inside a `ray job submit` entrypoint or not (no ray import).

Ray's job supervisor starts the entrypoint with `RAY_JOB_CONFIG_JSON_ENV_VAR` (the job's
runtime environment as JSON) in its environment, and with `--working-dir` the entrypoint's
current folder is an unpacked copy of that folder, uploaded without its git-ignored files.
A relative path given to such a job therefore names a file of that copy, not of the
submitter's checkout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# Set by Ray's job supervisor for the entrypoint process (ray/_private/runtime_env/constants.py).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass(frozen=True)
class RayJob:
    """The `ray job submit` entrypoint this process is.

    Attributes:
        working_dir: the runtime environment's `working_dir` (the uploaded package URI, e.g.
            `gcs://_ray_pkg_....zip`), None when the job was submitted without one.
        cwd: the entrypoint's current folder (with a working_dir, the unpacked copy).
    """

    working_dir: str | None
    cwd: str


def current_ray_job() -> RayJob | None:
    """The Ray job this process is the entrypoint of, or None outside `ray job submit`."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if raw is None:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        runtime_env = {}
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    return RayJob(working_dir=working_dir or None, cwd=os.getcwd())


def relative_path_hint(path: str, job: RayJob, *, output: bool = False) -> str:
    """Why relative `path` is not found (an input) or not kept (an output) inside `job`, and
    what to pass instead."""
    if job.working_dir:
        where = f"relative to this Ray job's working dir ({job.cwd}), a temporary copy of " \
                "`--working-dir`"
        why = ("the output would be deleted with it" if output else
               "git-ignored folders such as quickstart/ are not uploaded")
    else:
        where = f"relative to this Ray job's folder on the head node ({job.cwd})"
        why = "not the folder you submitted from"
    return (f"{path} is {where}, and {why}: pass an absolute path that the cluster's nodes "
            f"can read (with a head on the submitting machine, \"$PWD/{os.path.normpath(path)}\" "
            "in the submit command) or an s3:// URI")
