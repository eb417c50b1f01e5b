"""A Ray Train run never waits silently: workers beat a progress board, the driver watches it.

Every training worker reports to one small actor (the board) as it reads batches, validates and writes
checkpoints, throttled to one message every few seconds. The driver polls the board while Ray Train's
fit() runs in a thread. When no worker has made progress for `stall_seconds` (longer than any honest
step: RAYLIB_AD_STALL_MINUTES, 20 minutes by default), the run stops with one message that says what it
waited for (the workers' resources, or data that never came), what the cluster holds, and how to resume;
its checkpoint stays where Ray Train wrote it.

Also here: telling a worker killed for memory (Ray's memory monitor, the kernel's OOM killer) from any
other lost worker, with the figures a user needs to change something.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray

STALL_ENV = "RAYLIB_AD_STALL_MINUTES"
DEFAULT_STALL_MINUTES = 20.0
BEAT_EVERY_S = 2.0


class RunStalledError(RuntimeError):
    """No worker made progress for the stall limit: the message says on what the run waited."""


def stall_seconds(minutes: float | None = None) -> float:
    """The stall limit: `minutes` if given, else RAYLIB_AD_STALL_MINUTES, else 20 minutes."""
    if minutes is None:
        raw = os.environ.get(STALL_ENV, "").strip()
        try:
            minutes = float(raw) if raw else DEFAULT_STALL_MINUTES
        except ValueError:
            raise ValueError(f"{STALL_ENV}={raw!r} is not a number of minutes") from None
    if minutes <= 0:
        raise ValueError(f"the stall limit must be positive minutes, got {minutes}")
    return float(minutes) * 60.0


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The last sign of life of every worker of one run, on one clock (the board's)."""

    def __init__(self):
        self._attempt_start = time.time()
        self._beats: dict[int, tuple[float, str, int]] = {}
        self._workers: dict[int, Any] = {}

    def new_attempt(self) -> None:
        self._attempt_start = time.time()
        self._beats.clear()
        self._workers.clear()

    def beat(self, rank: int, what: str, rss_bytes: int, worker: Any = None) -> None:
        self._beats[rank] = (time.time(), what, int(rss_bytes))
        if worker is not None:
            self._workers[rank] = worker

    def snapshot(self) -> dict[str, Any]:
        return {"now": time.time(), "attempt_start": self._attempt_start, "beats": dict(self._beats)}

    def workers(self) -> list[Any]:
        return list(self._workers.values())


class Heartbeat:
    """Worker side: `beat("train batch 12")`, at most one message to the board every BEAT_EVERY_S."""

    def __init__(self, board: Any, rank: int, every_s: float = BEAT_EVERY_S):
        self._board, self._rank, self._every = board, rank, every_s
        self._last = float("-inf")
        try:
            self._actor = ray.get_runtime_context().current_actor  # lets the driver stop a stalled worker
        except Exception:  # noqa: BLE001 - not inside an actor (in-process tests): nothing to stop
            self._actor = None

    def __call__(self, what: str, force: bool = False) -> None:
        now = time.monotonic()
        if self._board is None or (not force and now - self._last < self._every):
            return
        self._last = now
        actor, self._actor = self._actor, None  # sent once
        self._board.beat.remote(self._rank, what, _rss_bytes(), actor)


def _rss_bytes() -> int:
    try:
        import psutil  # a dependency of Ray itself

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - a figure for a message, never a reason to fail
        return 0


@dataclass
class Stall:
    idle_s: float
    beats: dict[int, tuple[float, str, int]] = field(default_factory=dict)
    now: float = 0.0


def find_stall(snapshot: dict[str, Any], limit_s: float) -> Stall | None:
    """A Stall when the newest sign of life (or the attempt's start, before any) is older than limit_s."""
    beats = snapshot["beats"]
    newest = max([snapshot["attempt_start"]] + [b[0] for b in beats.values()])
    idle = snapshot["now"] - newest
    return Stall(idle, beats, snapshot["now"]) if idle >= limit_s else None


def run_watched(fit: Callable[[], Any], board: Any, limit_s: float, describe: Callable[[Stall], str],
                poll_s: float = 5.0) -> Any:
    """fit() in a thread, the board polled every poll_s; a stall stops the run's workers and raises
    RunStalledError(describe(stall)). fit's own result or exception comes back unchanged."""
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["result"] = fit()
        except BaseException as error:  # noqa: BLE001 - handed back to the caller's thread
            outcome["error"] = error

    ray.get(board.new_attempt.remote())
    thread = threading.Thread(target=target, name="raylib_ad-fit", daemon=True)
    thread.start()
    while True:
        thread.join(poll_s)
        if not thread.is_alive():
            break
        try:
            stall = find_stall(ray.get(board.snapshot.remote(), timeout=60), limit_s)
        except ray.exceptions.GetTimeoutError:
            continue  # a machine too busy to answer in a minute is not yet a stalled run
        if stall is None:
            continue
        message = describe(stall)
        # Stop the workers that exist: Ray Train then ends fit() with a worker error. A run that never got
        # its workers ends when this process does (its actors die with their owner).
        for worker in ray.get(board.workers.remote()):
            ray.kill(worker, no_restart=True)
        thread.join(30)
        raise RunStalledError(message)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def describe_stall(stall: Stall, limit_s: float, needs: dict[str, float], workers: int, resume_hint: str) -> str:
    """One message: how long, on what the run waited, what the cluster holds, how to resume."""
    lines = [f"no progress for {stall.idle_s / 60:.1f} minutes (the limit: {limit_s / 60:g}; {STALL_ENV} "
             f"sets it), so the run stops."]
    free, total = _resources()
    if not stall.beats:
        want = ", ".join(f"{v:g} {k}" for k, v in needs.items())
        lines.append(f"It waited for its {workers} training worker(s) to start, each asking for {want}; the "
                     f"cluster has {_fmt(free)} free of {_fmt(total)}.")
        held = _other_placement_groups()
        if held:
            lines.append(f"Held by {held}.")
    else:
        for rank, (when, what, rss) in sorted(stall.beats.items()):
            lines.append(f"rank {rank}: last '{what}' {(stall.now - when) / 60:.1f} min ago "
                         f"({rss / 2**30:.1f} GiB resident)")
        lines.append(f"The workers waited for their data or for each other; the cluster has {_fmt(free)} "
                     f"free of {_fmt(total)} (Ray's own log says more: 'Cluster resources are not enough' "
                     f"means the data pipeline got no CPU).")
    lines.append(resume_hint)
    return "\n".join(lines)


def _resources() -> tuple[dict[str, float], dict[str, float]]:
    try:
        return ray.available_resources(), ray.cluster_resources()
    except Exception:  # noqa: BLE001 - a message must still be given
        return {}, {}


def _fmt(resources: dict[str, float]) -> str:
    parts = [f"{resources.get('CPU', 0):g} CPU"]
    if resources.get("GPU"):
        parts.append(f"{resources['GPU']:g} GPU")
    parts.append(f"{resources.get('object_store_memory', 0) / 2**30:.1f} GiB object store")
    return ", ".join(parts)


def _other_placement_groups() -> str:
    """Placement groups that hold resources now (other training runs or trials on this cluster)."""
    try:
        table = ray.util.placement_group_table()
    except Exception:  # noqa: BLE001
        return ""
    created = [pg for pg in table.values() if pg.get("state") == "CREATED"]
    if not created:
        return ""
    held: dict[str, float] = {}
    for pg in created:
        for bundle in pg.get("bundles", {}).values():
            for key, value in bundle.items():
                held[key] = held.get(key, 0.0) + float(value)
    return (f"{len(created)} placement group(s) of other runs holding "
            + ", ".join(f"{v:g} {k}" for k, v in sorted(held.items()) if k in ("CPU", "GPU")))


# ---- workers killed for memory ---------------------------------------------------------------------

MEMORY_ADVICE = "use fewer --workers, a smaller --batch-size or a smaller --image-size"
_CGROUP_EVENTS = Path("/sys/fs/cgroup/memory.events")


def kernel_oom_kills() -> int | None:
    """The container's count of processes the kernel's OOM killer ended (cgroup v2), None if unknown."""
    try:
        for line in _CGROUP_EVENTS.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def memory_kill(failure: BaseException, oom_kills_before: int | None) -> str | None:
    """'killed for memory (...)' when Ray's memory monitor or the kernel's OOM killer ended the worker."""
    from ray.exceptions import OutOfMemoryError

    chain, seen = [], failure
    while seen is not None and len(chain) < 5:  # Ray wraps the actor's death in its own errors
        chain.append(seen)
        seen = seen.__cause__ or getattr(seen, "_base_exc", None)
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    by_ray = (any(isinstance(e, OutOfMemoryError) for e in chain) or "low on memory" in text
              or "memory monitor" in text.lower())
    after = kernel_oom_kills()
    by_kernel = oom_kills_before is not None and after is not None and after > oom_kills_before
    if not (by_ray or by_kernel):
        return None
    who = "Ray's memory monitor" if by_ray else "the kernel's OOM killer"
    return f"killed for memory by {who} ({node_memory()})"


def node_memory() -> str:
    try:
        import psutil

        mem = psutil.virtual_memory()
        return f"this node: {(mem.total - mem.available) / 2**30:.1f} of {mem.total / 2**30:.1f} GiB in use now"
    except Exception:  # noqa: BLE001
        return "node memory unknown"
