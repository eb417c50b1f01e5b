"""k-center greedy coreset selection (Sener & Savarese 2018), as PatchCore uses it.

One pass over the data per pick: a running vector of each point's squared distance to the nearest
selected center is updated with a single matrix-vector product against the new center, so memory stays
O(N) and no N x M distance matrix is ever built. Works on whatever device the features live on.
"""

from __future__ import annotations

import math

import torch

from raylib_ad.progress import progress_bar


def johnson_lindenstrauss_dim(n_samples: int, eps: float = 0.9) -> int:
    """Smallest projection dimension that keeps all pairwise distances within (1 +- eps) with high
    probability (the bound scikit-learn and anomalib's PatchCore use, with eps = 0.9)."""
    return int(4 * math.log(n_samples) / (eps**2 / 2 - eps**3 / 3))


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
    projection_dim: int | str = "auto",
    seed: int = 0,
    progress: bool = False,
    desc: str = "coreset",
) -> torch.Tensor:
    """Indices (in pick order) of `n_select` rows of `features` chosen by k-center greedy.

    The first center is a seeded random row; each next one is the row farthest from all chosen so far.
    projection_dim "auto" projects only when the Johnson-Lindenstrauss dimension is below the feature
    dimension (as anomalib does); 0 never projects.

    Exact, but pruned by the triangle inequality: a point assigned to center a cannot get closer to the
    new center c when d(a, c) >= 2 * radius(a), so whole groups are skipped. After the first picks most
    groups are skipped, and a pick touches a small part of the data instead of all of it.
    """
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n, device=features.device)
    if n_select <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    if projection_dim == "auto":
        projection_dim = johnson_lindenstrauss_dim(n)
    points = random_projection(features.float(), int(projection_dim), seed)
    sq_norms = points.pow(2).sum(1)
    # Slack for float rounding in the pruning test: only prune groups that are clearly out of reach.
    slack = 1e-3 * float(sq_norms.mean().sqrt())
    generator = torch.Generator().manual_seed(seed)
    index = int(torch.randint(n, (1,), generator=generator))
    device = points.device
    selected = torch.empty(n_select, dtype=torch.long, device=device)
    min_dist = torch.full((n,), float("inf"), device=device)  # squared distance to the nearest center
    assign = torch.zeros(n, dtype=torch.long, device=device)  # pick number of that center
    radius = torch.zeros(n_select, device=device)  # farthest member of each center's group
    for step in progress_bar(range(n_select), desc=desc, enabled=progress):
        selected[step] = index
        center = points[index]
        if step == 0:
            candidates = None
        else:
            centers = points[selected[:step]]
            to_centers = (sq_norms[selected[:step]] - 2 * (centers @ center) + sq_norms[index]).clamp_min(0).sqrt()
            reachable = to_centers < 2 * radius[:step] + slack
            candidates = None if bool(reachable.all()) else reachable[assign].nonzero().squeeze(1)
            radius[:step][reachable] = 0  # recomputed below from the re-examined members
        if candidates is None:
            dist = torch.addmv(sq_norms, points, center, alpha=-2) + sq_norms[index]
            closer = dist < min_dist
            min_dist = torch.where(closer, dist, min_dist)
            assign = torch.where(closer, step, assign)
            members = slice(None)
        else:
            dist = torch.addmv(sq_norms[candidates], points[candidates], center, alpha=-2) + sq_norms[index]
            closer = dist < min_dist[candidates]
            moved = candidates[closer]
            min_dist[moved] = dist[closer]
            assign[moved] = step
            members = candidates
        min_dist[index] = -1.0  # a chosen point is never picked again, even with duplicate rows
        radius.scatter_reduce_(0, assign[members], min_dist[members].clamp_min(0).sqrt(), "amax")
        index = int(torch.argmax(min_dist))
    return selected


def covering_radius(points: torch.Tensor, centers: torch.Tensor, chunk: int = 8192) -> float:
    """max over points of the distance to the nearest center: the k-center objective."""
    from raylib_ad.models.components.nearest_neighbors import nearest_neighbors

    dist, _ = nearest_neighbors(points, centers, k=1, query_chunk=chunk)
    return float(dist.max())
