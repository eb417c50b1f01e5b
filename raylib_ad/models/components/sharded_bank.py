"""A memory bank searched in parts: exact k-nearest neighbours over a bank larger than one replica's memory.

Each shard holds a contiguous range of the bank's rows and answers with its k best (squared distances and
GLOBAL row indices); `merge_neighbors` keeps the k best of all shards' answers. That is the single bank's
answer exactly, not an approximation: the k nearest of the union are among the union of each part's k
nearest. Ties (equal distances) at k = 1 resolve to the lowest global index, as the single-bank search does
(nearest_neighbors.py), because the shards are merged in row order and a minimum keeps the first.

Ray-free. A shard is anything with `offset`, `__len__`, `search(queries, k, squared=True)` and
`rows(global_indices)`: a `BankShard` in this process, or a proxy that calls a remote replica holding one
(raylib_ad/scoring/sharded_bank.py: Ray actors). `ShardedBank(map_fn=...)` lets that proxy fan a search
out to every shard at once instead of one after another.

PatchCore scores with either a `BankShard` over its whole bank (what `forward` does) or a `ShardedBank`:
`model.score_patches(patches, grid, bank)`; its image score's re-weighting step (the k nearest bank rows
of the worst patch's neighbour, and their features) goes through the same two calls.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from .nearest_neighbors import nearest_neighbors


class BankShard:
    """Rows [offset, offset + len) of a bank, in this process; the whole bank when offset is 0."""

    def __init__(self, rows: torch.Tensor, offset: int = 0, *, query_chunk: int = 8192):
        self.bank = rows
        self.offset = int(offset)
        self.query_chunk = int(query_chunk)
        # Squared row norms once, not on every search (a 78k x 152 bank: one 47 MB pass per call).
        # Not while tracing: the trace would fold them into a constant beside memory_bank.
        self._bank_sq = None if _tracing() else rows.pow(2).sum(1)

    def __len__(self) -> int:
        return int(self.bank.shape[0])

    def search(self, queries: torch.Tensor, k: int, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, min(k, len)) distances and global indices of this shard's k nearest rows, nearest first."""
        return nearest_neighbors(queries.to(self.bank.device), self.bank, k, query_chunk=self.query_chunk,
                                 bank_sq=self._bank_sq, index_offset=self.offset, squared=squared)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """The feature rows at these global indices (all of them inside this shard)."""
        return self.bank[indices.to(self.bank.device) - self.offset if self.offset else indices.to(self.bank.device)]


def merge_neighbors(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of several shards' (squared distances, global indices) answers for the same queries.
    `parts` in row order of the shards; ties keep the earlier part (k = 1: the lowest global index)."""
    dist = torch.cat([d for d, _ in parts], 1)
    index = torch.cat([i.to(dist.device) for _, i in parts], 1)
    k = min(k, dist.shape[1])
    if k == 1:
        value, pick = dist.min(1, keepdim=True)  # the first minimum: the earliest shard
    else:
        value, pick = torch.sort(dist, dim=1, stable=True)
        value, pick = value[:, :k], pick[:, :k]
    return value, index.gather(1, pick)


def _sequential(fn, shards):
    return [fn(s) for s in shards]


class ShardedBank:
    """Exact search over several shards: each returns its k best, `merge_neighbors` keeps the k best."""

    def __init__(self, shards: Iterable, *, map_fn: Callable | None = None):
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("a sharded bank needs at least one shard")
        self.offsets = [int(s.offset) for s in self.shards]
        self.sizes = [len(s) for s in self.shards]
        expected = 0
        for offset, size in zip(self.offsets, self.sizes):
            if offset != expected:
                raise ValueError(f"shards must cover the bank's rows in order without gaps: a shard starts at "
                                 f"{offset}, expected {expected}")
            expected += size
        self._starts = torch.tensor(self.offsets)
        # map_fn(fn, shards) -> [fn(shard) for shard in shards], possibly in parallel (remote shards).
        self.map_fn = map_fn or _sequential

    @classmethod
    def split(cls, bank: torch.Tensor, shards: int, *, query_chunk: int = 8192) -> "ShardedBank":
        """A bank in this process cut into `shards` contiguous parts (for tests and single-machine use)."""
        parts, offset = [], 0
        for rows in torch.tensor_split(bank, shards):
            if len(rows):
                parts.append(BankShard(rows.contiguous(), offset, query_chunk=query_chunk))
            offset += len(rows)
        return cls(parts)

    def __len__(self) -> int:
        return sum(self.sizes)

    def search(self, queries: torch.Tensor, k: int, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.map_fn(lambda shard: shard.search(queries, k, squared=True), self.shards)
        dist, index = merge_neighbors(parts, k)
        return (dist if squared else dist.sqrt()), index

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Feature rows at global indices, each fetched from the shard that holds it."""
        flat = indices.reshape(-1).cpu()
        owner = torch.searchsorted(self._starts, flat, right=True) - 1
        out = None
        for s in owner.unique().tolist():
            where = (owner == s).nonzero().squeeze(1)
            got = self.shards[s].rows(flat[where])
            if out is None:
                out = torch.empty(flat.shape[0], got.shape[-1], dtype=got.dtype, device=got.device)
            out[where.to(got.device)] = got
        if out is None:  # no indices asked
            return torch.empty(*indices.shape, 0)
        return out.view(*indices.shape, out.shape[-1])


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()
