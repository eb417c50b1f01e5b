"""PatchCore's nearest-neighbour search measured against the GEMM speed of the same process (issue #26).

    python jobs/knn_benchmark.py                       # the ratio-0.1 Magnetic Tile bank: 78,028 x 152
    python jobs/knn_benchmark.py --threads 1,2 --images 2 --repeats 5

No data needed: a random bank and random queries of the real sizes (the arithmetic does not depend on the
values; the k = 1 merge's index pass does, a little: see nearest_neighbors.py). For each thread count,
interleaved repeats of:
  gemm       plain torch.mm on the search's own shapes, in cache-sized blocks (Q x N x D over
             query_chunk x bank_chunk blocks, into one reused output), on all the threads; and
  gemm_slices the same with one slice of the queries per thread, single-threaded GEMMs (how the search
             runs on several threads). The faster of the two is the reference, "(a)"
  before     the search as it was before issue #26 (copied below: 65,536-row bank chunks, min with indices)
  after      raylib_ad.models.components.nearest_neighbors (blocked, running merge) through BankShard, as
             PatchCore calls it now (the bank's row norms computed once, not on every call)
  reweight   anomalib's re-weighting step: the k (= 9) nearest bank rows of each image's worst patch's
             neighbour, for a batch of --batch images (before / after)
GFLOP/s = 2 Q N D / seconds; the searches' fraction of the GEMM figure; the median of --repeats (and the
best). The neighbours of `after` are checked against `before`.
Prints one JSON line per thread count and a markdown table at the end.

    # exactness on real data: PatchCore fitted on Magnetic Tile, the test split's patches embedded once and
    # scored with the search before and after; scores, maps, image / pixel AUROC compared
    python jobs/knn_benchmark.py --auroc-check --root ../shared/datasets/magnetic_tile \
        --split-file ../shared/datasets/magnetic_tile_split.csv --ratio 0.01
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def before_nearest_neighbors(queries, bank, k=1, *, query_chunk=8192, bank_chunk=65536):
    """nearest_neighbors as of commit 22107fb (before issue #26), verbatim but for the name."""
    import torch

    from raylib_ad.models.components.nearest_neighbors import squared_distances

    k = min(k, bank.shape[0])
    queries = queries.to(bank.dtype)
    bank_sq = bank.pow(2).sum(1)
    query_chunk = min(query_chunk, max(1024, 2**21 // max(1, min(bank.shape[0], bank_chunk))))
    out_dist, out_idx = [], []
    for q_start in range(0, queries.shape[0], query_chunk):
        q = queries[q_start : q_start + query_chunk]
        best_dist = best_idx = None
        for b_start in range(0, bank.shape[0], bank_chunk):
            b_end = b_start + bank_chunk
            dist = squared_distances(q, bank[b_start:b_end], bank_sq[b_start:b_end])
            if k == 1:
                d, i = dist.min(dim=1, keepdim=True)
            else:
                d, i = dist.topk(min(k, dist.shape[1]), dim=1, largest=False)
            i = i + b_start
            if best_dist is not None:
                d, pick = torch.cat([best_dist, d], 1).topk(k, dim=1, largest=False)
                i = torch.cat([best_idx, i], 1).gather(1, pick)
            best_dist, best_idx = d, i
        out_dist.append(best_dist.sqrt())
        out_idx.append(best_idx)
    return torch.cat(out_dist), torch.cat(out_idx)


def gemm_blocks(queries, bank, query_chunk: int, bank_chunk: int):
    """The reference: the search's GEMMs alone, in the same blocks, into one reused output."""
    import torch

    out = torch.empty(query_chunk, bank_chunk)
    for q_start in range(0, queries.shape[0], query_chunk):
        q = queries[q_start : q_start + query_chunk]
        for b_start in range(0, bank.shape[0], bank_chunk):
            b = bank[b_start : b_start + bank_chunk]
            torch.mm(q, b.T, out=out[: q.shape[0], : b.shape[0]] if b.shape[0] == bank_chunk and
                     q.shape[0] == query_chunk else torch.empty(q.shape[0], b.shape[0]))


def gemm_slices(queries, bank, query_chunk: int, bank_chunk: int, threads: int):
    """The same GEMMs with the queries cut into one slice per thread, each slice's GEMMs single-threaded
    (how the search runs on several CPU threads: nearest_neighbors._blocked_in_slices)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    if threads == 1:
        return gemm_blocks(queries, bank, query_chunk, bank_chunk)
    per = -(-queries.shape[0] // threads)
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda s: gemm_blocks(queries[s : s + per], bank, query_chunk, bank_chunk),
                          range(0, queries.shape[0], per)))
    finally:
        torch.set_num_threads(threads)


def reweight(search, bank, worst, k):
    """PatchCore.reweighted_score's second search and its distances (model.py), for a batch of images."""
    import torch

    nn_sample = bank[torch.arange(worst.shape[0]) * 97 % bank.shape[0]]
    _, support = search(nn_sample, bank, k=k)
    support_dist = torch.linalg.norm(worst.unsqueeze(1) - bank[support], dim=-1)
    return 1 - torch.softmax(support_dist, dim=1)[:, 0]


def measure(threads: int, args) -> dict:
    import torch

    from raylib_ad.models.components import nearest_neighbors as knn
    from raylib_ad.models.components.sharded_bank import BankShard

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(args.bank_rows, args.dim, generator=gen)
    queries = torch.randn(args.images * args.patches, args.dim, generator=gen)
    worst = torch.randn(args.batch, args.dim, generator=gen)
    flop = 2.0 * queries.shape[0] * bank.shape[0] * bank.shape[1]
    query_chunk = min(8192, max(256, knn.CPU_BLOCK_ENTRIES // knn.CPU_BANK_CHUNK))
    # what PatchCore searches now (model.bank_index()): the bank with its row norms computed once
    shard = BankShard(bank)
    cases = {
        "gemm": lambda: gemm_blocks(queries, bank, query_chunk, knn.CPU_BANK_CHUNK),
        "gemm_slices": lambda: gemm_slices(queries, bank, query_chunk, knn.CPU_BANK_CHUNK, threads),
        "before": lambda: before_nearest_neighbors(queries, bank, 1),
        "after": lambda: shard.search(queries, 1),
        "reweight_before": lambda: reweight(before_nearest_neighbors, bank, worst, args.k),
        "reweight_after": lambda: reweight(lambda q, b, k: shard.search(q, k), bank, worst, args.k),
    }
    if args.skip_before:
        cases = {k: v for k, v in cases.items() if "before" not in k}
    times = {name: [] for name in cases}
    cpu = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.repeats):  # interleaved: a burst of load on the machine hits every case alike
        for name, fn in cases.items():
            cpu_start, start = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    row = {"threads": threads, "bank_rows": args.bank_rows, "dim": args.dim, "queries": queries.shape[0],
           "query_chunk": query_chunk, "bank_chunk": knn.CPU_BANK_CHUNK, "repeats": args.repeats}
    for name, ts in times.items():
        median, best = statistics.median(ts), min(ts)
        if name.startswith("reweight"):
            row[f"{name}_ms_per_batch"] = round(1000 * median, 2)
            row[f"{name}_ms_per_image"] = round(1000 * median / args.batch, 3)
        else:
            row[f"{name}_gflops"] = round(flop / median / 1e9, 1)
            row[f"{name}_gflops_best"] = round(flop / best / 1e9, 1)
            row[f"{name}_ms_per_image"] = round(1000 * median / args.images, 1)
            # per CPU-second of the process (all its threads): at 1 thread a figure that other jobs on a
            # busy machine barely move (they take the core away, not the cycles the search uses)
            row[f"{name}_gflops_per_cpu_second"] = round(flop / statistics.median(cpu[name]) / 1e9, 1)
    # the reference: the faster of the threaded GEMM and the per-thread slices (equal at 1 thread)
    row["reference_gflops"] = max(row["gemm_gflops"], row["gemm_slices_gflops"])
    row["reference_gflops_per_cpu_second"] = max(row["gemm_gflops_per_cpu_second"],
                                                 row["gemm_slices_gflops_per_cpu_second"])
    for name in ("before", "after"):
        if f"{name}_gflops" in row:
            row[f"{name}_fraction_of_gemm"] = round(row[f"{name}_gflops"] / row["reference_gflops"], 3)
            row[f"{name}_fraction_of_gemm_cpu"] = round(row[f"{name}_gflops_per_cpu_second"]
                                                        / row["reference_gflops_per_cpu_second"], 3)
    if not args.skip_before:
        d_old, i_old = before_nearest_neighbors(queries, bank, 1)
        d_new, i_new = shard.search(queries, 1)
        row["same_neighbours"] = float((i_old == i_new).float().mean())
        row["max_abs_distance_difference"] = float((d_old - d_new).abs().max())
        row["reweight_max_abs_difference"] = float((reweight(before_nearest_neighbors, bank, worst, args.k)
                                                    - reweight(lambda q, b, k: shard.search(q, k), bank, worst,
                                                               args.k)).abs().max())
    return row


class BeforeBank:
    """The search PatchCore did before issue #26 (forward and re-weighting), behind score_patches' interface."""

    def __init__(self, bank, query_chunk=8192):
        self.bank, self.query_chunk = bank, query_chunk

    def __len__(self):
        return self.bank.shape[0]

    def search(self, queries, k, squared=False):
        d, i = before_nearest_neighbors(queries, self.bank, k, query_chunk=self.query_chunk)
        return (d.pow(2) if squared else d), i

    def rows(self, idx):
        return self.bank[idx]


def auroc_check(args) -> dict:
    import numpy as np
    import pyarrow.compute as pc
    import torch

    from raylib_ad.data import build_manifest
    from raylib_ad.data.transforms import decode_all
    from raylib_ad.models import create_model
    from raylib_ad.postprocess import evaluation_report

    torch.set_num_threads(os.cpu_count() if args.threads in ("all", "1,all") else int(args.threads.split(",")[-1]))
    table = build_manifest("magnetic_tile", args.root, None, split_file=args.split_file)
    train = table.filter(pc.equal(table.column("split"), "train"))
    test = table.filter(pc.equal(table.column("split"), "test"))
    model = create_model("patchcore", backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"],
                         image_size=256, coreset_sampling_ratio=args.ratio, num_neighbors=9)
    mean, std = model.normalization
    start = time.perf_counter()
    with torch.no_grad():
        model.fit(torch.from_numpy(b["image"]) for b in decode_all(train, 256, mean, std, batch_size=32,
                                                                   with_masks=False))
    fit_seconds = time.perf_counter() - start
    model.eval()
    outs = {"before": [], "after": []}
    labels, masks, seconds = [], [], {"before": 0.0, "after": 0.0}
    with torch.no_grad():
        for b in decode_all(test, 256, mean, std, batch_size=32, with_masks=True):
            patches, grid = model.embed(torch.from_numpy(b["image"]))
            for name, bank in (("before", BeforeBank(model.memory_bank)), ("after", model.bank_index())):
                t = time.perf_counter()
                outs[name].append(model.score_patches(patches, grid, bank))
                seconds[name] += time.perf_counter() - t
            labels.append(b["label"])
            masks.append(b["mask"])
    labels, masks = np.concatenate(labels), np.concatenate(masks)
    row = {"bank_rows": int(model.memory_bank.shape[0]), "ratio": args.ratio, "fit_seconds": round(fit_seconds, 1),
           "test_images": int(len(labels)), "threads": torch.get_num_threads()}
    scores = {}
    for name, out in outs.items():
        score = torch.cat([o.score for o in out]).numpy()
        maps = torch.cat([o.anomaly_map for o in out]).numpy()
        scores[name] = (score, maps)
        m = evaluation_report(labels, score, masks, maps)["metrics"]
        row[f"{name}_image_auroc"] = round(float(m["whole_split_image_auroc"]), 6)
        row[f"{name}_pixel_auroc"] = round(float(m["whole_split_pixel_auroc"]), 6)
        row[f"{name}_search_ms_per_image"] = round(1000 * seconds[name] / len(labels), 1)
    row["max_abs_score_difference"] = float(np.abs(scores["before"][0] - scores["after"][0]).max())
    row["max_rel_score_difference"] = float((np.abs(scores["before"][0] - scores["after"][0])
                                             / np.abs(scores["before"][0])).max())
    row["max_abs_map_difference"] = float(np.abs(scores["before"][1] - scores["after"][1]).max())
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| threads | GEMM GFLOP/s (a): threaded / per-thread slices | before GFLOP/s (fraction) "
             "| after GFLOP/s (fraction) | ms/image before -> after | re-weighting ms/batch before -> after "
             "| per CPU-second: GEMM / before / after | same neighbours |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['threads']} | {r['gemm_gflops']} / {r['gemm_slices_gflops']} "
            f"| {r.get('before_gflops', '–')} ({r.get('before_fraction_of_gemm', '–')}) "
            f"| {r['after_gflops']} ({r['after_fraction_of_gemm']}) "
            f"| {r.get('before_ms_per_image', '–')} -> {r['after_ms_per_image']} "
            f"| {r.get('reweight_before_ms_per_batch', '–')} -> {r['reweight_after_ms_per_batch']} "
            f"| {r['gemm_gflops_per_cpu_second']} / {r.get('before_gflops_per_cpu_second', '–')} / "
            f"{r['after_gflops_per_cpu_second']} | {r.get('same_neighbours', '–')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank-rows", type=int, default=78028, help="ratio 0.1 of Magnetic Tile's 780,288 patches")
    parser.add_argument("--dim", type=int, default=152, help="tf_efficientnet_lite0 blocks.2 + blocks.4")
    parser.add_argument("--patches", type=int, default=1024, help="patches per image (256 px: a 32 x 32 grid)")
    parser.add_argument("--images", type=int, default=2, help="images' worth of queries per timed search")
    parser.add_argument("--batch", type=int, default=32, help="images per re-weighting search")
    parser.add_argument("--k", type=int, default=9, help="PatchCore's num_neighbors")
    parser.add_argument("--threads", default="1,all", help="comma-separated thread counts; 'all' = every CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-before", action="store_true", help="only the GEMM reference and the current search")
    parser.add_argument("--out", help="also write the rows to this JSON file")
    parser.add_argument("--auroc-check", action="store_true", help="real data: before/after scores and AUROC")
    parser.add_argument("--root", help="--auroc-check: Magnetic Tile")
    parser.add_argument("--split-file")
    parser.add_argument("--ratio", type=float, default=0.01, help="--auroc-check: coreset ratio")
    args = parser.parse_args(argv)
    if args.auroc_check:
        return [auroc_check(args)]
    rows = []
    for t in args.threads.split(","):
        row = measure(os.cpu_count() if t == "all" else int(t), args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
