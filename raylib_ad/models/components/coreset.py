"""k-center greedy coreset selection (Sener & Savarese 2018), as PatchCore uses it, on one process or
exactly across workers.

A running vector holds each point's squared distance to the nearest selected center, so memory stays
O(N) and no N x M distance matrix is ever built. Two ways to keep it, with the same picks up to float
rounding: "plain" updates every point with one matrix-vector product per pick (one read of the whole
matrix per pick: memory-bound, the choice on accelerators); "lazy" (the CPU default) updates a block of
points only when it might hold the farthest point, against all the centers it missed at once, which
turns the memory-bound passes into compute-bound matrix products (~10x faster on 2 CPU cores; numbers
and command in docs/benchmarks.md, jobs/coreset_benchmark.py). Works on whatever device the features
live on.
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
    """Squared distance from each point to its nearest chosen center, updated one center at a time: one
    matrix-vector pass over all points per center. Memory-bound on a CPU; the choice for accelerators."""

    def __init__(self, points: torch.Tensor):
        self.points = points
        self.sq_norms = points.pow(2).sum(1)
        self.values = torch.full((points.shape[0],), float("inf"), device=points.device)

    def add_center(self, center: torch.Tensor) -> None:
        dist = torch.addmv(self.sq_norms, self.points, center, alpha=-2) + center.pow(2).sum()
        torch.minimum(self.values, dist, out=self.values)

    def exclude(self, index: int) -> None:
        self.values[index] = -math.inf  # a chosen point is never picked again, even with duplicate rows

    def farthest(self) -> tuple[float, int] | None:
        """(squared distance, index) of the point farthest from every center; the lowest index on ties."""
        if not self.values.numel():
            return None
        index = int(torch.argmax(self.values))
        return float(self.values[index]), index


class _LazyMinDistances:
    """The same distances and the same farthest point as _MinDistances, with most of the work skipped.

    Points are cut into blocks of consecutive rows. Each block remembers how many centers it has been
    updated with and an upper bound of its largest distance (distances only shrink as centers are added,
    so a stale bound stays a bound). To find the farthest point, the block with the largest bound is
    brought up to date - against all the centers it missed, in one matrix-matrix product that reads the
    block once - until the top block is current: its largest distance then beats every other block's
    bound, so it is the global maximum. Consecutive centers lie far apart, so the top block is rarely
    touched by the newest ones and one or two updates per pick suffice; a block's rows are read from memory
    a few times per hundreds of centers instead of once per center. Every point-center distance is still
    computed (at most once), so the picks are those of the plain pass: only float rounding differs (a
    matrix product sums in another order than a matrix-vector product), which can swap two candidates
    whose squared distances agree to about 1e-6 relative.
    """

    def __init__(self, points: torch.Tensor, capacity: int, block_rows: int = 512, center_chunk: int = 512):
        self.points = points
        self.sq_norms = points.pow(2).sum(1)
        self.values = torch.full((points.shape[0],), float("inf"), device=points.device)
        self.block_rows, self.center_chunk = block_rows, center_chunk
        n_blocks = -(-points.shape[0] // block_rows)
        self.bounds = torch.full((n_blocks,), float("inf"), device=points.device)
        self.applied = [0] * n_blocks  # centers each block has been updated with
        self.centers = torch.empty(capacity, points.shape[1], dtype=points.dtype, device=points.device)
        self.center_sq = torch.empty(capacity, dtype=points.dtype, device=points.device)
        self.count = 0

    def add_center(self, center: torch.Tensor) -> None:
        self.centers[self.count] = center
        self.center_sq[self.count] = center.pow(2).sum()
        self.count += 1

    def exclude(self, index: int) -> None:
        self.values[index] = -math.inf

    def farthest(self) -> tuple[float, int] | None:
        if not self.values.numel():
            return None
        while True:
            block = int(torch.argmax(self.bounds))  # the lowest block on ties, so ties go to the lowest row
            start = block * self.block_rows
            if self.applied[block] == self.count:
                values = self.values[start:start + self.block_rows]
                offset = int(torch.argmax(values))
                return float(values[offset]), start + offset
            self._update(block, start)

    def _update(self, block: int, start: int) -> None:
        rows = slice(start, start + self.block_rows)
        points, values = self.points[rows], self.values[rows]
        for first in range(self.applied[block], self.count, self.center_chunk):
            last = min(first + self.center_chunk, self.count)
            # (centers x rows): the min over centers then runs along contiguous rows of the product, and
            # |x|^2 is added once per point after it instead of once per pair.
            dist = torch.addmm(self.center_sq[first:last, None], self.centers[first:last], points.T, alpha=-2)
            torch.minimum(values, dist.amin(0).add_(self.sq_norms[rows]), out=values)
        self.applied[block] = self.count
        self.bounds[block] = values.max()


# Rows per lazy block: smaller blocks have tighter bounds and take more centers per update (better matrix
# products) but cost more Python per pick; 512 was fastest on Magnetic Tile's 152-d patch features.
LAZY_BLOCK_ROWS = 512


def _distance_state(points: torch.Tensor, capacity: int, method: str):
    if method == "auto":
        # Accelerators have the bandwidth for one pass per pick and pay per kernel launch and host sync;
        # a CPU is bandwidth-bound and gains from reading each block rarely.
        method = "lazy" if points.device.type == "cpu" else "plain"
    if method == "lazy":
        return _LazyMinDistances(points, capacity, block_rows=LAZY_BLOCK_ROWS)
    if method == "plain":
        return _MinDistances(points)
    raise ValueError(f"k-center greedy method {method!r}: expected 'auto', 'lazy' or 'plain'")


def k_center_greedy(
    features: torch.Tensor,
    n_select: int,
    *,
    projection_dim: int | str = "auto",
    seed: int = 0,
    progress: bool = False,
    desc: str = "coreset",
    method: str = "auto",
) -> torch.Tensor:
    """Indices (in pick order) of `n_select` rows of `features` chosen by k-center greedy.

    The first center is a seeded random row; each next one is the row farthest from all chosen so far.
    projection_dim "auto" projects only when the Johnson-Lindenstrauss dimension is below the feature
    dimension (as anomalib does); 0 never projects. method "lazy" (the CPU default) and "plain" (the
    default elsewhere) pick the same points up to float rounding; see _LazyMinDistances.
    """
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n, device=features.device)
    if n_select <= 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    points = _projected(features, projection_dim, n, seed)
    state = _distance_state(points, n_select, method)
    index = _first_index(n, seed)
    selected = torch.empty(n_select, dtype=torch.long, device=features.device)
    for step in progress_bar(range(n_select), desc=desc, enabled=progress):
        selected[step] = index
        state.add_center(points[index])
        state.exclude(index)
        if step + 1 < n_select:
            index = state.farthest()[1]
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
    method: str = "auto",
) -> torch.Tensor:
    """k-center greedy over the union of every worker's rows, without moving the rows: per pick, each
    worker proposes its farthest point, the farthest proposal wins, and its owner broadcasts it.

    Returns the selected rows (n_select, D), identical on every worker and equal to what
    `k_center_greedy` picks on the rank-ordered concatenation of all workers' rows (up to float rounding,
    see _LazyMinDistances). Per pick: two small collectives and, on each worker, one pass over its rows
    ("plain") or the update of a few of its blocks ("lazy").
    """
    counts = distributed.all_gather_rows(torch.tensor([[local.shape[0]]], dtype=torch.long))[:, 0].tolist()
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    total, rank = sum(counts), distributed.rank()
    n_select = min(n_select, total)
    points = _projected(local, projection_dim, total, seed)
    state = _distance_state(points, n_select, method)
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
        if step + 1 < n_select:
            chosen = _farthest_global_index(state.farthest(), offsets[rank])
    return rows


def _farthest_global_index(local_best: tuple[float, int] | None, offset: int) -> int:
    """The global index of the farthest point over all workers; ties go to the lowest global index,
    as torch.argmax does in a single process."""
    if local_best is not None:
        proposal = torch.tensor([[local_best[0], float(offset + local_best[1])]], dtype=torch.float64)
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
