"""Connecting to Ray: an existing session, a cluster address, or a new local cluster; and
the rule that keeps a multi-node job's files in one place (`require_shared_storage`).

ray is imported inside the functions: the CLI imports `SharedStorageError` to report it
without loading Ray for commands that never start it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SHARED_STORAGE_FLAG = "--shared-storage"


class SharedStorageError(ValueError):
    """A local path that workers on other Ray nodes would read or write (see
    `require_shared_storage`); the message says what to pass instead."""


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False
) -> None:
    """Connect to Ray: an existing session, `address`/RAY_ADDRESS, or a new local cluster.

    Args:
        dashboard: start the dashboard with a new local cluster (Ray Train's state queries
            need it; Ray Data jobs do not).
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True)


def alive_nodes() -> int:
    """How many nodes of the connected Ray cluster are alive (the driver's included)."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def _autoscales() -> bool:
    """Whether the cluster can add nodes: an autoscaler config in the GCS with a node group
    that scales (autoscaler v2, KubeRay, hosted Ray; Ray Data's own test of it), or the v2
    autoscaler running at all (what `ray up` starts since Ray 2.50; a `ray start` or local
    cluster runs the v1 monitor, which only mirrors the nodes there are). Both are Ray's
    private API: a failure to ask counts as no, and the node count still applies."""
    try:
        import ray._private.state
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        config = ray._private.state.state.get_cluster_config()
        if config is not None and any(
            g.max_count == -1 or g.max_count > g.min_count
            for g in config.node_group_configs if g.resources and g.max_count != 0
        ):
            return True
        return bool(is_autoscaler_v2(fetch_from_server=True))
    except Exception:  # noqa: BLE001 - a private API that may change
        logger.debug("could not ask Ray whether the cluster autoscales", exc_info=True)
        return False


def require_shared_storage(paths: dict[str, str | None], *, shared: bool, what: str) -> None:
    """Refuse local paths that Ray workers on other nodes would read or write.

    Call it right after `init_ray`, before the job writes or deletes anything. On a cluster
    of more than one node (or one that autoscales), a local path names a different disk on
    every node: actors would read files that are not there, or scatter a job's outputs over
    the workers' disks. `s3://` URIs are the same everywhere; a local path is accepted only
    when the user declares it shared by every node (`shared`, the CLI's --shared-storage:
    NFS, EFS, Lustre mounted at the same path). On one node every path is fine.

    Args:
        paths: the job's paths that its Ray workers use, by the flag that set them (e.g.
            {"--data": ..., "--out": ...}); None values (an unset optional input) are skipped.
        shared: the user declared local paths shared by every node.
        what: the command, as the message names it (e.g. "train").

    Raises:
        SharedStorageError: a local path on a multi-node cluster, not declared shared.
    """
    local = {flag: uri for flag, uri in paths.items() if uri and not uri.startswith("s3://")}
    if shared or not local:
        return
    nodes = alive_nodes()
    if nodes > 1:
        cluster = f"a Ray cluster of {nodes} nodes"
    elif _autoscales():
        cluster = "a Ray cluster that adds nodes as it scales"
    else:
        return
    named = " and ".join(f"{flag} {uri}" for flag, uri in local.items())
    uris = " and ".join(local.values())
    are = ("are local paths", "are") if len(local) > 1 else ("is a local path", "is")
    raise SharedStorageError(
        f"{named} {are[0]} on {cluster}: `echo-ray {what}` would read and write each node's "
        f"own disk; use s3://... instead, or pass {SHARED_STORAGE_FLAG} if {uris} {are[1]} the "
        "same shared filesystem on every node"
    )


def decode_tasks(decode_cpus: int, *, most: int | None = None) -> int:
    """CPU decode tasks a batch job runs at once (docs/ARCHITECTURE.md section 1.3):
    `decode_cpus` (`pool.decode_cpus`), or (0) one per CPU of the connected cluster; at
    least 1, at most `most` (e.g. the job's work units)."""
    import ray

    tasks = decode_cpus or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(tasks, most)) if most is not None else tasks


def peak_rss_kib() -> int:
    """This process's peak resident memory so far, KiB: Linux's VmHWM of the process's own
    memory map, else `ru_maxrss` (KiB on Linux). `ru_maxrss` survives `exec`: a process
    started by a big one (a driver spawned by a bench holding torch) would report its
    parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
