"""The runner's training state: what a checkpoint holds (model, best weights, optimizers, progress), how a
restarted worker group finds where it was, and the progress record (history, validation curve)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raylib_ad.artifact import load_state_resizing

if TYPE_CHECKING:
    from raylib_ad.train.runner import WorkerIO

TRAIN_STATE, FINAL_MODEL, PROGRESS = "train_state.pt", "model", "progress.json"


# How the kept weights are chosen among validations: the highest validation image AUROC; ties (a small
# validation subset saturates at 1.0 early) by pixel AUROC, then by validation loss where a model reports
# one, and among equals the latest: training that still lowers the loss is not thrown away for a tie.
KEPT_BY = ("val_image_auroc", "val_pixel_auroc", "val_loss")


def fresh_progress() -> dict[str, Any]:
    # "epoch" is the runner's own 0-based counter of the last finished epoch (-1: none yet); every epoch a
    # person reads (history, val_curve, best_epoch, the bar, the plot) counts from 1.
    return {"stage": 0, "stage_done": False, "epoch": -1, "steps": 0, "best": -math.inf, "best_epoch": -1,
            "best_key": None, "best_step": None, "best_ties": 0, "stale": 0, "history": [], "val_curve": []}


def record_point(progress, metrics, epoch: int, elapsed: float) -> None:
    """A point of the validation curve; `epoch` is the epoch as shown (from 1)."""
    point = {"minutes": round(elapsed / 60, 3), "epoch": epoch, "step": progress["steps"]}
    point.update({k: metrics[k] for k in ("val_image_auroc", "val_pixel_auroc") if k in metrics})
    progress.setdefault("val_curve", []).append(point)


def _rank_key(metrics: dict[str, Any]) -> list[float] | None:
    """The validation's place in KEPT_BY order (higher is better); None without a usable image AUROC."""
    image = metrics.get("val_image_auroc", math.nan)
    if image is None or math.isnan(image):
        return None

    def value(key: str, sign: float) -> float:
        v = metrics.get(key)
        return -math.inf if v is None or math.isnan(v) else round(sign * float(v), 10)

    return [round(float(image), 10), value("val_pixel_auroc", 1.0), value("val_loss", -1.0)]


def consider(progress: dict[str, Any], metrics: dict[str, Any], epoch: int) -> tuple[bool, bool]:
    """Compare a validation (of `epoch`, as shown, from 1) with the kept one. Returns (keep these weights,
    a strict improvement): a tie on every criterion keeps the later weights but is no progress for
    --patience. Updates progress's best, best_key, best_epoch, best_step and best_ties."""
    key = _rank_key(metrics)
    if key is None:
        return False, False
    best = progress.get("best_key")
    if best is None or key[0] > best[0]:
        progress["best_ties"] = 1
    elif key[0] == best[0]:  # counted whether or not the next criterion separates them
        progress["best_ties"] = progress.get("best_ties", 0) + 1
    if best is not None and key < best:
        return False, False
    improved = best is None or key > best
    progress.update(best=float(metrics["val_image_auroc"]), best_key=key, best_epoch=epoch, best_step=progress["steps"],
                    best_metrics={k: metrics[k] for k in ("val_image_auroc", "val_pixel_auroc", "val_loss",
                                                           "val_images", "val_anomalous") if k in metrics})
    return True, improved


def kept_summary(progress: dict[str, Any], stop_reason: str, budgets: dict[str, Any]) -> dict[str, Any]:
    """What the main stage kept and why it stopped, as flat metrics (metrics.json, the printed summary).
    `stop_reason`: "time", "patience", "max_epochs" or "max_steps"; `budgets`: their values."""
    why = {"time": f"the time budget ran out (--max-minutes {budgets.get('max_minutes')})",
           "patience": f"no progress on validation for {budgets.get('patience')} epochs (--patience)",
           "max_epochs": f"the epoch budget was reached ({budgets.get('epochs')} epochs)",
           "max_steps": f"the step budget was reached ({budgets.get('steps')} steps)"}[stop_reason]
    summary: dict[str, Any] = {"stop_reason": stop_reason, "stopped_because": why,
                               "epochs_run": progress["epoch"] + 1, "steps_run": progress["steps"]}
    best = progress.get("best_metrics") or {}
    if progress.get("best_key") is None:
        summary.update(kept="the last epoch (no validation to choose by)", best_epoch=progress["epoch"] + 1,
                       best_step=progress["steps"])
        return summary
    tie_breaks = [k for k in KEPT_BY[1:] if k in best]
    kept_by = "highest val_image_auroc" + (f" (ties: {', '.join(tie_breaks)}, then the latest)" if tie_breaks
                                           else " (ties: the latest)")
    summary.update(best_epoch=progress["best_epoch"], best_step=progress["best_step"], kept_by=kept_by,
                   best_val_image_auroc=progress["best"], val_ties=progress.get("best_ties", 1))
    if "val_pixel_auroc" in best:
        summary["best_val_pixel_auroc"] = best["val_pixel_auroc"]
    if progress.get("best_ties", 1) > 1:
        size = best.get("val_images")
        anomalous = best.get("val_anomalous")
        counts = f"{size} images" + (f", {anomalous} anomalous" if anomalous is not None else "")
        summary["validation_note"] = (
            f"the validation subset ({counts}) is too small to separate epochs on image AUROC: "
            f"{progress['best_ties']} validations tied at {progress['best']:.4f}; the tie was broken by "
            f"{', '.join(tie_breaks + ['the latest'])} (raise --val-fraction or add test images)")
    return summary


def cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def checkpoint(model, io: WorkerIO, progress, metrics, specs, best_state) -> None:
    """Rank 0 writes the training state; every worker reports (Ray Train needs every rank's report)."""
    directory = None
    if io.rank == 0:
        directory = tempfile.mkdtemp(prefix="raylib_ad_ckpt_")
        torch.save({"model": model.state_dict(), "best_state": best_state, "progress": progress,
                    "optimizers": {name: {"optimizer": spec.optimizer.state_dict(),
                                          "scheduler": spec.scheduler.state_dict() if spec.scheduler else None}
                                   for name, spec in specs.items()}}, Path(directory) / TRAIN_STATE)
        (Path(directory) / PROGRESS).write_text(json.dumps(progress, default=float))
    io.report(dict(metrics), directory)


def restore(io: WorkerIO, model) -> tuple[dict[str, Any], dict[str, Any] | None]:
    directory = io.restore()
    if directory is None or not (Path(directory) / TRAIN_STATE).is_file():
        return fresh_progress(), None
    state = torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=False)
    load_state_resizing(model, state["model"])
    model.to(io.device)
    state["progress"].setdefault("val_curve", [])  # checkpoints written before the curve existed
    return state["progress"], state
