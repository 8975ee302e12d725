"""Connecting to Ray: an existing session, a cluster address, or a new local cluster."""

from __future__ import annotations

import ray


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False
) -> None:
    """Connect to Ray: an existing session, `address`/RAY_ADDRESS, or a new local cluster.

    Args:
        dashboard: start the dashboard with a new local cluster (Ray Train's state queries
            need it; Ray Data jobs do not).
    """
    if ray.is_initialized():
        return
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True)
