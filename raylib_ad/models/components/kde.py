"""Gaussian kernel density estimate with Scott's bandwidth (as scipy.stats.gaussian_kde / anomalib)."""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianKDE(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("dataset", torch.empty(0))  # (N, D) training points, pre-whitened
        self.register_buffer("whiten", torch.empty(0))  # (D, D) so that x @ whiten has the kernel's unit cov
        self.register_buffer("log_norm", torch.empty(0))

    def fit(self, points: torch.Tensor) -> "GaussianKDE":
        points = points.double()
        n, d = points.shape
        factor = n ** (-1.0 / (d + 4))  # Scott's rule
        cov = torch.cov(points.T).reshape(d, d) * factor**2
        cov = cov + 1e-10 * torch.eye(d, dtype=cov.dtype)  # guards rank-deficient data
        chol = torch.linalg.cholesky(torch.linalg.inv(cov))
        self.whiten = chol.float()
        self.dataset = (points @ chol).float()
        log_det = torch.linalg.slogdet(cov).logabsdet
        self.log_norm = (-0.5 * (d * math.log(2 * math.pi) + log_det) - math.log(n)).float().reshape(1)
        return self

    def log_density(self, points: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """log p(x) for each row of `points` (M, D)."""
        from .nearest_neighbors import squared_distances

        white = points.float() @ self.whiten
        out = []
        for start in range(0, white.shape[0], chunk):
            sq = squared_distances(white[start : start + chunk], self.dataset)
            out.append(torch.logsumexp(-0.5 * sq, dim=1) + self.log_norm)
        return torch.cat(out)
