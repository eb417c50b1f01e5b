"""The sweep's summary: one row per planned trial (CSV + markdown) and a bar chart of test image AUROC
per category and model. Plain files; sweep.py logs them to the parent MLflow run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

COLUMNS = ("category", "model", "trial", "params", "status", "val_image_auroc", "val_pixel_auroc",
           "val_pixel_aupro", "fit_seconds", "image_auroc", "pixel_auroc", "pixel_aupro", "image_f1", "role")
# image_auroc ... image_f1: the held-out test images, the same names and images as `raylib-ad train`'s metrics.


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def write_summary(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """summary.csv and summary.md in `out`; returns their paths."""
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in COLUMNS])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row.get(c)).replace("|", "\\|") for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def plot_test_auroc(best: dict[tuple[str, str], float], out: Path) -> Path:
    """Grouped bars: one group per category, one bar per model (its best trial's test image AUROC)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    categories = sorted({c for c, _ in best})
    models = sorted({m for _, m in best})
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(categories) * max(len(models), 1)), 4))
    x = np.arange(len(categories))
    for i, model in enumerate(models):
        values = [best.get((c, model), float("nan")) for c in categories]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model)
    ax.set_xticks(x, categories, rotation=30, ha="right")
    ax.set(ylabel="test image AUROC (held-out)", ylim=(0, 1.05),
           title="best trial per model, scored once on the held-out test images")
    ax.legend()
    fig.tight_layout()
    path = out / "test_auroc_by_category.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
