"""Ray Train glue for memory-bank models: each worker extracts features from its own shard, the model's
fit() reduces across workers (exact sums, or the two-round coreset), and rank 0 checkpoints the model
directory. The only place besides train/gradient.py that knows about ray.train."""

from __future__ import annotations

import hashlib
import resource
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raylib_ad import distributed
from raylib_ad.artifact import write_model_dir
from raylib_ad.models import create_model


def fitted_state_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor the fit produced (backbone weights excluded): equal digests on all
    workers prove every worker holds the same model."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if not key.startswith("feature_extractor."):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _gather_floats(value: float) -> list[float]:
    return distributed.all_gather_rows(torch.tensor([[value]], dtype=torch.float64))[:, 0].tolist()


def memory_bank_loop(config: dict[str, Any]) -> None:
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()
    model = create_model(config["model"], **config["model_kwargs"]).to(device)
    shard = ray.train.get_dataset_shard("train")
    batches = (b["image"] for b in shard.iter_torch_batches(batch_size=config["batch_size"], device=device))
    start = time.perf_counter()
    model.fit(batches, progress=config.get("progress", True) and rank == 0)
    fit_compute_seconds = time.perf_counter() - start

    digests = distributed.all_gather_rows(
        torch.tensor([[int(fitted_state_digest(model)[:15], 16)]], dtype=torch.int64))[:, 0].tolist()
    peak_rss_mb = _gather_floats(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    metrics = {
        "fit_compute_seconds": fit_compute_seconds,
        "worker_digests": [f"{d:015x}" for d in digests],
        "worker_peak_rss_mb": peak_rss_mb,
        "worker_gpu_peak_mb": _gather_floats(gpu_peak_mb),
        "world_size": context.get_world_size(),
        "node_id": ray.get_runtime_context().get_node_id(),  # where rank 0 ran (sweeps record it)
        **getattr(model, "fit_timings", {}),
    }
    if hasattr(model, "memory_bank"):
        metrics["memory_bank_rows"] = int(model.memory_bank.shape[0])
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            write_model_dir(model, f"{tmp}/model")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(f"{tmp}/model"))
    else:
        ray.train.report(metrics)


def fit_memory_bank(
    model: str,
    model_kwargs: dict[str, Any],
    train_dataset: "ray.data.Dataset",
    *,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    batch_size: int,
    storage_path: str,
    run_name: str,
    progress: bool = True,
    callbacks: list | None = None,
) -> tuple[str, dict[str, Any]]:
    """Run the fit on `workers` Ray Train workers; returns (checkpointed model dir, rank-0 metrics)."""
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        memory_bank_loop,
        train_loop_config={
            "model": model,
            "model_kwargs": model_kwargs,
            "batch_size": batch_size,
            "torch_threads": max(1, int(cpus_per_worker)),
            "progress": progress,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        datasets={"train": train_dataset},
        run_config=RunConfig(storage_path=storage_path, name=run_name, failure_config=FailureConfig(max_failures=1),
                             callbacks=callbacks),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the fit finished without a checkpoint; see the logs under {storage_path}/{run_name}")
    return result.checkpoint.path, dict(result.metrics)
