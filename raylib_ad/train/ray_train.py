"""Ray Train glue for the stage runner: the only module that knows about ray.train.

- Data: the driver deals the manifest's rows round-robin into one Ray Dataset per worker (row i goes to
  worker i mod N), read in a fixed order. Every image is seen exactly once whatever the image count
  (Ray Train's default split makes shards equal by dropping rows), and the same seed, data and worker
  count give every worker the same images in the same order on every run (the default split hands out
  blocks to whichever worker asks first).
- Failures: a worker that dies (process killed, node lost) is a reason to restart the worker group from
  the latest checkpoint; an exception raised by the model's own code is not — it would fail the same way
  again. Ray Train's policy retries both, so retries are decided here: the trainer runs with
  max_failures=0, and a lost worker relaunches the same run (same name and storage: Ray Train restores
  the latest checkpoint), up to `max_failures` times; a model error ends the run at once with its message.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raylib_ad.errors import ModelError
from raylib_ad.models import create_model
from raylib_ad.train.runner import FINAL_MODEL, PROGRESS, RunnerConfig, run_recipe
from raylib_ad.train.watchdog import (MEMORY_ADVICE, Heartbeat, ProgressBoard, RunStalledError, describe_stall,
                                      kernel_oom_kills, memory_kill, run_watched, stall_seconds)


def deal_rows(table: pa.Table, workers: int) -> list[pa.Table]:
    """Row i to worker i mod N, in row order: shards differ by at most one row and none is dropped."""
    return [table.take(list(range(rank, table.num_rows, workers))) for rank in range(workers)]


class RayWorkerIO:
    """WorkerIO (train/runner.py) over Ray Train: this worker's datasets, reports and checkpoints."""

    def __init__(self, device: torch.device, prefetch_batches: int, has_val: bool, board: Any = None,
                 faults: dict[str, Any] | None = None):
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = device
        self._prefetch = prefetch_batches
        self._has_val = has_val
        self.beat = Heartbeat(board, self.rank)  # the driver's watchdog sees every batch (train/watchdog.py)
        self.beat("started", force=True)
        self._faults = faults or {}
        self._passes = self._checkpoints = 0

    def train_batches(self, batch_size: int) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        shard = ray.train.get_dataset_shard(f"train_{self.rank}")
        self._passes += 1
        self._maybe_die("pass", self._passes, 0)  # while the data starts loading
        for index, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, device=self.device,
                                                               prefetch_batches=self._prefetch)):
            self._maybe_die("pass", self._passes, index + 1)
            self.beat(f"training batch {index + 1}")
            # Video data also says which video each clip comes from (a Collect stage may use it).
            yield {"image": batch["image"], "video": batch["video"]} if "video" in batch else batch["image"]

    def val_batches(self, batch_size: int):
        if not self._has_val:
            return None
        shard = ray.train.get_dataset_shard(f"val_{self.rank}")
        return self._beating(shard.iter_torch_batches(batch_size=batch_size, device=self.device), "validation")

    def _maybe_die(self, where: str, count: int, batch: int) -> None:
        """Testing hook (tests/test_faults.py): `faults` = {"at": "pass" | "checkpoint", "count": the n-th
        pass over the training shard (any stage) or n-th checkpoint, "batch": batches read in that pass
        (0: before the first), "rank", "marker"} kills this worker process once, as a crash would; with
        "action": "hang" the worker stops there instead, as one waiting forever would."""
        plan = self._faults
        if not plan or plan["at"] != where or plan.get("count", 1) != count or plan.get("batch", 0) != batch:
            return
        if self.rank != plan.get("rank", min(1, self.world_size - 1)) or os.path.exists(plan["marker"]):
            return
        Path(plan["marker"]).write_text(f"{where} {count} batch {batch}")
        if plan.get("action") == "hang":
            time.sleep(10**6)
        if plan.get("action") == "hog":  # hold memory until Ray's memory monitor ends this worker
            hog = bytearray(int(plan["hog_gib"] * 2**30))
            hog[::4096] = b"\1" * len(range(0, len(hog), 4096))  # touch every page: resident, not just reserved
            time.sleep(120)
        os._exit(1)

    def _beating(self, batches, what: str):
        for index, batch in enumerate(batches):
            self.beat(f"{what} batch {index + 1}")
            yield batch

    def restore(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if isinstance(checkpoint.filesystem, pa.fs.LocalFileSystem):
            # Read in place. Checkpoint.to_directory() copies into one directory per node for every worker,
            # and a worker that takes its download lock after another has finished copies again over the
            # files that one is reading: a restarted run failed at random with a truncated train_state.pt.
            return Path(checkpoint.path)
        # Remote storage: a copy of its own for each worker, so there is no shared directory to race on.
        local = tempfile.mkdtemp(prefix="raylib_ad_restore_")
        atexit.register(shutil.rmtree, local, True)
        return Path(checkpoint.to_directory(local))

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.beat("reporting" + (" a checkpoint" if checkpoint_dir else ""), force=True)
        if checkpoint_dir is not None:
            self._checkpoints += 1
            self._maybe_die("checkpoint", self._checkpoints, 0)  # written locally, not yet reported
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        # The report uploads the directory to the run's storage before it returns.
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir))
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _worker_loop(config: dict[str, Any]) -> None:
    import os

    from raylib_ad.progress import RELAY_ENV

    if config.get("relay_progress"):
        os.environ[RELAY_ENV] = "1"  # rank 0's bars become marker lines the driver's console draws
    torch.set_num_threads(config["torch_threads"])
    device = ray.train.torch.get_device()
    runner = RunnerConfig(**config["runner"])
    torch.manual_seed(runner.seed)  # anything a model draws from the global RNG is drawn alike on every run
    model = create_model(config["model"], **config["model_kwargs"]).to(device)
    io = RayWorkerIO(device, runner.prefetch_batches, config["has_val"], config.get("board"), config.get("faults"))
    run_recipe(model, io, runner)


@dataclass
class RayFit:
    model_dir: str  # the fitted model directory inside Ray's checkpoint storage
    metrics: dict[str, Any]  # rank 0's final report
    history: list[dict[str, Any]]  # one record per epoch of every Optimize stage
    val_curve: list[dict[str, Any]]  # every validation: minutes into the run, epoch, step, AUROCs
    seconds: float  # wall time of the fit, Ray Train's start and teardown included
    restarts: int  # worker-group restarts after lost workers


def fit_on_ray(
    model: str,
    model_kwargs: dict[str, Any],
    train_rows: pa.Table,
    val_rows: pa.Table | None,
    runner: RunnerConfig,
    *,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    storage_path: str,
    run_name: str,
    max_failures: int = 2,
    callbacks: list | None = None,
    decode_tasks: int = 2,
    relay_progress: bool = False,
    stall_minutes: float | None = None,
    faults: dict[str, Any] | None = None,
) -> RayFit:
    """Train `model` by its recipe on `workers` Ray Train workers. A run whose workers make no progress
    for `stall_minutes` (default: RAYLIB_AD_STALL_MINUTES, else 20) stops with RunStalledError saying on
    what it waited; its checkpoint is kept."""
    limit_s = stall_seconds(stall_minutes)
    from raylib_ad.data.ray_dataset import manifest_to_dataset

    datasets: dict[str, Any] = {}

    def build_datasets() -> dict[str, Any]:
        # Built under the watchdog: Ray Data runs a task to read the blocks' metadata, and on a cluster
        # with no free CPU that task waits like the workers would.
        if datasets:
            return datasets
        for rank, rows in enumerate(deal_rows(train_rows, workers)):
            datasets[f"train_{rank}"] = manifest_to_dataset(rows, runner.image_size, runner.mean, runner.std,
                                                            decode_tasks=decode_tasks)
        if val_rows is not None:
            for rank, rows in enumerate(deal_rows(val_rows, workers)):
                datasets[f"val_{rank}"] = manifest_to_dataset(rows, runner.image_size, runner.mean, runner.std,
                                                              with_masks=True, decode_tasks=decode_tasks)
        return datasets

    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # a fixed image order per worker: reproducible runs
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    board = ProgressBoard.remote()
    trainer_kwargs = dict(
        train_loop_config={"model": model, "model_kwargs": model_kwargs, "runner": asdict(runner),
                           "has_val": val_rows is not None, "torch_threads": max(1, int(cpus_per_worker)),
                           "relay_progress": relay_progress, "board": board, "faults": faults},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
        run_config=RunConfig(storage_path=storage_path, name=run_name, failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=callbacks),
    )
    start = time.perf_counter()
    restarts = 0
    resume_hint = (f"Its latest checkpoint is kept under {storage_path}/{run_name}: run the same command "
                   f"again to resume from it.")

    def describe(stall):
        return describe_stall(stall, limit_s, resources, workers, resume_hint)

    while True:
        oom_kills = kernel_oom_kills()
        try:
            result = run_watched(lambda: TorchTrainer(_worker_loop, datasets=build_datasets(), **trainer_kwargs).fit(),
                                 board, limit_s, describe)
            break
        except Exception as error:  # noqa: BLE001 - classified below
            if isinstance(error, RunStalledError):
                raise
            lost = _lost_worker(error, oom_kills)
            if not lost:
                raise ModelError(f"{model} failed inside a worker: {_first_cause(error)}") from error
            advice = f"; if it happens again, {MEMORY_ADVICE}" if "killed for memory" in lost else ""
            if restarts >= max_failures:
                raise RuntimeError(f"{model}: workers were lost {restarts + 1} times ({lost}); giving up "
                                   f"(the last checkpoint is under {storage_path}/{run_name}){advice}") from error
            restarts += 1
            what = lost if "killed for memory" in lost else f"a worker was lost ({lost})"
            print(f"[raylib_ad] {what}; restarting from the latest checkpoint ({restarts}/{max_failures}){advice}",
                  flush=True)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the logs under {storage_path}/{run_name}")
    directory = Path(result.checkpoint.path)
    progress = json.loads((directory / PROGRESS).read_text())
    return RayFit(model_dir=str(directory / FINAL_MODEL), metrics=dict(result.metrics),
                  history=progress["history"], val_curve=progress.get("val_curve", []), seconds=time.perf_counter() - start, restarts=restarts)


def _user_exception(failure: BaseException) -> BaseException | None:
    """The exception the training function itself raised, or None for a worker that died or hung
    (Ray reports those as its own errors: health-check failures, actor errors)."""
    from ray.exceptions import RayError
    from ray.train.v2._internal.exceptions import RayTrainError, UserExceptionWithTraceback

    if isinstance(failure, UserExceptionWithTraceback):
        return getattr(failure, "_base_exc", failure)
    if isinstance(failure, (RayTrainError, RayError)):
        return None
    return failure


def _lost_worker(error: BaseException, oom_kills_before: int | None = None) -> str | None:
    """A description of the worker death behind `error` ('rank 1 killed for memory by ...' when memory
    ended it), or None when the model's own code raised."""
    failures = getattr(error, "worker_failures", None)
    if failures is None:  # the controller itself failed: not the model's doing
        if isinstance(error, (ValueError, TypeError)):
            return None
        memory = memory_kill(error, oom_kills_before)
        return f"a worker was {memory}" if memory else type(error).__name__
    # When one worker dies the others fail in their next collective ("connection closed by peer"): a
    # death anywhere wins. Deaths show up as health-check failures or actor errors, not user exceptions.
    for rank, failure in sorted(failures.items()):
        if _user_exception(failure) is None:
            memory = memory_kill(failure, oom_kills_before)
            return f"rank {rank} was {memory}" if memory else f"rank {rank}: {type(failure).__name__}"
    return None


def _first_cause(error: BaseException) -> str:
    """The model's own exception message, without Ray's wrapping and traceback."""
    failures = getattr(error, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        cause = _user_exception(failure) or failure
        text = str(cause).strip().splitlines()
        if text:
            return f"{type(cause).__name__}: {text[-1]}"
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__
