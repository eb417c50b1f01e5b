"""PCA fitted either from the data matrix (SVD) or from exact moments (eigh of the covariance).

Both give the same components, so distributed fits can reduce whichever is smaller to move:
the rows themselves (N x D) or the moments (D x D).

How many components are kept (`n_components`):
- an int >= 1: that many (at most the number there are), as anomalib's PCA for an int > 1 and for
  DFKDE / R-KDE's fixed counts;
- a float in (0, 1): anomalib's variance rule, exactly: with r_j the cumulative explained-variance ratio
  of the first j + 1 components, keep j components, j the first index where r_j >= level. That is the
  components whose cumulative ratio stays BELOW the level (anomalib slices `[:index]` with the index of
  the first ratio reaching it), not the smallest set reaching it. One deviation: at least one component
  is kept, where anomalib keeps none when the first component alone reaches the level (no model: its
  NLL is then a constant);
- the float 1.0: every component with non-zero variance (the rank of the centered data). anomalib's rule
  at 1.0 would drop the last non-zero component, or fail outright when rounding leaves the final
  cumulative ratio just below 1.0; "all the variance" keeps all of it here.
"""

from __future__ import annotations

import torch
from torch import nn

_EPS64 = torch.finfo(torch.float64).eps


class PCA(nn.Module):
    def __init__(self, n_components: float | int):
        super().__init__()
        if isinstance(n_components, bool) or not (
                (isinstance(n_components, int) and n_components >= 1)
                or (isinstance(n_components, float) and 0 < n_components <= 1)):
            raise ValueError(f"PCA n_components={n_components!r}: expected an int >= 1 (a count) or a float "
                             "in (0, 1] (a fraction of the variance; 1.0 = every non-zero component)")
        self.n_components = n_components
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("components", torch.empty(0))  # (k, D)
        self.register_buffer("explained_variance", torch.empty(0))  # (k,) biased (1/N) variances

    def fit(self, data: torch.Tensor) -> "PCA":
        data = data.double()
        mean = data.mean(0)
        _, s, vh = torch.linalg.svd(data - mean, full_matrices=False)
        # Rank tolerance (numpy's matrix_rank on the centered data), in variance units.
        noise = (s.max() * max(data.shape) * _EPS64) ** 2 / data.shape[0] if s.numel() else 0.0
        return self._keep(mean, vh, s**2 / data.shape[0], float(noise))

    def fit_from_moments(self, count: int, total: torch.Tensor, outer: torch.Tensor) -> "PCA":
        """count N, total = sum x (D,), outer = sum x x^T (D, D), all float64."""
        mean = total / count
        second = outer / count
        cov = second - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        order = eigvals.flip(0).clamp_min(0)
        # E[xx^T] - mean mean^T cancels: its rounding error bounds what a zero variance can read as.
        noise = cov.shape[0] * _EPS64 * float(second.diagonal().abs().max()) if cov.numel() else 0.0
        return self._keep(mean, eigvecs.flip(1).T, order, noise)

    def _keep(self, mean: torch.Tensor, vh: torch.Tensor, variances: torch.Tensor, noise: float) -> "PCA":
        k = self.count(variances, noise)
        # Sign convention: largest-magnitude loading positive, so SVD and eigh fits agree exactly.
        comps = vh[:k]
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        self.mean = mean.float()
        self.components = (comps * signs).float()
        self.explained_variance = variances[:k].float()
        return self

    def count(self, variances: torch.Tensor, noise: float = 0.0) -> int:
        """Components kept for these variances (descending); `noise`: the largest variance that counts as
        zero (used by the 1.0 level only)."""
        n = self.n_components
        if isinstance(n, int):
            return min(n, len(variances))
        if n == 1.0:
            return max(1, int((variances > noise).sum()))
        ratio = torch.cumsum(variances, 0) / variances.sum().clamp_min(1e-300)
        reached = torch.nonzero(ratio >= n)
        # Rounding can leave the last ratio a hair below a level close to 1: then every component counts.
        first = int(reached[0]) if len(reached) else len(variances)
        return max(1, first)

    def transform(self, data: torch.Tensor) -> torch.Tensor:
        return (data - self.mean) @ self.components.T

    def inverse_transform(self, projected: torch.Tensor) -> torch.Tensor:
        return projected @ self.components + self.mean
