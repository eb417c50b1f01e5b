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

# Above this false-positive rate on the good held-out images the deployed threshold flags too many normal
# parts to be used as it is: the run says so (console and metrics.json "warnings"), with what to do.
MAX_DEPLOYED_GOOD_FPR = 0.2
RANDOM_WEIGHTS_NOTE = "random weights: figures are not the method's"

SUMMARY_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1", "image_threshold", "image_tpr",
                "image_fpr", "fit_seconds", "test_images_per_second", "peak_memory_mb")


def evaluate_on_test(model, run, out: Path, *, batch_size: int, progress: bool, scored=None,
                     pixel: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score the test split, fit threshold + normalization on the validation subset, and compute every
    headline metric on the held-out rest; writes roc.png, threshold.png, heatmaps.png.
    `scored`: the split's scores already computed (train/stored.py); with `pixel` ({"pixel_metrics",
    "pixel_stats"} of the run that stored them) its maps are only the small copies drawn in heatmaps.png.
    Returns {"report", "metrics" (floats, held-out), "at_threshold" (nested JSON), "plots", "scored"}."""
    if scored is None:
        scored = score_split(model, run.test_rows, batch_size=batch_size, progress=progress)
    if pixel is None:
        report = evaluation_report(scored.labels, scored.scores, scored.masks, scored.maps,
                                   val_idx=run.val_idx, heldout_idx=run.heldout_idx)
    else:  # the stored maps are small copies: the pixel figures are the stored run's (same model, same split)
        report = evaluation_report(scored.labels, scored.scores, None, None, val_idx=run.val_idx,
                                   heldout_idx=run.heldout_idx)
        report["metrics"].update(pixel.get("pixel_metrics") or {})
        report["pixel_stats"] = pixel.get("pixel_stats")
    held = np.asarray(report["heldout_idx"], dtype=np.int64)
    threshold = report["image_stats"]["threshold"]
    defects = run.test_rows.column("defect").to_pylist()
    at_threshold = threshold_report(scored.labels[held], scored.scores[held], threshold, [defects[i] for i in held])
    metrics = {**report["metrics"], **threshold_metrics(at_threshold),
               "n_validation": report["n_validation"], "n_test_heldout": report["n_test_heldout"]}
    if scored.seconds > 0:
        metrics["test_images_per_second"] = scored.images_per_second
    plots = _write_plots(out, run, scored, report, at_threshold)
    return {"report": report, "metrics": metrics, "at_threshold": at_threshold, "plots": plots, "scored": scored}


def threshold_warnings(metrics: dict[str, Any]) -> list[str]:
    """Why the deployed threshold should not be used as it is, one sentence each (metrics.json "warnings")."""
    fpr = metrics.get("image_good_fpr", metrics.get("image_fpr"))
    if fpr is None or not fpr > MAX_DEPLOYED_GOOD_FPR:
        return []
    flagged = metrics.get("image_good_false_positives", metrics.get("image_fp"))
    counted = f" ({int(flagged)} good images)" if flagged is not None else ""
    return [f"the deployed threshold flags {fpr:.0%} of the good held-out images{counted}, above "
            f"{MAX_DEPLOYED_GOOD_FPR:.0%}: it would stop most normal parts; train longer, or set a threshold "
            "for your goal: raylib-ad threshold --model OUT/model --target-fpr 0.05"]


def random_weights(settings: dict[str, Any], pretrained: bool = True) -> bool:
    """Whether the model's networks start from random weights (`--set pretrained=false`, AI-VAD's
    `--set networks=tiny`): then its figures are not the method's."""
    return (not pretrained) or settings.get("pretrained") is False or settings.get("networks") == "tiny"


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


def plot_history(history: list[dict[str, Any]], out: Path, val_curve: list[dict[str, Any]] | None = None,
                 kept: dict[str, Any] | None = None) -> None:
    """training_curves.png: train loss per epoch and validation AUROCs over the run's minutes (every
    validation, in-epoch points of --val-every-minutes included), the kept point (`kept`: best_epoch and
    best_step of the fit's metrics) marked on both; history.json and val_curve.json. Epochs count from 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set(title="train loss", xlabel="epoch")
    points = val_curve or []
    for key in ("val_image_auroc", "val_pixel_auroc"):
        shown = [p for p in points if key in p]
        if shown:
            right.plot([p["minutes"] for p in shown], [p[key] for p in shown], marker="o", label=key)
    kept = kept or {}
    epoch, step = kept.get("best_epoch"), kept.get("best_step")
    if epoch is not None and epoch >= 1:
        label = f"kept: epoch {epoch}" + (f", step {step}" if step is not None else "")
        losses = [h["train_loss"] for h in history if h["epoch"] == epoch]
        if losses:
            left.plot([epoch], [losses[-1]], marker="*", ms=16, color="crimson", ls="none", label=label, zorder=5)
            left.legend()
        at = [p for p in points if p["epoch"] == epoch and (step is None or p.get("step") == step)]
        if at and "val_image_auroc" in at[-1]:
            right.plot([at[-1]["minutes"]], [at[-1]["val_image_auroc"]], marker="*", ms=16, color="crimson",
                       ls="none", label=label, zorder=5)
    right.set(title="validation", xlabel="minutes into the run", ylim=(0, 1.02))
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
    title = f"\n{model} on {category} (held-out test images)"
    if metrics.get("random_weights"):
        title += f"  [{RANDOM_WEIGHTS_NOTE}]"
    lines = [title, "-" * (width + 14)]
    lines += [_summary_row(k, v, width) for k, v in rows]
    lines += kept_lines(metrics)
    lines += [f"WARNING: {w}" for w in metrics.get("warnings", [])]
    return "\n".join(lines)


# Counts print as integers, even when read back as floats from an older metrics.json.
_COUNT_KEYS = ("image_good_false_positives", "image_tp", "image_fp", "image_tn", "image_fn")
# What peak_memory_mb is: a maximum over processes, not a sum (run.py: the driver's and each training
# worker's own peak resident set size; Ray's other processes and the object store are not counted).
PEAK_MEMORY_NOTE = "the largest single process peak RSS: driver or one training worker, not a sum"


def _summary_row(key: str, value: Any, width: int) -> str:
    if key in _COUNT_KEYS and isinstance(value, float) and value.is_integer():
        value = int(value)
    if key == "peak_memory_mb" and isinstance(value, (int, float)):
        return f"{key:<{width}}  {value:>10.0f}  ({PEAK_MEMORY_NOTE})"
    return f"{key:<{width}}  {value:>10.4f}" if isinstance(value, float) else f"{key:<{width}}  {value:>10}"


def kept_lines(metrics: dict[str, Any]) -> list[str]:
    """Which weights were kept and why training stopped (gradient-trained models), for the summary."""
    if "stop_reason" not in metrics:
        return []
    lines = []
    if metrics.get("kept_by"):
        auroc = metrics.get("best_val_image_auroc")
        shown = f", validation image AUROC {auroc:.4f}" if isinstance(auroc, float) else ""
        lines.append(f"kept: epoch {metrics['best_epoch']} (step {metrics['best_step']}) of "
                     f"{metrics.get('epochs_run')}, by {metrics['kept_by']}{shown}")
    elif metrics.get("kept"):
        lines.append(f"kept: {metrics['kept']}, epoch {metrics.get('best_epoch')}")
    lines.append(f"stopped: {metrics['stopped_because']}")
    if metrics.get("validation_note"):
        lines.append(f"note: {metrics['validation_note']}")
    return lines
