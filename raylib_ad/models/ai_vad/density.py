"""Density models of the region attributes (anomalib's density.py): a Gaussian mixture for velocity, k
nearest neighbours for pose and deep features. Each turns a region into a score normalized by the min and
max of the training regions' own scores; a region's score is the sum over attributes, a frame's the sum
over attributes of the highest region score (0 for a frame without regions).

Everything fitted is a buffer (float64 for the mixture), so a model directory reproduces the scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn

GMM_ITERATIONS, GMM_TOL, GMM_REG = 100, 1e-3, 1e-6  # anomalib's GaussianMixture defaults
KMEANS_ITERATIONS = 10  # anomalib's KMeans (the mixture's initialization)
_EPS = 10 * torch.finfo(torch.float64).eps  # added to component counts: an emptied component stays finite
_CHUNK = 1024  # rows per distance block


def _normalize(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    span = high - low
    # A constant training score (one region, identical regions) would divide by zero; scores are then
    # shifted only.
    return (values - low) / torch.where(span > 0, span, torch.ones_like(span))


class GaussianMixture(nn.Module):
    """A full-covariance Gaussian mixture fitted by EM from a k-means start (anomalib's GaussianMixture:
    k-means with random initial centres, 10 iterations; EM until the mean log-likelihood changes by less
    than 1e-3, at most 100 iterations; 1e-6 added to the covariance diagonals). Score: -log p(x)."""

    def __init__(self, n_components: int):
        super().__init__()
        self.n_components = int(n_components)
        for name in ("means", "covariances", "weights", "min", "max"):
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.means.numel() > 0

    def fit(self, data: torch.Tensor, generator: torch.Generator) -> None:
        data = data.double()
        if data.shape[0] < self.n_components:
            raise ValueError(f"ai_vad: the velocity mixture has n_components_velocity={self.n_components} but the "
                             f"training clips gave only {data.shape[0]} regions")
        labels = kmeans(data, self.n_components, generator)
        self._m_step(data, torch.nn.functional.one_hot(labels, self.n_components).double())
        previous = torch.tensor(0.0, dtype=torch.float64)
        for _ in range(GMM_ITERATIONS):
            weighted = self._weighted_log_prob(data)
            norm = torch.logsumexp(weighted, dim=1)
            self._m_step(data, (weighted - norm[:, None]).exp())
            mean_ll = norm.mean()
            if (mean_ll - previous).abs() < GMM_TOL:
                break
            previous = mean_ll
        scores = self.score(data)
        self.min, self.max = scores.min(), scores.max()

    def _m_step(self, data: torch.Tensor, resp: torch.Tensor) -> None:
        counts = resp.sum(0) + _EPS
        self.weights = counts / counts.sum()
        self.means = (resp.T @ data) / counts[:, None]
        diff = data.unsqueeze(0) - self.means.unsqueeze(1)  # (K, N, D)
        cov = torch.einsum("kn,knd,kne->kde", resp.T, diff, diff) / counts[:, None, None]
        self.covariances = cov + GMM_REG * torch.eye(data.shape[1], dtype=data.dtype, device=data.device)

    def _weighted_log_prob(self, data: torch.Tensor) -> torch.Tensor:
        """(N, K): log N(x | mu_k, Sigma_k) + log pi_k."""
        chol = torch.linalg.cholesky(self.covariances)  # (K, D, D)
        diff = (data.unsqueeze(0) - self.means.unsqueeze(1)).transpose(1, 2)  # (K, D, N)
        solved = torch.linalg.solve_triangular(chol, diff, upper=False)
        maha = solved.pow(2).sum(1)  # (K, N)
        log_det = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        dim = data.shape[1]
        log_prob = -0.5 * (dim * math.log(2 * math.pi) + log_det[:, None] + maha)
        return (log_prob + torch.log(self.weights)[:, None]).T

    def log_likelihood(self, data: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._weighted_log_prob(data.double()), dim=1)

    def score(self, data: torch.Tensor) -> torch.Tensor:
        return -self.log_likelihood(data)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        return _normalize(self.score(data), self.min, self.max).float()


def kmeans(data: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Labels of Lloyd's k-means from k random data points (anomalib's KMeans, but seeded)."""
    start = torch.randint(0, data.shape[0], (k,), generator=generator).to(data.device)
    centres = data[start].clone()
    labels = torch.zeros(data.shape[0], dtype=torch.long, device=data.device)
    for _ in range(KMEANS_ITERATIONS):
        labels = torch.cdist(data, centres).argmin(dim=1)
        for j in range(k):
            members = labels == j
            if members.any():
                centres[j] = data[members].mean(dim=0)
    return labels


class GroupedKNN(nn.Module):
    """Mean distance to the k nearest training regions. The normalization statistics are taken over the
    training regions, each scored against the regions of the *other* groups (videos) only, so that a
    region is not its own (or its neighbouring frame's) nearest neighbour (anomalib's GroupedKNNEstimator).
    """

    def __init__(self, n_neighbors: int):
        super().__init__()
        self.n_neighbors = int(n_neighbors)
        self.register_buffer("memory_bank", torch.empty(0))
        self.register_buffer("min", torch.empty(0))
        self.register_buffer("max", torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.memory_bank.numel() > 0

    def fit(self, features: torch.Tensor, groups: torch.Tensor) -> None:
        k = self.n_neighbors
        if features.shape[0] <= k:
            raise ValueError(f"ai_vad: k nearest neighbours with k={k} need more than {k} training regions; "
                             f"the training clips gave {features.shape[0]}")
        if torch.unique(groups).numel() < 2:  # one video: leave each region out on its own instead
            groups = torch.arange(features.shape[0], device=features.device)
        self.memory_bank = features.float()
        low, high = torch.tensor(math.inf), torch.tensor(-math.inf)
        for start in range(0, features.shape[0], _CHUNK):
            rows = self.memory_bank[start : start + _CHUNK]
            dist = torch.cdist(rows, self.memory_bank)
            same = groups[start : start + _CHUNK, None] == groups[None, :]
            nearest = dist.masked_fill(same, math.inf).topk(k, dim=1, largest=False).values
            finite = nearest[torch.isfinite(nearest)]  # too few other-group regions: not counted
            if finite.numel():
                low, high = torch.minimum(low, finite.min().cpu()), torch.maximum(high, finite.max().cpu())
        if not torch.isfinite(low):
            raise ValueError(f"ai_vad: k={k} nearest neighbours from other videos: no training region has "
                             f"{k} regions in other videos")
        # anomalib takes max(min, group max) per group, which keeps only the last group's maximum; the
        # overall maximum is what its min-max normalization means, and does not depend on group order.
        self.min, self.max = low.to(features.device), high.to(features.device)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(N, k) Euclidean distances to the k nearest bank rows."""
        k = self.n_neighbors
        parts = [torch.cdist(rows.float(), self.memory_bank).topk(k, dim=1, largest=False).values
                 for rows in features.split(_CHUNK)] if features.shape[0] else [features.new_zeros(0, k)]
        return torch.cat(parts)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # anomalib normalizes each neighbour's distance, then averages over the k neighbours.
        return _normalize(self.distances(features), self.min, self.max).mean(dim=1)


class DensityModels(nn.Module):
    """The enabled attributes' density models, and how their scores combine."""

    def __init__(self, use: dict[str, bool], n_components_velocity: int, n_neighbors_pose: int,
                 n_neighbors_deep: int):
        super().__init__()
        self.use = dict(use)
        if use["velocity"]:
            self.velocity = GaussianMixture(n_components_velocity)
        if use["pose"]:
            self.pose = GroupedKNN(n_neighbors_pose)
        if use["deep"]:
            self.deep = GroupedKNN(n_neighbors_deep)

    def estimators(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in ("velocity", "pose", "deep") if self.use[name]}

    @property
    def fitted(self) -> bool:
        return all(est.fitted for est in self.estimators().values())

    def fit(self, features: dict[str, torch.Tensor], groups: torch.Tensor, generator: torch.Generator) -> None:
        for name, estimator in self.estimators().items():
            if name == "velocity":
                estimator.fit(features[name], generator)
            else:
                estimator.fit(features[name], groups)

    def score(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame's features (N, D) per attribute -> (region scores (N,), frame score ())."""
        n = next(iter(features.values())).shape[0]
        device = next(iter(features.values())).device
        if n == 0:
            return torch.zeros(0, device=device), torch.zeros((), device=device)
        per_attribute = [est(features[name]).to(device) for name, est in self.estimators().items()]
        regions = torch.stack(per_attribute).sum(0)
        frame = torch.stack([s.max() for s in per_attribute]).sum()
        return regions, frame
