"""How many CPUs each Ray Train worker asks for: the machine used, and never so many that a laptop
deadlocks its own data pipeline. A worker runs as many torch threads as whole CPUs it holds
(train/ray_train.py)."""

from __future__ import annotations

import math


def cpus_per_worker(total_cpus: float, workers: int, requested: float | None = None, reserve: float = 1.0,
                    *, largest_node_cpus: float | None = None, spread: bool = True) -> float:
    """Leave `reserve` CPUs for Ray Data decode tasks: a TorchTrainer whose workers hold every CPU never
    starts reading its dataset (the read task waits for a CPU forever).

    spread=True (a training run): the other CPUs are shared out in whole CPUs, so one worker on an 8-CPU
    laptop trains on 7 threads rather than 1; capped at the largest node's CPUs less the reserve, so that a
    worker still fits on one node and leaves that node a CPU to decode with. spread=False (a sweep, whose
    trials run side by side): one CPU per worker.
    """
    if requested:
        return float(requested)
    share = (total_cpus - reserve) / max(workers, 1)
    if share < 1:
        return max(0.25, round(share, 2))
    if not spread:
        return 1.0
    whole = math.floor(share)
    if largest_node_cpus is not None:
        whole = min(whole, math.floor(largest_node_cpus - reserve))
    return float(max(1, whole))
