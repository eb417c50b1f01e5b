"""Starting or joining Ray: the same code runs on a laptop (local Ray) and under `ray job submit`.

Ray's own convention decides which cluster a driver uses: RAY_ADDRESS, else the latest cluster that
`ray start` left on this machine (its address file, <ray temp dir>/ray_current_cluster), else a new
private one. ensure_ray follows it, with one difference: a cluster that is joined is never handed the
local-only start arguments (object_store_memory, num_cpus), which Ray refuses when connecting.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field

import ray


@dataclass(frozen=True)
class RaySession:
    """What ensure_ray did: joined a running cluster (its address) or started a private local one."""

    joined: bool
    address: str | None
    resources: dict[str, float] = field(default_factory=dict)


def ensure_ray(num_cpus: int | None = None, *, local: bool = False) -> RaySession | None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`) or a running `ray start` cluster
    on this machine, saying so in one line; with ``local=True`` (or when none runs) start a private local
    Ray instead. Returns None when Ray was already initialized by the caller."""
    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = None if local else running_cluster_address()
    if address is not None:
        from_env = bool(os.environ.get("RAY_ADDRESS", "").strip())
        # No explicit address: ray.init finds the same cluster (RAY_ADDRESS, else the `ray start` address
        # file), and only a cluster found that way gets Ray's automatic token authentication (~/.ray/auth_token).
        ray.init(address=None if from_env else "auto", log_to_driver=True)
        session = RaySession(True, address, _resources())
        hint = "" if from_env else "; --local-ray starts a private one instead"
        print(f"[raylib_ad] joined the running Ray cluster at {address} ({describe_resources(session.resources)})"
              f"{hint}", file=sys.stderr)
        return session
    env_address = os.environ.pop("RAY_ADDRESS", None) if local else None
    # Fixed cost of every Ray Train run on a private local Ray (docs/benchmarks.md, "Fixed cost"). The
    # raylet started here passes these to every Ray process; a user's own settings win.
    # - no preemptible nodes here: Ray Train's PreemptionWatcher actor (one more process per run) is idle;
    # - the controller notices that the workers finished at its next poll: every 0.5 s instead of 2 s.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    try:
        # address="local" always starts a new instance, even beside a `ray start` cluster.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 object_store_memory=_local_object_store_bytes())
    finally:
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address
    if env_address is not None:
        print(f"[raylib_ad] --local-ray: ignoring RAY_ADDRESS={env_address}, started a private Ray",
              file=sys.stderr)
    return RaySession(False, None, _resources())


def running_cluster_address() -> str | None:
    """The cluster Ray's convention picks for this driver: RAY_ADDRESS if set, else the address `ray start`
    recorded on this machine when a GCS still listens there; None means "start a private one"."""
    env_address = os.environ.get("RAY_ADDRESS", "").strip()
    if env_address:
        return None if env_address == "local" else env_address
    from ray._common.utils import get_ray_address_file

    try:
        with open(get_ray_address_file(None)) as handle:
            address = handle.read().strip()
    except OSError:
        return None
    # A `ray start` cluster that died without `ray stop` leaves its file behind; joining it would hang.
    return address if address and _listening(address) else None


def _listening(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _resources() -> dict[str, float]:
    try:
        return {k: float(v) for k, v in ray.cluster_resources().items()}
    except Exception:  # an info line must never fail the run
        return {}


def describe_resources(resources: dict[str, float]) -> str:
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    nodes = sum(1 for k in resources if k.startswith("node:") and k != "node:__internal_head__")
    store = resources.get("object_store_memory", 0.0) / 2**30
    parts = [f"{nodes} node{'s' if nodes != 1 else ''}", f"{cpus:g} CPU", f"{gpus:g} GPU",
             f"{store:.1f} GiB object store"]
    return ", ".join(parts)


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


def largest_node_cpus() -> float:
    """The CPUs of the cluster's largest live node: a Train worker must fit on one node."""
    sizes = [float(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    return max(sizes, default=cluster_cpus())
