"""Starting or joining Ray: the same code runs on a laptop (local Ray) and under `ray job submit`."""

from __future__ import annotations

import os

import ray


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start a local Ray."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             object_store_memory=_local_object_store_bytes())


def _local_object_store_bytes() -> int:
    # Decoded training images pass through the object store; a quarter of free memory, at most 4 GiB,
    # keeps a laptop responsive (Ray's default grabs 30% of RAM).
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 * 2**30
    return int(min(4 * 2**30, max(256 * 2**20, avail // 4)))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))
