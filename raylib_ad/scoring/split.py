"""score_split on Ray Data: a labelled split (a manifest table) scored by a pool of model replicas across
the cluster, the result put back in the table's row order: the same ScoredSplit as the in-process
raylib_ad.evaluation.score_split, which run_training, sweep trials and held-out tests use when Ray is up."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pyarrow as pa

from raylib_ad.scoring.replica import decode_maps


def score_split_on_ray(model, table: pa.Table, *, batch_size: int = 32, progress: bool = True, pool=None,
                       map_dtype: str = "float16"):
    """Maps travel as float16 scaled per map by default (half the bytes; the pixel metrics move by less
    than 1e-3, tests/test_batch_scoring.py); map_dtype="float32" sends them as they are."""
    import ray

    from raylib_ad.evaluation import ScoredSplit
    from raylib_ad.scoring.payload import model_payload
    from raylib_ad.scoring.pipeline import ReplicaPool, data_context, split_dataset

    cfg = model.config()
    n, size = table.num_rows, cfg["image_size"]
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    scores = np.empty(n, dtype=np.float32)
    maps = np.empty((n, size, size), dtype=np.float32) if model.produces_maps else None
    masks = np.zeros((n, size, size), dtype=np.uint8)
    seen = np.zeros(n, dtype=bool)
    start = time.perf_counter()
    if n:
        with data_context(progress):
            ds = split_dataset(table, ray.put(model_payload(model)), image_size=size, mean=cfg["mean"],
                               std=cfg["std"], batch_size=batch_size, pool=pool or ReplicaPool(),
                               map_dtype=map_dtype)
            from raylib_ad.progress import ProgressCounter

            # Ray Data's own bars may be off. The bar starts with the first scored batch: while the replicas
            # start there is no ETA to show, and what Ray prints as they start lands before the bar, not in it.
            bar = None
            with contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="numpy"))) as stream:
                for batch in stream:
                    idx = np.asarray(batch["index"], dtype=np.int64)
                    if bar is None:
                        bar = ProgressCounter("scoring", n, enabled=progress, unit="img")
                    bar.update(len(idx))
                    scores[idx] = batch["score"]
                    masks[idx] = batch["mask"]
                    if maps is not None:
                        maps[idx] = decode_maps(batch["map"], batch["map_scale"])
                    seen[idx] = True
            if bar is not None:
                bar.close()
    if not seen.all():
        raise RuntimeError(f"Ray scoring returned {int(seen.sum())} of {n} rows")
    seconds = time.perf_counter() - start
    has_masks = maps is not None and masks.any()  # as score_split: pixel metrics need maps and defects
    return ScoredSplit(labels=labels, scores=scores, masks=masks if has_masks else None, maps=maps,
                       seconds=seconds)
