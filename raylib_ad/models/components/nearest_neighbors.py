"""Exact k-nearest-neighbour search, blocked over the bank so that it runs near the machine's GEMM speed.

PatchCore compares every patch of every test image with every memory-bank row; that costs more flops
than the backbone (2 x 1,024 patches x 78,028 rows x 152 dims = 24.3 GFLOP per 256 px image at coreset
ratio 0.1), so the search is GEMMs, and everything around them must cost little beside them.

CPU (issue #26): queries in chunks of `query_chunk` rows, the bank in slices of `bank_chunk` rows (2,048:
a 1,024 x 2,048 distance block is 8 MB, it stays in L2/L3 between the GEMM that writes it and the pass
that reads it; a 65,536-row slice made a 268 MB block per image that went to DRAM and back). Per block:
one addmm (|b|^2 - 2 q.b; the per-row constant |q|^2 is added to the k survivors only, it does not change
the order), then a running merge:
- k = 1: `amin` per row (a vectorised pass, ~20x cheaper than `min` with indices), and the index (argmin)
  only for the rows this block improves. In random order a block improves a row with probability ~1/j
  at the j-th block, so ~4 of 38 blocks need the index pass instead of 38.
- k > 1: the rows whose block minimum beats their current k-th best are merged by top-k over
  [running k | block]; the others are skipped.
Exact: the same distances as one GEMM over the whole bank up to float rounding, so the same neighbours
except between candidates whose distances agree to rounding. k = 1 ties (equal computed distances)
resolve to the lowest bank index (strict "<" across blocks, argmin's first index within one), which is
also what the sharded merge (sharded_bank.py) returns.

Several CPU threads: the queries are cut into one slice per thread, each slice searched as above on one
thread, one join at the end (_blocked_in_slices; torch's thread count is set to 1 for the duration, process-
wide, and restored). Threading each block instead puts ~3 barriers in every 2,048 bank rows, and on a
machine where other jobs take a core away each barrier waits out a time slice.

CUDA: the same code with large blocks and no host synchronisation (min with indices, then where).
While a graph is traced (ONNX export, torch.compile) the plain form is used: one GEMM per
query_chunk x bank_chunk block, top-k merge (raylib_ad/export/exporter.py sets both chunks unbounded).
"""

from __future__ import annotations

import torch

# Distance-block size (entries) on CPU: 2^21 floats = 8 MB. jobs/knn_benchmark.py measures the choice.
CPU_BLOCK_ENTRIES = 2**21
CPU_BANK_CHUNK = 2048
CUDA_BANK_CHUNK = 16384
# CPU with several torch threads: query slices searched in parallel, one thread each (_blocked_in_slices).
PARALLEL_QUERY_SLICES = True
MIN_SLICE = 256  # query rows per thread at least (one 256 px image, 1,024 patches, splits over 4 threads)


def squared_distances(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    if bank_sq is None:
        bank_sq = bank.pow(2).sum(1)
    # |b|^2 - 2 q.b in one GEMM call, then + |q|^2 in place: two passes over the (Q, N) matrix fewer than
    # three separate operations (the same sum up to float rounding).
    dist = torch.addmm(bank_sq.unsqueeze(0), queries, bank.T, alpha=-2).add_(queries.pow(2).sum(1, keepdim=True))
    return dist.clamp_min_(0)


def nearest_neighbors(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    query_chunk: int = 8192,
    bank_chunk: int | None = None,
    bank_sq: torch.Tensor | None = None,
    index_offset: int = 0,
    squared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (Q, k) and indices (Q, k) of the k nearest bank rows for each query row,
    nearest first.

    bank_sq: the bank's squared row norms, if the caller keeps them (a fixed bank: computed once).
    index_offset: added to the returned indices (a shard of a larger bank returns global indices).
    squared: return squared distances (what a merge of several shards' answers compares).
    """
    k = min(k, bank.shape[0])
    queries = queries.to(bank.dtype)
    if bank_sq is None:
        bank_sq = bank.pow(2).sum(1)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        dist, idx = _plain(queries, bank, bank_sq, k, query_chunk, bank_chunk or 65536)
    else:
        if bank_chunk is None:
            bank_chunk = CUDA_BANK_CHUNK if bank.is_cuda else CPU_BANK_CHUNK
            if not bank.is_cuda:  # few queries (the re-weighting's one per image): wider slices, same block size
                bank_chunk = max(bank_chunk, CPU_BLOCK_ENTRIES // max(1, queries.shape[0]))
        bank_chunk = max(1, min(bank_chunk, bank.shape[0]))
        if not bank.is_cuda:
            query_chunk = min(query_chunk, max(256, CPU_BLOCK_ENTRIES // bank_chunk))
        threads = torch.get_num_threads()
        if not bank.is_cuda and PARALLEL_QUERY_SLICES and threads > 1 and queries.shape[0] >= 2 * MIN_SLICE:
            dist, idx = _blocked_in_slices(queries, bank, bank_sq, k, query_chunk, bank_chunk, threads)
        else:
            dist, idx = _blocked(queries, bank, bank_sq, k, query_chunk, bank_chunk)
    if index_offset:
        idx = idx + index_offset
    return (dist if squared else dist.sqrt()), idx


def _blocked_in_slices(queries, bank, bank_sq, k, query_chunk, bank_chunk, threads):
    """CPU, several threads: one slice of the queries per thread, each searched single-threaded, joined
    once. Every block's GEMM and reduction parallel over 2 threads would wait at a barrier per block (~3
    per 2,048 bank rows): on a machine whose other jobs take a core away for a time slice, each barrier
    costs that slice (measured: 2 threads at less than half the speed of 1). Independent slices lose
    nothing then, and match the threaded GEMM when the cores are free."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(threads, queries.shape[0] // MIN_SLICE)
    per = -(-queries.shape[0] // workers)
    slices = [queries[s : s + per] for s in range(0, queries.shape[0], per)]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide: torch and MKL run one thread in each of this pool's threads
    try:
        with ThreadPoolExecutor(len(slices)) as pool:
            parts = list(pool.map(lambda q: _blocked(q, bank, bank_sq, k, query_chunk, bank_chunk), slices))
    finally:
        torch.set_num_threads(previous)
    return torch.cat([d for d, _ in parts]), torch.cat([i for _, i in parts])


def _blocked(queries, bank, bank_sq, k, query_chunk, bank_chunk):
    n_query, n_bank = queries.shape[0], bank.shape[0]
    out_dist = torch.empty(n_query, k, dtype=bank.dtype, device=bank.device)
    out_idx = torch.empty(n_query, k, dtype=torch.long, device=bank.device)
    block = torch.empty(min(query_chunk, max(1, n_query)), bank_chunk, dtype=bank.dtype, device=bank.device)
    host = not bank.is_cuda
    for q_start in range(0, n_query, query_chunk):
        q = queries[q_start : q_start + query_chunk]
        rows = q.shape[0]
        best = torch.full((rows, k), float("inf"), dtype=bank.dtype, device=bank.device)
        best_idx = torch.zeros(rows, k, dtype=torch.long, device=bank.device)
        for b_start in range(0, n_bank, bank_chunk):
            b_end = min(b_start + bank_chunk, n_bank)
            d = block[:rows, : b_end - b_start]
            if b_end - b_start != bank_chunk:  # the last, shorter slice: a contiguous buffer of its own
                d = torch.empty(rows, b_end - b_start, dtype=bank.dtype, device=bank.device)
            torch.addmm(bank_sq[b_start:b_end], q, bank[b_start:b_end].T, alpha=-2, out=d)
            if k == 1:
                _merge_min(d, best[:, 0], best_idx[:, 0], b_start, host)
            else:
                _merge_topk(d, best, best_idx, b_start, k)
        # + |q|^2 after the search: a per-row constant, monotone, so the order stands.
        best.add_(q.pow(2).sum(1, keepdim=True)).clamp_min_(0)
        out_dist[q_start : q_start + rows] = best
        out_idx[q_start : q_start + rows] = best_idx
    return out_dist, out_idx


def _merge_min(d, best, best_idx, offset, host):
    """k = 1: fold one distance block into the running minimum (in place); ties keep the earlier index."""
    if not host:  # GPU: no host synchronisation; a min with indices is one fast reduction there
        value, index = d.min(1)
        better = value < best
        best.copy_(torch.where(better, value, best))
        best_idx.copy_(torch.where(better, index + offset, best_idx))
        return
    value = d.amin(1)
    better = value < best
    count = int(better.sum())
    if count == 0:
        return
    if count == d.shape[0]:
        best.copy_(value)
        best_idx.copy_(d.argmin(1).add_(offset))
        return
    rows = better.nonzero().squeeze(1)
    best[rows] = value[rows]
    best_idx[rows] = d.index_select(0, rows).argmin(1).add_(offset)


def _merge_topk(d, best, best_idx, offset, k):
    """k > 1: merge [running k | block] by top-k for the rows the block can improve (in place)."""
    kth = best[:, -1]
    better = d.amin(1) < kth
    if d.is_cuda:
        rows = None
    else:
        count = int(better.sum())
        if count == 0:
            return
        rows = None if count == d.shape[0] else better.nonzero().squeeze(1)
    sub = d if rows is None else d.index_select(0, rows)
    kk = min(k, sub.shape[1])
    value, index = sub.topk(kk, dim=1, largest=False, sorted=True)
    old_d = best if rows is None else best[rows]
    old_i = best_idx if rows is None else best_idx[rows]
    value, pick = torch.cat([old_d, value], 1).topk(k, dim=1, largest=False, sorted=True)
    index = torch.cat([old_i, index + offset], 1).gather(1, pick)
    if rows is None:
        if d.is_cuda:  # rows that could not improve keep theirs (the merge gives the same, up to ties)
            value = torch.where(better.unsqueeze(1), value, best)
            index = torch.where(better.unsqueeze(1), index, best_idx)
        best.copy_(value)
        best_idx.copy_(index)
    else:
        best[rows] = value
        best_idx[rows] = index


def _plain(queries, bank, bank_sq, k, query_chunk, bank_chunk):
    """One GEMM per query_chunk x bank_chunk block and a top-k merge: the form a traced graph keeps."""
    out_dist, out_idx = [], []
    for q_start in range(0, queries.shape[0], query_chunk):
        q = queries[q_start : q_start + query_chunk]
        best_dist = best_idx = None
        for b_start in range(0, bank.shape[0], bank_chunk):
            b_end = b_start + bank_chunk
            dist = squared_distances(q, bank[b_start:b_end], bank_sq[b_start:b_end])
            if k == 1:  # a min pass, cheaper than top-k's selection
                d, i = dist.min(dim=1, keepdim=True)
            else:
                d, i = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
            i = i + b_start
            if best_dist is not None:  # merge this bank chunk's candidates with the running best
                d, pick = torch.cat([best_dist, d], 1).topk(k, dim=1, largest=False)
                i = torch.cat([best_idx, i], 1).gather(1, pick)
            best_dist, best_idx = d, i
        out_dist.append(best_dist)
        out_idx.append(best_idx)
    return torch.cat(out_dist), torch.cat(out_idx)
