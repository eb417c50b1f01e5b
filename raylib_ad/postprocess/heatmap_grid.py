"""The heatmap grid a quality engineer reads: per image, what it is, what the model says, and where.

Each tile is the ORIGINAL image file at its own resolution and aspect ratio, with the anomaly
map (computed on the model's square input) resized back onto it, coloured on the normalized
scale (0.5 = threshold, one colour bar for all tiles), the defect mask outlined in white (jet
has no white, while its green sits right at the threshold), and
a title with the true label, the label predicted at the deployment threshold and the
normalized image score. Titles are green when the prediction is right, red when wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from raylib_ad.errors import DataError
from raylib_ad.postprocess.normalization import NormalizationStats, normalize
from raylib_ad.postprocess.plots import _save

__all__ = ["HeatmapTile", "heatmap_indices", "save_heatmap_grid", "tile_image"]

_CONTOUR_RGB = np.array([255, 255, 255], dtype=np.uint8)
_RIGHT, _WRONG = "darkgreen", "crimson"


@dataclass(frozen=True)
class HeatmapTile:
    image_path: str  # the original image file (drawn at its own size)
    anomaly_map: np.ndarray  # (h, w) raw map at the model's input size
    score: float  # raw image score
    label: int  # true label, 1 = anomalous
    defect: str | None = None  # defect type for anomalous images
    mask_path: str | None = None  # ground-truth mask file, same size as the image


def _stats(stats) -> NormalizationStats:
    return stats if isinstance(stats, NormalizationStats) else NormalizationStats.from_dict(stats)


def _resize_map(amap: np.ndarray, width: int, height: int) -> np.ndarray:
    values = np.asarray(amap, dtype=np.float32)
    if values.ndim != 2:
        raise DataError(f"anomaly map must be (H, W), got shape {values.shape}")
    # The model saw the image squashed to a square; bilinear resizing undoes exactly that.
    return np.asarray(Image.fromarray(values).resize((width, height), Image.BILINEAR))


def tile_image(tile: HeatmapTile, map_stats) -> np.ndarray:
    """(H, W, 3) uint8 at the original image's size: image 50/50 with the normalized map, mask outlined."""
    with Image.open(tile.image_path) as im:
        rgb = np.asarray(im.convert("RGB"))
    height, width = rgb.shape[:2]
    scaled = normalize(_resize_map(tile.anomaly_map, width, height), _stats(map_stats))
    heat = colormaps["jet"](scaled, bytes=True)[..., :3]
    blended = ((rgb.astype(np.uint16) + heat.astype(np.uint16)) // 2).astype(np.uint8)
    if tile.mask_path:
        with Image.open(tile.mask_path) as im:
            region = np.asarray(im.convert("L").resize((width, height), Image.NEAREST)) >= 128
        # A 1-pixel outline vanishes when a big image is drawn small: scale its width with the image.
        thickness = max(1, round(max(height, width) / 200))
        outline = region & ~ndimage.binary_erosion(region, iterations=thickness, border_value=0)
        blended[outline] = _CONTOUR_RGB
    return blended


def _title(tile: HeatmapTile, normalized: float, predicted: bool, size: tuple[int, int]) -> tuple[str, str]:
    truth = f"anomalous ({tile.defect})" if tile.label and tile.defect else ("anomalous" if tile.label else "normal")
    if predicted == bool(tile.label):
        verdict = "correct"
    else:
        verdict = "MISSED" if tile.label else "FALSE ALARM"
    text = (f"true: {truth}\npredicted: {'anomalous' if predicted else 'normal'} - {verdict}\n"
            f"score {normalized:.2f} (0.5 = threshold) | {size[0]}x{size[1]} px")
    return text, _RIGHT if verdict == "correct" else _WRONG


def save_heatmap_grid(
    tiles: Sequence[HeatmapTile],
    path,
    image_stats,
    map_stats=None,
    columns: int = 4,
    title: str | None = None,
) -> Path:
    """Write the grid of ``tiles`` (in the given order) to ``path`` as PNG; returns the path.

    image_stats: the deployment normalization of image scores (NormalizationStats or its dict,
    as in stats.json "image_stats"); predicted = raw score >= image_stats.threshold, and the
    title shows the normalized score. map_stats: the pixel normalization ("pixel_stats") used
    to colour the maps; defaults to image_stats.
    """
    if not tiles:
        raise DataError("save_heatmap_grid got no images to draw")
    image_stats = _stats(image_stats)
    map_stats = image_stats if map_stats is None else _stats(map_stats)
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    # Equal cells; each image keeps its aspect ratio inside its cell (imshow's "equal" aspect).
    cell_w, cell_h, bar_w, bottom = 3.4, 3.7, 1.3, 0.45
    top = 0.6 + (0.35 if title else 0.0)  # room for the first row's three-line titles
    width, height = cell_w * columns + bar_w, cell_h * rows + top + bottom
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.1 / width, right=1 - bar_w / width, bottom=bottom / height,
                        top=1 - top / height, wspace=0.08, hspace=0.3)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, tile in zip(axes, tiles):
        picture = tile_image(tile, map_stats)
        ax.imshow(picture, interpolation="antialiased")
        predicted = float(tile.score) >= image_stats.threshold
        text, colour = _title(tile, float(normalize(float(tile.score), image_stats)), predicted,
                              (picture.shape[1], picture.shape[0]))
        ax.set_title(text, fontsize=8, color=colour)
        for side in ax.spines.values():  # a coloured frame: right/wrong is visible at a glance
            side.set(edgecolor=colour, linewidth=2.5)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(tiles):]:
        ax.axis("off")
    cax = fig.add_axes((1 - 0.8 * bar_w / width, bottom / height + 0.1, 0.18 / width, 1 - (top + bottom) / height - 0.2))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="jet"), cax=cax)
    bar.set_label("normalized anomaly score (0.5 = threshold)")
    bar.ax.axhline(0.5, color="black", lw=2)
    fig.text(0.5 * (1 - bar_w / width), 0.12 / height,
             "white outline: ground-truth defect | frame and title: green = prediction right, red = wrong",
             ha="center", fontsize=8)
    if title:
        fig.suptitle(title, y=1 - 0.1 / height, va="top")
    return _save(fig, path)


def heatmap_indices(labels, scores, threshold: float, candidates=None, defects=None, max_items: int = 12) -> list[int]:
    """Which images to draw: the mistakes first, then one of each defect type, then normal ones.

    Order: missed anomalies (lowest score first), false alarms (highest first), one
    detected image per defect type, then alternately more anomalous and normal images
    spread over the score range. ``candidates``: indices allowed (e.g. the held-out test
    images; default all). Returns at most ``max_items`` distinct indices.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pool = np.arange(labels.size) if candidates is None else np.asarray(candidates, dtype=np.int64)
    predicted = scores >= threshold
    missed = sorted((int(i) for i in pool if labels[i] and not predicted[i]), key=lambda i: scores[i])
    false_alarms = sorted((int(i) for i in pool if not labels[i] and predicted[i]), key=lambda i: -scores[i])
    # Cap each kind of mistake so a bad model's grid still shows some correct images.
    budget = max(1, max_items // 3)
    chosen = missed[:budget] + false_alarms[:budget]
    if defects is not None:
        seen = {str(defects[i]) for i in chosen if labels[i]}
        for i in sorted((int(i) for i in pool if labels[i]), key=lambda i: -scores[i]):
            if str(defects[i]) not in seen:
                seen.add(str(defects[i]))
                chosen.append(i)
    rest = [[int(i) for i in pool if labels[i] == want and int(i) not in chosen] for want in (True, False)]
    spread = [group[:: max(1, len(group) // max_items)] for group in rest]
    for pair in zip(*spread):
        chosen.extend(pair)
    longer = max(spread, key=len)
    chosen.extend(longer[min(len(s) for s in spread):])
    unique = list(dict.fromkeys(chosen))
    return unique[:max_items]
