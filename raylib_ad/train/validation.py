"""Per-epoch validation gathered across workers, and the digest that proves workers agree. No Ray here."""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from raylib_ad import distributed
from raylib_ad.metrics import auroc

VALIDATION_MAP_SIZE = 64  # validation pixel AUROC at 64 px keeps the per-epoch gather small


def validate(model, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Image and pixel AUROC on the validation images, gathered from every worker's share."""
    model.eval()
    # One row per image: label, score, then (for models with maps) the 64x64 mask and map, flattened.
    width = 2 + (2 * VALIDATION_MAP_SIZE**2 if model.produces_maps else 0)
    rows = [torch.zeros(0, width, dtype=torch.float64)]
    with torch.no_grad():
        for batch in batches:
            out = model(batch["image"])
            columns = [batch["label"][:, None], out.score[:, None]]
            if model.produces_maps:
                columns.append(F.interpolate(batch["mask"][:, None].float(), size=VALIDATION_MAP_SIZE,
                                             mode="nearest").flatten(1))
                columns.append(F.interpolate(out.anomaly_map[:, None].float(), size=VALIDATION_MAP_SIZE,
                                             mode="area").flatten(1))
            rows.append(torch.cat([c.double().cpu() for c in columns], dim=1))
    every = distributed.all_gather_rows(torch.cat(rows)).numpy()
    result = {"val_image_auroc": _safe_auroc(every[:, 0], every[:, 1]), "val_images": int(len(every)),
              "val_anomalous": int((every[:, 0] > 0).sum())}
    if model.produces_maps:
        half = VALIDATION_MAP_SIZE**2
        result["val_pixel_auroc"] = _safe_auroc(every[:, 2 : 2 + half].ravel(), every[:, 2 + half :].ravel())
    return result


def _safe_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return auroc(labels.astype(np.int64), scores)


def fitted_state_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor the fit produced (backbone weights excluded): equal digests on all
    workers prove every worker holds the same model."""
    digest = hashlib.sha256()
    skip = tuple(getattr(model, "pretrained_prefixes", ("feature_extractor.",)))
    for key, value in sorted(model.state_dict().items()):
        if not key.startswith(skip):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
