"""Scoring a split with a fitted model: in process (plain torch), or, inside `split_scoring_on_ray()`, on
Ray Data across the cluster (raylib_ad/scoring/split.py); both return the same ScoredSplit."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from raylib_ad.data.transforms import decode_all
from raylib_ad.models import AnomalyModel
from raylib_ad.progress import ProgressCounter


@dataclass
class ScoredSplit:
    labels: np.ndarray  # (N,) int
    scores: np.ndarray  # (N,) float32 raw
    masks: np.ndarray | None  # (N, S, S) uint8
    maps: np.ndarray | None  # (N, S, S) float32 raw
    seconds: float  # wall time of decoding + forward passes

    @property
    def images_per_second(self) -> float:
        return len(self.labels) / self.seconds if self.seconds > 0 else float("nan")


def _prefetched(iterator, depth: int = 2):
    """Decode the next batches in a thread while the model runs on this one (PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(next, iterator, None) for _ in range(depth)]
        while True:
            batch = pending.pop(0).result()
            if batch is None:
                return
            pending.append(pool.submit(next, iterator, None))
            yield batch


# Set by split_scoring_on_ray: the options of raylib_ad.scoring.split.score_split_on_ray, or None (in process).
_ON_RAY: ContextVar[dict[str, Any] | None] = ContextVar("raylib_ad_split_scoring_on_ray", default=None)


@contextlib.contextmanager
def split_scoring_on_ray(pool=None, **options) -> Iterator[None]:
    """Within the block, score_split scores on Ray Data with a pool of model replicas (a
    raylib_ad.scoring.pipeline.ReplicaPool; default one actor) instead of in this process. The caller
    has initialised Ray. Used by train/run.py, whose callers (train/outputs.py) call score_split."""
    token = _ON_RAY.set({"pool": pool, **options})
    try:
        yield
    finally:
        _ON_RAY.reset(token)


def score_split(
    model: AnomalyModel,
    table: pa.Table,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> ScoredSplit:
    on_ray = _ON_RAY.get()
    if on_ray is not None:
        from raylib_ad.scoring.split import score_split_on_ray

        return score_split_on_ray(model, table, batch_size=batch_size, progress=progress, **on_ray)
    return _score_split_in_process(model, table, batch_size=batch_size, progress=progress)


@torch.no_grad()
def _score_split_in_process(model: AnomalyModel, table: pa.Table, *, batch_size: int, progress: bool) -> ScoredSplit:
    model.eval()
    cfg = model.config()
    device = model.device
    n, size = table.num_rows, cfg["image_size"]
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    scores = np.empty(n, dtype=np.float32)
    maps = np.empty((n, size, size), dtype=np.float32) if model.produces_maps else None
    masks = np.empty((n, size, size), dtype=np.uint8)
    start = time.perf_counter()
    batches = _prefetched(decode_all(table, size, cfg["mean"], cfg["std"], batch_size=batch_size))
    bar = ProgressCounter("scoring", n, enabled=progress, unit="img")  # images, as on Ray Data (scoring/split.py)
    try:
        for batch in batches:
            idx = batch["index"]
            out = model(torch.from_numpy(batch["image"]).to(device))
            scores[idx] = out.score.float().cpu().numpy()
            if maps is not None:
                maps[idx] = out.anomaly_map.float().cpu().numpy()
            masks[idx] = batch["mask"]
            bar.update(len(idx))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    # Masks only matter next to maps; a split without any defect pixels has no pixel metrics either.
    has_masks = maps is not None and masks.any()
    return ScoredSplit(labels=labels, scores=scores, masks=masks if has_masks else None, maps=maps,
                       seconds=seconds)
