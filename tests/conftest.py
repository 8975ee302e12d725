"""Shared fixtures. Ray tests share ONE local cluster per session, started here and shut
down at the end (never `ray stop`: other clusters on the machine are not ours)."""

from __future__ import annotations

import os

import pytest

# Keep test runs off the network and quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Fake AWS credentials for the moto S3 server, set before the Ray cluster starts so that its
# workers (e.g. a Serve replica loading an s3:// model) have them too. Always fake, even if
# the developer's shell has real ones: no test may carry real credentials anywhere.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1")
os.environ.pop("AWS_SESSION_TOKEN", None)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the whole test session (4 logical CPUs on a 2-core machine:
    tasks request fractions, and Ray Data plus workers need headroom to schedule)."""
    import ray

    if ray.is_initialized():  # pragma: no cover - someone else's session
        yield ray
        return
    # address="local": always a new cluster, never one a `ray start` left on the machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def single_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): the
    tiny-model tests are faster and steadier that way on the shared 2-core machine."""
    from helpers.tiny_dvlm import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def s3_endpoint(monkeypatch_module):
    """A real S3 API on loopback (moto server), with test credentials in the environment."""
    import socket

    moto_server = pytest.importorskip("moto.server")
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch_module.setenv(key, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp
