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


def fresh_progress() -> dict[str, Any]:
    return {"stage": 0, "stage_done": False, "epoch": -1, "steps": 0, "best": -math.inf, "best_epoch": -1,
            "stale": 0, "history": [], "val_curve": []}


def record_point(progress, metrics, epoch: int, elapsed: float) -> None:
    point = {"minutes": round(elapsed / 60, 3), "epoch": epoch, "step": progress["steps"]}
    point.update({k: metrics[k] for k in ("val_image_auroc", "val_pixel_auroc") if k in metrics})
    progress.setdefault("val_curve", []).append(point)


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
