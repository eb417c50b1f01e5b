"""k-center greedy coreset selection (Sener & Savarese 2018), as PatchCore uses it, on one process or
exactly across workers.

One pass over the data per pick: a running vector of each point's squared distance to the nearest
selected center is updated with a single matrix-vector product against the new center, so memory stays
O(N) and no N x M distance matrix is ever built. Works on whatever device the features live on.
"""

from __future__ import annotations

import math

import torch

from ... import distributed
from ...progress import progress_bar


def johnson_lindenstrauss_dim(n_samples: int, eps: float = 0.9) -> int:
    """Smallest projection dimension that keeps all pairwise distances within (1 +- eps) with high
    probability (the bound scikit-learn and anomalib's PatchCore use, with eps = 0.9)."""
    return int(4 * math.log(max(n_samples, 2)) / (eps**2 / 2 - eps**3 / 3))


def random_projection(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian random projection to `dim` columns (Johnson-Lindenstrauss): distances are kept up to a
    small factor, which is all the greedy argmax needs, at a fraction of the cost. The matrix depends on
    the seed only, so every worker projects alike."""
    if dim <= 0 or features.shape[1] <= dim:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / dim**0.5
    return features @ matrix.to(features.device, features.dtype)


def _projected(features: torch.Tensor, projection_dim: int | str, total_rows: int, seed: int) -> torch.Tensor:
    if projection_dim == "auto":
        projection_dim = johnson_lindenstrauss_dim(total_rows)
    return random_projection(features.float(), int(projection_dim), seed)


class _MinDistances:
    """Squared distance from each point to its nearest chosen center, updated one center at a time."""

    def __init__(self, points: torch.Tensor):
        self.points = points
        self.sq_norms = points.pow(2).sum(1)
        self.values = torch.full((points.shape[0],), float("inf"), device=points.device)

    def add_center(self, center: torch.Tensor) -> None:
        dist = torch.addmv(self.sq_norms, self.points, center, alpha=-2) + center.pow(2).sum()
        torch.minimum(self.values, dist, out=self.values)

    def exclude(self, index: int) -> None:
        self.values[index] = -1.0  # a chosen point is never picked again, even with duplicate rows


def k_center_greedy(
    features: torch.Tensor,
    n_select: int,
    *,
    projection_dim: int | str = "auto",
    seed: int = 0,
    progress: bool = False,
    desc: str = "coreset",
) -> torch.Tensor:
    """Indices (in pick order) of `n_select` rows of `features` chosen by k-center greedy.

    The first center is a seeded random row; each next one is the row farthest from all chosen so far.
    projection_dim "auto" projects only when the Johnson-Lindenstrauss dimension is below the feature
    dimension (as anomalib does); 0 never projects.
    """
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n, device=features.device)
    if n_select <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    points = _projected(features, projection_dim, n, seed)
    state = _MinDistances(points)
    index = _first_index(n, seed)
    selected = torch.empty(n_select, dtype=torch.long, device=features.device)
    for step in progress_bar(range(n_select), desc=desc, enabled=progress):
        selected[step] = index
        state.add_center(points[index])
        state.exclude(index)
        index = int(torch.argmax(state.values))
    return selected


def _first_index(n: int, seed: int) -> int:
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))


def distributed_k_center_greedy(
    local: torch.Tensor,
    n_select: int,
    *,
    projection_dim: int | str = "auto",
    seed: int = 0,
    progress: bool = False,
    desc: str = "coreset",
) -> torch.Tensor:
    """k-center greedy over the union of every worker's rows, without moving the rows: per pick, each
    worker proposes its farthest point, the farthest proposal wins, and its owner broadcasts it.

    Returns the selected rows (n_select, D), identical on every worker and equal to what
    `k_center_greedy` picks on the rank-ordered concatenation of all workers' rows. Costs one pass over
    the local rows plus two small collectives per pick.
    """
    counts = distributed.all_gather_rows(torch.tensor([[local.shape[0]]], dtype=torch.long))[:, 0].tolist()
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    total, rank = sum(counts), distributed.rank()
    n_select = min(n_select, total)
    points = _projected(local, projection_dim, total, seed)
    state = _MinDistances(points)
    owner_of = torch.tensor(offsets + [total])
    chosen = _first_index(total, seed)
    rows = torch.empty(n_select, local.shape[1], dtype=local.dtype, device=local.device)
    width = local.shape[1]
    for step in progress_bar(range(n_select), desc=desc, enabled=progress):
        owner = int(torch.searchsorted(owner_of, chosen, right=True)) - 1
        local_index = chosen - offsets[owner]
        if owner == rank:
            payload = torch.cat([local[local_index].float(), points[local_index]])
        else:
            payload = torch.empty(width + points.shape[1], device=local.device)
        payload = distributed.broadcast(payload, src=owner)
        rows[step] = payload[:width].to(local.dtype)
        state.add_center(payload[width:])
        if owner == rank:
            state.exclude(local_index)
        chosen = _farthest_global_index(state.values, offsets[rank])
    return rows


def _farthest_global_index(values: torch.Tensor, offset: int) -> int:
    """The global index of the farthest point over all workers; ties go to the lowest global index,
    as torch.argmax does in a single process."""
    if values.numel():
        best = int(torch.argmax(values))
        proposal = torch.tensor([[float(values[best]), float(offset + best)]], dtype=torch.float64)
    else:
        proposal = torch.tensor([[-math.inf, math.inf]], dtype=torch.float64)
    proposals = distributed.all_gather_rows(proposal)
    top = proposals[:, 0].max()
    return int(proposals[proposals[:, 0] == top, 1].min())


def covering_radius(points: torch.Tensor, centers: torch.Tensor, chunk: int = 8192) -> float:
    """max over points of the distance to the nearest center: the k-center objective."""
    from .nearest_neighbors import nearest_neighbors

    dist, _ = nearest_neighbors(points, centers, k=1, query_chunk=chunk)
    return float(dist.max())
