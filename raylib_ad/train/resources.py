"""How many CPUs each Ray Train worker asks for, so a laptop never deadlocks its own data pipeline."""

from __future__ import annotations


def cpus_per_worker(total_cpus: float, workers: int, requested: float | None = None, reserve: float = 1.0) -> float:
    """Leave `reserve` CPUs for Ray Data decode tasks: a TorchTrainer whose workers hold every CPU never
    starts reading its dataset (the read task waits for a CPU forever)."""
    if requested:
        return float(requested)
    share = (total_cpus - reserve) / max(workers, 1)
    if share >= 1:
        return 1.0
    return max(0.25, round(share, 2))
