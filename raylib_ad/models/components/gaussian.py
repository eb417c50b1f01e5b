"""Exact streaming moments (count, sum, sum of outer products) and the Gaussian fitted from them.

Moments add up across batches and across workers, so a distributed fit equals a single-process fit up
to float64 rounding: this is how PaDiM and DFM stay exact on N workers.
"""

from __future__ import annotations

import torch

from ... import distributed


class Moments:
    """Per-position moments of (B, P, C) features: count, sum (P, C), outer (P, C, C), in float64."""

    def __init__(self):
        self.count = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        x = features.double()
        batch_total = x.sum(0)
        batch_outer = torch.einsum("bpc,bpd->pcd", x, x)
        if self.total is None:
            self.total, self.outer = batch_total, batch_outer
        else:
            self.total += batch_total
            self.outer += batch_outer
        self.count += x.shape[0]

    def all_reduce(self) -> "Moments":
        """Sum over workers. Every worker must have seen at least one batch (shapes must be known)."""
        if self.total is None:
            raise RuntimeError("no features collected on this worker: its data shard is empty")
        count = distributed.all_reduce_sum(torch.tensor([float(self.count)], dtype=torch.float64))
        self.count = int(count.item())
        self.total = distributed.all_reduce_sum(self.total)
        self.outer = distributed.all_reduce_sum(self.outer)
        return self

    def mean_and_covariance(self, regularization: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (P, C) and unbiased covariance (P, C, C) + regularization * I."""
        n = self.count
        if n < 2:
            raise ValueError(f"need at least 2 training images for a covariance, got {n}")
        mean = self.total / n
        cov = (self.outer - n * torch.einsum("pc,pd->pcd", mean, mean)) / (n - 1)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return mean, cov + regularization * eye
