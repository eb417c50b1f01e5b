"""The one Ray Train loop every gradient-trained model shares.

The model supplies its loss (train-mode forward returns {"loss": ...}), its optimizer and schedule
(configure_optimizers) and whether to clip gradients (gradient_clip_val). The loop supplies DDP, the
worker's Ray Data shard, bf16 autocast on GPU, per-epoch validation gathered across workers, early
stopping, time limits, and a checkpoint per epoch holding the latest training state and the best model
so far. A worker that dies resumes from the latest checkpoint (model, optimizer, scheduler, epoch,
history), so a run always ends with the same number of epochs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raylib_ad import distributed
from raylib_ad.artifact import write_model_dir
from raylib_ad.metrics import auroc
from raylib_ad.models import create_model
from raylib_ad.train.feature_cache import FrozenFeatureCache
from raylib_ad.train.steps import training_step

TRAIN_STATE, LATEST_MODEL, BEST_MODEL = "train_state.pt", "latest_model", "best_model"
DEFAULT_FEATURE_CACHE_MB = 3072  # per worker; see train/feature_cache.py
VALIDATION_MAP_SIZE = 64  # validation pixel AUROC at 64 px keeps the per-epoch gather small


def _validate(model, shard, batch_size: int, device) -> dict[str, float]:
    """Image and pixel AUROC on the validation split, gathered from every worker's shard."""
    model.eval()
    # One row per image: label, score, then (for models with maps) the 64x64 mask and map, flattened.
    width = 2 + (2 * VALIDATION_MAP_SIZE**2 if model.produces_maps else 0)
    rows = [torch.zeros(0, width, dtype=torch.float64)]
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            out = model(batch["image"])
            columns = [batch["label"][:, None], out.score[:, None]]
            if model.produces_maps:
                columns.append(F.interpolate(batch["mask"][:, None].float(), size=VALIDATION_MAP_SIZE,
                                             mode="nearest").flatten(1))
                columns.append(F.interpolate(out.anomaly_map[:, None].float(), size=VALIDATION_MAP_SIZE,
                                             mode="area").flatten(1))
            rows.append(torch.cat([c.double().cpu() for c in columns], dim=1))
    every = distributed.all_gather_rows(torch.cat(rows)).numpy()
    result = {"val_image_auroc": _safe_auroc(every[:, 0], every[:, 1])}
    if model.produces_maps:
        half = VALIDATION_MAP_SIZE**2
        result["val_pixel_auroc"] = _safe_auroc(every[:, 2 : 2 + half].ravel(), every[:, 2 + half :].ravel())
    return result


def _frozen_features(model, images: torch.Tensor, use_amp: bool):
    with torch.no_grad(), torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=use_amp):
        return model.frozen_features(images)


def _safe_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return auroc(labels.astype(np.int64), scores)


def _restore(model, optimizer, scheduler) -> dict[str, Any]:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": -1, "best": -math.inf, "best_epoch": -1, "history": [], "stale": 0}
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state["progress"]


def _save_checkpoint(model, optimizer, scheduler, progress, improved: bool, previous: str | None) -> str:
    """A directory with the training state, the latest model and the best model so far."""
    directory = tempfile.mkdtemp(prefix="raylib_ad_ckpt_")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "progress": progress}, Path(directory) / TRAIN_STATE)
    write_model_dir(model, Path(directory) / LATEST_MODEL)
    if improved or previous is None:
        write_model_dir(model, Path(directory) / BEST_MODEL)
    else:
        shutil.copytree(Path(previous) / BEST_MODEL, Path(directory) / BEST_MODEL)
    (Path(directory) / "progress.json").write_text(json.dumps(progress, default=float))
    return directory


def gradient_loop(config: dict[str, Any]) -> None:
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()
    model = create_model(config["model"], **config["model_kwargs"]).to(device)
    optimizer, scheduler = model.configure_optimizers()
    progress = _restore(model, optimizer, scheduler)
    if device.type == "cuda" and context.get_world_size() > 1:
        # Batch statistics over the global batch, as one process would compute them (GPU only in torch).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp_model = ray.train.torch.prepare_model(model)  # DDP when world_size > 1; fails on unused params
    use_amp = device.type == "cuda"
    world_size = context.get_world_size()
    # --batch-size is the global batch (images per optimizer step), as in a single-process run: each
    # worker takes its share, so the optimization does not change with the number of workers.
    worker_batch = max(1, config["batch_size"] // world_size)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    cache_mb = config.get("feature_cache_mb", DEFAULT_FEATURE_CACHE_MB)
    cache = FrozenFeatureCache(cache_mb * 2**20, keep_images=model.needs_images_with_frozen) if cache_mb > 0 else None
    previous_dir, start = None, time.monotonic()
    for epoch in range(progress["epoch"] + 1, config["max_epochs"]):
        _maybe_fail_for_tests(config, epoch, rank)
        ddp_model.train()
        loss_sum, seen, waited, epoch_start = 0.0, 0, 0.0, time.perf_counter()
        from_cache = cache is not None and cache.ready
        if from_cache:
            # A fresh order every epoch, as a shuffling DataLoader gives (the stream's order is fixed).
            shuffle = torch.Generator().manual_seed(config["model_kwargs"].get("seed", 0) * 100003 + epoch * 101 + rank)
            batches = cache.batches(worker_batch, shuffle)
        else:
            batches = ((b["image"], None) for b in train_shard.iter_torch_batches(
                batch_size=worker_batch, device=device, prefetch_batches=config.get("prefetch_batches", 2)))
        while True:
            ask = time.perf_counter()
            item = next(batches, None)  # time spent here is time the step waited for data
            waited += time.perf_counter() - ask
            if item is None:
                break
            images, frozen = item
            if cache is not None and frozen is None:
                frozen = _frozen_features(model, images, use_amp)
                if frozen is None:  # the model has no frozen part: nothing to cache
                    cache = None
                else:
                    cache.add(images, frozen)
            loss = training_step(ddp_model, model, optimizer, images, world_size=world_size, use_amp=use_amp,
                                 frozen=frozen)
            count = len(next(iter(frozen.values()))) if images is None else len(images)
            loss_sum += loss * count
            seen += count
        if cache is not None and not cache.ready:
            cache.seal()
        if scheduler is not None:
            scheduler.step()
        totals = distributed.all_reduce_sum(torch.tensor([loss_sum, float(seen)], dtype=torch.float64))
        train_seconds = time.perf_counter() - epoch_start
        metrics = {"epoch": epoch, "train_loss": float(totals[0] / max(totals[1], 1)),
                   "train_images_per_second": float(totals[1]) / train_seconds,
                   "train_images_per_second_per_worker": float(totals[1]) / train_seconds / world_size,
                   "from_feature_cache": from_cache,
                   "data_wait_fraction": waited / train_seconds,
                   **_validate(model, val_shard, worker_batch, device)}
        score = metrics["val_image_auroc"]
        improved = not math.isnan(score) and score > progress["best"]
        if improved:
            progress.update(best=score, best_epoch=epoch, stale=0)
        else:
            progress["stale"] += 1
        progress["epoch"] = epoch
        progress["history"].append(metrics)
        # Every worker takes the same stop decision: the elapsed time is agreed on through the max.
        elapsed = float(distributed.all_reduce_max(torch.tensor([time.monotonic() - start])))
        stop = (config.get("patience") is not None and progress["stale"] >= config["patience"]) or (
            config.get("max_minutes") is not None and elapsed >= 60 * config["max_minutes"])
        metrics.update(best_val_image_auroc=progress["best"], best_epoch=progress["best_epoch"], stopped=stop)
        if rank == 0:
            directory = _save_checkpoint(model, optimizer, scheduler, progress, improved, previous_dir)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
            if previous_dir:
                shutil.rmtree(previous_dir, ignore_errors=True)
            previous_dir = directory
        else:
            ray.train.report(metrics)
        if stop:
            break


def _maybe_fail_for_tests(config: dict[str, Any], epoch: int, rank: int) -> None:
    """Testing hook: `fail_once_at_epoch` kills rank 1 (or 0 alone) once, early in that epoch,
    to prove a run resumes from its latest checkpoint. A marker file makes it happen only once."""
    marker = config.get("fail_marker")
    if config.get("fail_once_at_epoch") != epoch or not marker or os.path.exists(marker):
        return
    if rank == min(1, ray.train.get_context().get_world_size() - 1):
        Path(marker).write_text("failed once")
        # Die a few seconds into the epoch, as a real mid-epoch crash would. Ray Train registers a
        # reported checkpoint when its controller next polls the workers (every 2 s); a worker that
        # dies before that poll takes its last report with it, and the run restarts one epoch earlier.
        time.sleep(config.get("fail_after_s", 6.0))
        os._exit(1)  # a hard crash, as a killed worker would look


def fit_gradient(
    model: str,
    model_kwargs: dict[str, Any],
    train_dataset: "ray.data.Dataset",
    val_dataset: "ray.data.Dataset",
    *,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    batch_size: int,
    max_epochs: int,
    storage_path: str,
    run_name: str,
    patience: int | None = None,
    max_minutes: float | None = None,
    max_failures: int = 2,
    extra_config: dict[str, Any] | None = None,
    callbacks: list | None = None,
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Train on `workers` Ray Train workers; returns (best model dir, last metrics, per-epoch history).
    `callbacks` go to the RunConfig (a Tune sweep passes the callback that forwards each epoch's report)."""
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        gradient_loop,
        train_loop_config={"model": model, "model_kwargs": model_kwargs, "batch_size": batch_size,
                           "max_epochs": max_epochs, "patience": patience, "max_minutes": max_minutes,
                           "torch_threads": max(1, int(cpus_per_worker)), **(extra_config or {})},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        datasets={"train": train_dataset, "val": val_dataset},
        run_config=RunConfig(storage_path=storage_path, name=run_name,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=callbacks),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the logs under {storage_path}/{run_name}")
    directory = Path(result.checkpoint.path)
    progress = json.loads((directory / "progress.json").read_text())
    return str(directory / BEST_MODEL), dict(result.metrics), progress["history"]
