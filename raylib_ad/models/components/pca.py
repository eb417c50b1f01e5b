"""PCA fitted either from the data matrix (SVD) or from exact moments (eigh of the covariance).

Both give the same components, so distributed fits can reduce whichever is smaller to move:
the rows themselves (N x D) or the moments (D x D).
"""

from __future__ import annotations

import torch
from torch import nn


class PCA(nn.Module):
    def __init__(self, n_components: float | int):
        super().__init__()
        self.n_components = n_components
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("components", torch.empty(0))  # (k, D)
        self.register_buffer("explained_variance", torch.empty(0))  # (k,) biased (1/N) variances

    def fit(self, data: torch.Tensor) -> "PCA":
        data = data.double()
        mean = data.mean(0)
        _, s, vh = torch.linalg.svd(data - mean, full_matrices=False)
        return self._keep(mean, vh, s**2 / data.shape[0])

    def fit_from_moments(self, count: int, total: torch.Tensor, outer: torch.Tensor) -> "PCA":
        """count N, total = sum x (D,), outer = sum x x^T (D, D), all float64."""
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        order = eigvals.flip(0).clamp_min(0)
        return self._keep(mean, eigvecs.flip(1).T, order)

    def _keep(self, mean: torch.Tensor, vh: torch.Tensor, variances: torch.Tensor) -> "PCA":
        k = self._count(variances)
        # Sign convention: largest-magnitude loading positive, so SVD and eigh fits agree exactly.
        comps = vh[:k]
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        self.mean = mean.float()
        self.components = (comps * signs).float()
        self.explained_variance = variances[:k].float()
        return self

    def _count(self, variances: torch.Tensor) -> int:
        if isinstance(self.n_components, float) and 0 < self.n_components < 1:
            ratio = torch.cumsum(variances, 0) / variances.sum().clamp_min(1e-30)
            return int(torch.searchsorted(ratio, torch.tensor(self.n_components, dtype=ratio.dtype))) + 1
        return min(int(self.n_components), len(variances))

    def transform(self, data: torch.Tensor) -> torch.Tensor:
        return (data - self.mean) @ self.components.T

    def inverse_transform(self, projected: torch.Tensor) -> torch.Tensor:
        return projected @ self.components + self.mean
