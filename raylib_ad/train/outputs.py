"""What a run leaves for a person: held-out metrics at the deployment threshold, the plots that decide
where to set the line and what it misses, the training curves, the printed summary. Used by
`raylib-ad train` and `raylib-ad evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from raylib_ad.evaluation import score_split
from raylib_ad.metrics import threshold_metrics, threshold_report
from raylib_ad.postprocess.report import evaluation_report

SUMMARY_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1", "image_threshold", "image_tpr",
                "image_fpr", "fit_seconds", "test_images_per_second", "peak_memory_mb")


def evaluate_on_test(model, run, out: Path, *, batch_size: int, progress: bool) -> dict[str, Any]:
    """Score the test split, fit threshold + normalization on the validation subset, and compute every
    headline metric on the held-out rest; writes roc.png, threshold.png, heatmaps.png.
    Returns {"report", "metrics" (floats, held-out), "at_threshold" (nested JSON), "plots", "scored"}."""
    scored = score_split(model, run.test_rows, batch_size=batch_size, progress=progress)
    report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps,
                               val_idx=run.val_idx, heldout_idx=run.heldout_idx)
    held = np.asarray(report["heldout_idx"], dtype=np.int64)
    threshold = report["image_stats"]["threshold"]
    defects = run.test_rows.column("defect").to_pylist()
    at_threshold = threshold_report(scored.labels[held], scored.scores[held], threshold, [defects[i] for i in held])
    metrics = {**report["metrics"], **threshold_metrics(at_threshold),
               "n_validation": report["n_validation"], "n_test_heldout": report["n_test_heldout"],
               "test_images_per_second": scored.images_per_second}
    plots = _write_plots(out, run, scored, report, at_threshold)
    return {"report": report, "metrics": metrics, "at_threshold": at_threshold, "plots": plots, "scored": scored}


def _write_plots(out: Path, run, scored, report, at_threshold) -> list[Path]:
    from raylib_ad.postprocess.heatmap_grid import HeatmapTile, heatmap_indices, save_heatmap_grid
    from raylib_ad.postprocess.plots import plot_roc, plot_threshold_report

    held = np.asarray(report["heldout_idx"], dtype=np.int64)
    threshold = report["image_stats"]["threshold"]
    paths = [plot_roc(scored.labels[held], scored.scores[held], out / "roc.png", threshold=threshold,
                      title=f"image ROC, held-out test images (n={held.size})"),
             plot_threshold_report(at_threshold, out / "threshold.png")]
    if (out / "training_curves.png").is_file():
        paths.append(out / "training_curves.png")
    if scored.maps is not None:
        image_paths = run.test_rows.column("path").to_pylist()
        mask_paths = run.test_rows.column("mask_path").to_pylist()
        defects = run.test_rows.column("defect").to_pylist()
        idx = heatmap_indices(scored.labels, scored.scores, threshold, candidates=held, defects=defects,
                              max_items=12)
        tiles = [HeatmapTile(image_paths[i], scored.maps[i], float(scored.scores[i]), int(scored.labels[i]),
                             defects[i], mask_paths[i]) for i in idx]
        paths.append(save_heatmap_grid(tiles, out / "heatmaps.png", report["image_stats"], report.get("pixel_stats"),
                                       title="held-out test images"))
    return [Path(p) for p in paths]


def plot_history(history: list[dict[str, Any]], out: Path, val_curve: list[dict[str, Any]] | None = None) -> None:
    """training_curves.png: train loss per epoch and validation AUROCs over the run's minutes (every
    validation, in-epoch points of --val-every-minutes included); history.json and val_curve.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set(title="train loss", xlabel="epoch")
    points = val_curve or []
    for key in ("val_image_auroc", "val_pixel_auroc"):
        shown = [p for p in points if key in p]
        if shown:
            right.plot([p["minutes"] for p in shown], [p[key] for p in shown], marker="o", label=key)
    right.set(title="validation", xlabel="minutes into the run", ylim=(0, 1))
    if points:
        right.legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=100)
    plt.close(fig)
    (out / "history.json").write_text(json.dumps(history, indent=2, default=float))
    if points:
        (out / "val_curve.json").write_text(json.dumps(points, indent=2, default=float))


def summary_table(model: str, category: str, metrics: dict[str, Any]) -> str:
    rows = [(k, metrics[k]) for k in SUMMARY_KEYS if k in metrics]
    recalls = sorted(k for k in metrics if k.startswith("image_recall_"))
    rows += [(k, metrics[k]) for k in recalls + ["image_good_false_positives"] if k in metrics]
    width = max(len(k) for k, _ in rows)
    lines = [f"\n{model} on {category} (held-out test images)", "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:>10.4f}" if isinstance(v, float) else f"{k:<{width}}  {v:>10}" for k, v in rows]
    return "\n".join(lines)
