"""Figures and colorized maps: ROC/PRO curves, heatmap overlays, a PNG per anomaly map.

Uses matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so nothing
touches the global backend or needs a display, and it is safe in worker threads.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imsave
from scipy import ndimage

from raylib_ad.errors import DataError
from raylib_ad.metrics.aupro import pro_curve
from raylib_ad.metrics.classification import check_binary, roc_curve

__all__ = ["plot_roc", "plot_pro", "heatmap_overlay", "save_overlay_grid", "anomaly_map_png"]

_CONTOUR_RGB = np.array([0, 255, 0], dtype=np.uint8)  # green stands out on jet and on photos


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_roc(labels, scores, path, title: str = "ROC") -> Path:
    """Write the ROC curve (AUROC in the legend) to ``path`` as PNG; returns the path."""
    fpr, tpr, _ = roc_curve(labels, scores)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {area:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_pro(masks, maps, path, fpr_limit: float = 0.3, title: str = "PRO curve") -> Path:
    """Write the per-region-overlap curve up to ``fpr_limit`` (AUPRO in the legend)."""
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    area = float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0) / fpr_limit
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(fpr, pro, lw=2, label=f"AUPRO@{fpr_limit:g} = {area:.4f}")
    ax.set(xlim=(0, fpr_limit), ylim=(0, 1.02), xlabel="False positive rate", ylabel="PRO")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _colorize(amap, vmin, vmax) -> np.ndarray:
    """(H, W) scores -> (H, W, 3) uint8 jet colors; vmin/vmax default to the map's range."""
    values = np.asarray(amap, dtype=np.float32)
    if values.ndim != 2:
        raise DataError(f"anomaly map must be (H, W), got shape {values.shape}")
    low = float(values.min()) if vmin is None else float(vmin)
    high = float(values.max()) if vmax is None else float(vmax)
    scaled = np.clip((values - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    return colormaps["jet"](scaled, bytes=True)[..., :3]


def _as_rgb(image) -> np.ndarray:
    rgb = np.asarray(image)
    if rgb.ndim == 3 and rgb.shape[-1] == 1:
        rgb = rgb[..., 0]
    if rgb.ndim == 2:  # grayscale
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise DataError(f"image must be (H, W, 3) or (H, W), got shape {np.shape(image)}")
    if rgb.dtype != np.uint8:
        raise DataError(f"image must be uint8, got dtype {rgb.dtype}")
    return rgb


def heatmap_overlay(image_uint8, amap, vmin=None, vmax=None, mask=None) -> np.ndarray:
    """Blend a jet-colored anomaly map 50/50 over the image; outline ``mask`` in green.

    image_uint8: (H, W, 3) or (H, W) uint8; amap: (H, W) raw or normalized scores.
    Pass the same vmin/vmax for several images to make their colors comparable.
    Returns a new (H, W, 3) uint8 array.
    """
    rgb = _as_rgb(image_uint8)
    heat = _colorize(amap, vmin, vmax)
    if heat.shape != rgb.shape:
        raise DataError(
            f"anomaly map shape {np.shape(amap)} does not match image shape {rgb.shape}"
        )
    blended = ((rgb.astype(np.uint16) + heat.astype(np.uint16)) // 2).astype(np.uint8)
    if mask is not None:
        region = check_binary(mask, "mask")
        if region.shape != rgb.shape[:2]:
            raise DataError(f"mask shape {region.shape} does not match image shape {rgb.shape[:2]}")
        # Outline = region pixels with at least one neighbour outside the region.
        outline = region & ~ndimage.binary_erosion(region, border_value=0)
        blended[outline] = _CONTOUR_RGB
    return blended


def save_overlay_grid(
    images,
    maps,
    masks,
    scores,
    labels,
    path,
    max_items: int = 16,
    vmin=None,
    vmax=None,
    columns: int = 4,
) -> Path:
    """Grid of overlays (first ``max_items`` samples, in the given order) with
    "score | label" tile titles. ``masks``/``labels`` may be None. One shared color
    scale (vmin/vmax, default: range of the shown maps) keeps tiles comparable.
    """
    count = min(len(images), len(maps), max_items)
    if count == 0:
        raise DataError("save_overlay_grid got no images to draw")
    shown_maps = [np.asarray(maps[i], dtype=np.float32) for i in range(count)]
    low = min(float(m.min()) for m in shown_maps) if vmin is None else vmin
    high = max(float(m.max()) for m in shown_maps) if vmax is None else vmax
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    fig = Figure(figsize=(3 * columns, 3.2 * rows))
    for i in range(count):
        ax = fig.add_subplot(rows, columns, i + 1)
        mask = None if masks is None else masks[i]
        ax.imshow(heatmap_overlay(images[i], shown_maps[i], low, high, mask))
        parts = []
        if scores is not None:
            parts.append(f"score {float(scores[i]):.4g}")
        if labels is not None:
            parts.append("anomalous" if int(labels[i]) else "normal")
        ax.set_title(" | ".join(parts), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def anomaly_map_png(amap, vmin=None, vmax=None) -> bytes:
    """PNG bytes of one jet-colorized anomaly map (for the predict CLI and serving)."""
    buffer = io.BytesIO()
    # imsave writes the pixels 1:1 (no axes, no resampling), unlike a Figure.
    imsave(buffer, _colorize(amap, vmin, vmax), format="png")
    return buffer.getvalue()
