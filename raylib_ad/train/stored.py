"""The scores a run already computed, kept so that `threshold` and `evaluate` need not score again.

`train` scores the whole test split once (validation subset + held-out rest) and writes OUT/scores.npz
beside OUT/model: per image its path, label, defect, role and raw score, and for models with maps a
64 x 64 float16 copy of each map (enough to redraw heatmaps.png; 8 KiB an image, 4.6 MB for 582 images,
where the maps at 256 px in float32 would be 150 MB), with the threshold-free pixel metrics of the run
(they do not change with the image threshold). A fingerprint of the model's weights file ties the scores
to the weights that made them: a model trained again, or another model, never reuses them.

`threshold` on a run's model directory then fits on the stored validation scores (seconds instead of
scoring every test image again); `evaluate` reuses every stored image score and scores only the images
that are new (on Ray Data where train does, train/evaluate.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCORES_FILE = "scores.npz"
STORED_MAP_SIZE = 64


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 of the model's weights file (stats.json, which `threshold` rewrites, is not part of it)."""
    from raylib_ad.artifact import WEIGHTS_FILE

    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class StoredScores:
    paths: list[str]
    labels: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float32 raw
    defects: list[str]
    roles: list[str]  # validation | heldout
    small_maps: np.ndarray | None  # (N, 64, 64) float16 raw maps, or None
    meta: dict[str, Any]  # fingerprint, image_size, pixel_metrics, pixel_stats

    def index(self) -> dict[str, int]:
        return {path: i for i, path in enumerate(self.paths)}


def write_scores(run_dir: str | Path, model_dir: str | Path, test_rows, scored, val_idx, report) -> Path:
    """OUT/scores.npz from the test split's ScoredSplit and its evaluation report (pixel metrics, stats)."""
    import torch
    import torch.nn.functional as F

    n = test_rows.num_rows
    roles = np.full(n, "heldout", dtype=object)
    roles[np.asarray(val_idx, dtype=np.int64)] = "validation"
    meta = {"fingerprint": weights_fingerprint(model_dir), "n": n,
            "pixel_metrics": {k: v for k, v in report["metrics"].items() if "pixel" in k},
            "pixel_stats": report.get("pixel_stats"), "val_idx": [int(i) for i in val_idx]}
    arrays: dict[str, Any] = {
        "paths": np.asarray(test_rows.column("path").to_pylist(), dtype=str),
        "labels": np.asarray(scored.labels, dtype=np.int64), "scores": np.asarray(scored.scores, dtype=np.float32),
        "defects": np.asarray([d or "" for d in test_rows.column("defect").to_pylist()], dtype=str),
        "roles": roles.astype(str), "meta": np.asarray(json.dumps(meta, default=float))}
    if scored.maps is not None and len(scored.maps):
        small = []
        for start in range(0, len(scored.maps), 64):  # a chunk at a time: no second full-size copy
            chunk = torch.from_numpy(np.ascontiguousarray(scored.maps[start : start + 64], dtype=np.float32))
            small.append(F.interpolate(chunk[:, None], size=STORED_MAP_SIZE, mode="area")[:, 0].numpy())
        arrays["small_maps"] = np.concatenate(small).astype(np.float16)
    path = Path(run_dir) / SCORES_FILE
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def read_scores(model_dir: str | Path) -> StoredScores | None:
    """The scores stored beside a run's model directory (MODEL_DIR/../scores.npz), when they were made by
    these very weights; else None."""
    path = Path(model_dir).parent / SCORES_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("fingerprint") != weights_fingerprint(model_dir):
                return None
            return StoredScores(paths=data["paths"].tolist(), labels=data["labels"].astype(np.int64),
                                scores=data["scores"].astype(np.float32), defects=data["defects"].tolist(),
                                roles=data["roles"].tolist(),
                                small_maps=data["small_maps"] if "small_maps" in data.files else None, meta=meta)
    except (OSError, ValueError, KeyError):
        return None  # a damaged or foreign file: score again


def covers(stored: StoredScores | None, test_rows, val_idx) -> bool:
    """Whether the stored scores are those of exactly this split, in this order, with this validation subset
    (then the stored pixel metrics hold too)."""
    if stored is None or len(stored.paths) != test_rows.num_rows:
        return False
    return (stored.paths == test_rows.column("path").to_pylist()
            and sorted(stored.meta.get("val_idx", [])) == sorted(int(i) for i in val_idx))
