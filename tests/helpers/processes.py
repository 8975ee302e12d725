"""Stopping what a test started: a process group, politely first."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the process group `proc` leads (started with `start_new_session=True`),
    SIGKILL it when it has not exited within `timeout` s; waits for the leader."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
