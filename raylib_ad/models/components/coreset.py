"""k-center greedy coreset selection (Sener & Savarese 2018), as PatchCore uses it.

One pass over the data per pick: a running vector of each point's squared distance to the nearest
selected center is updated with a single matrix-vector product against the new center, so memory stays
O(N) and no N x M distance matrix is ever built. Works on whatever device the features live on.
"""

from __future__ import annotations

import torch

from raylib_ad.progress import progress_bar


def random_projection(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Gaussian random projection to `dim` columns (Johnson-Lindenstrauss): distances are kept up to a
    small factor, which is all the greedy argmax needs, at a fraction of the cost."""
    if dim <= 0 or features.shape[1] <= dim:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / dim**0.5
    return features @ matrix.to(features.device, features.dtype)


def k_center_greedy(
    features: torch.Tensor,
    n_select: int,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool = False,
    desc: str = "coreset",
) -> torch.Tensor:
    """Indices (sorted by pick order) of `n_select` rows of `features` chosen by k-center greedy.

    The first center is a seeded random row; each next one is the row farthest from all chosen so far.
    """
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n, device=features.device)
    if n_select <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    points = random_projection(features.float(), projection_dim, seed)
    sq_norms = points.pow(2).sum(1)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=generator))
    selected = torch.empty(n_select, dtype=torch.long, device=features.device)
    min_dist = torch.full((n,), float("inf"), device=points.device)
    index = first
    for step in progress_bar(range(n_select), desc=desc, enabled=progress):
        selected[step] = index
        center = points[index]
        dist = sq_norms - 2 * (points @ center) + sq_norms[index]
        torch.minimum(min_dist, dist, out=min_dist)
        min_dist[index] = -1.0  # never pick a chosen point twice, even with duplicate rows
        index = int(torch.argmax(min_dist))
    return selected


def covering_radius(points: torch.Tensor, centers: torch.Tensor, chunk: int = 8192) -> float:
    """max over points of the distance to the nearest center: the k-center objective."""
    from raylib_ad.models.components.nearest_neighbors import nearest_neighbors

    dist, _ = nearest_neighbors(points, centers, k=1, query_chunk=chunk)
    return float(dist.max())
