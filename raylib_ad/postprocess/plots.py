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
from scipy import ndimage

from raylib_ad.errors import DataError
from raylib_ad.metrics.at_threshold import confusion_at
from raylib_ad.metrics.aupro import pro_curve
from raylib_ad.metrics.classification import check_binary, roc_curve

__all__ = ["plot_roc", "plot_pro", "plot_threshold_report", "heatmap_overlay", "save_overlay_grid", "anomaly_map_png"]

_CONTOUR_RGB = np.array([0, 255, 0], dtype=np.uint8)  # green stands out on jet and on photos


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_roc(labels, scores, path, title: str = "ROC", threshold: float | None = None) -> Path:
    """Write the ROC curve (AUROC in the legend) to ``path`` as PNG; returns the path.

    With ``threshold`` (the deployment threshold on raw scores), its operating point on
    these same images is marked and labelled with its TPR and FPR, as counts too.
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {area:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    if threshold is not None:
        point = confusion_at(labels, scores, threshold)
        x, y = point["fpr"], point["tpr"]
        ax.plot([x, x], [0, y], [0, x], [y, y], ls=":", color="crimson", lw=1)
        ax.plot([x], [y], "o", ms=10, mfc="crimson", mec="black", zorder=5,
                label=f"threshold {threshold:.4g}")
        text = (f"operating point\nTPR {y:.3f} ({point['tp']}/{point['tp'] + point['fn']} anomalous flagged)\n"
                f"FPR {x:.3f} ({point['fp']}/{point['fp'] + point['tn']} normal flagged)")
        # Keep the box inside the axes: to the right of the point unless it sits far right.
        ax.annotate(text, (x, y), xytext=(12, -14) if x < 0.45 else (-12, -14), textcoords="offset points",
                    ha="left" if x < 0.45 else "right", va="top", fontsize=8,
                    bbox={"boxstyle": "round", "fc": "white", "ec": "crimson"})
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


def plot_threshold_report(report: dict, path, title: str = "images at the deployment threshold") -> Path:
    """Confusion matrix and recall per defect type from ``metrics.threshold_report``, as PNG.

    Left: the 2x2 counts (rows = true class, columns = predicted). Right (with per-defect
    data): one bar per defect type = share of its images flagged, "detected/n" written on
    it, and a last bar for the share of good images wrongly flagged (false positives).
    """
    confusion, per_defect = report["confusion"], report.get("per_defect")
    fig = Figure(figsize=(10 if per_defect else 4.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=[1, 1.5]) if per_defect else [fig.add_subplot()]
    ax = axes[0]
    counts = np.asarray(confusion["matrix"])
    ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(1, counts.max()))
    names = [["true negative", "false positive"], ["false negative\n(missed)", "true positive"]]
    for (row, col), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        ax.text(col, row, f"{count}\n{names[row][col]}", ha="center", va="center", fontsize=9,
                color="white" if dark else "black")
    ax.set_xticks([0, 1], ["normal", "anomalous"])
    ax.set_yticks([0, 1], ["normal", "anomalous"])
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"confusion matrix (n = {report['n_images']})", fontsize=10)
    if per_defect:
        ax = axes[1]
        defects = per_defect["defects"]
        good = per_defect["good"]
        bars = [(name, v["recall"], f"{v['detected']}/{v['n']}", "tab:blue") for name, v in defects.items()]
        bars.append(("good (false\npositives)", good["false_positive_rate"],
                     f"{good['false_positives']}/{good['n']}", "tab:red"))
        positions = np.arange(len(bars))
        heights = [0.0 if value is None else value for _, value, _, _ in bars]
        ax.bar(positions, heights, color=[colour for *_, colour in bars])
        for x, height, (_, value, counts_text, _) in zip(positions, heights, bars):
            ax.text(x, height + 0.02, counts_text if value is not None else "n/a", ha="center", fontsize=8)
        ax.set_xticks(positions, [name for name, *_ in bars], rotation=30, ha="right", fontsize=8)
        ax.set(ylim=(0, 1.12), ylabel="share of images flagged anomalous")
        ax.set_title("recall per defect type, false positives on good images", fontsize=10)
    fig.suptitle(f"{title} ({report['threshold']:.4g}, raw score)", fontsize=11)
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


def image_size(path) -> tuple[int, int] | None:
    """(width, height) from an image file's header (nothing decoded); None if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # the scoring already reported an unreadable file
        return None


_THRESHOLD_RGB = np.array([255, 255, 255], dtype=np.uint8)  # white: not a jet colour


def anomaly_map_png(amap, vmin=None, vmax=None, *, size: tuple[int, int] | None = None,
                    threshold: float | None = None) -> bytes:
    """PNG bytes of one jet-colorized anomaly map (for the predict CLI and serving).

    size: (width, height) to resize the map to (bilinear), the scored image's own size; default the map's.
    threshold: the level (in the map's units: 0.5 on a normalized map is the deployment threshold) whose
    region is outlined in white. The PNG's text chunks say the colour scale and what the outline marks."""
    values = np.asarray(amap, dtype=np.float32)
    if values.ndim != 2:
        raise DataError(f"anomaly map must be (H, W), got shape {values.shape}")
    if size is not None and tuple(size) != values.shape[::-1]:
        from PIL import Image

        values = np.asarray(Image.fromarray(values, mode="F").resize(tuple(int(v) for v in size), Image.BILINEAR))
    rgb = np.ascontiguousarray(_colorize(values, vmin, vmax))
    low = float(values.min()) if vmin is None else float(vmin)
    high = float(values.max()) if vmax is None else float(vmax)
    legend = {"Description": "anomaly map, jet colour scale", "Scale": f"blue = {low:g}, red = {high:g}"}
    if threshold is not None:
        above = values >= threshold
        outline = above & ~ndimage.binary_erosion(above, border_value=0)
        thickness = int(round(min(values.shape) / 300))  # about 1 px per 300 px of image: visible when big
        if thickness:
            outline = ndimage.binary_dilation(outline, iterations=thickness)
        rgb[outline] = _THRESHOLD_RGB
        legend["Threshold"] = f"white outline: map >= {threshold:g} (the deployment threshold)"
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, text in legend.items():
        info.add_text(key, text)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
