"""The one stage runner: executes any model's recipe (models/recipe.py) on one worker of N, or alone.

Ray-free. Where the data comes from and where reports go is a `WorkerIO`: train/ray_train.py gives one
backed by Ray Train (dataset shards, ray.train.report, checkpoints); train/in_process.py's
`fit_in_process` gives one over tensors or a manifest in this process. The runner supplies, for every recipe:
- Collect / Calibrate: the worker's shard as image batches to the stage's function (which reduces
  across workers through raylib_ad.distributed);
- Optimize: DDP around each trainable module of the stage, loss weighting so N workers step as one
  process on the global batch (train/step_context.py), bf16 autocast on GPU, per-step or per-epoch
  schedulers, a generator per worker seeded by (seed, rank, stage, epoch) and one per image seeded by
  (seed, stage, epoch, the image's index in the training set): batch["generators"], so that an image's
  augmentation does not depend on which worker it lands on or who shares its batch,
  the frozen-feature cache where inputs are not augmented, per-epoch validation gathered across
  workers, the best epoch's weights kept, early stopping (--patience), time and step budgets;
- a checkpoint after every epoch and after every Collect stage (model, optimizers, schedulers,
  progress), so a restarted worker group resumes where the last report left off.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from raylib_ad import distributed
from raylib_ad.artifact import write_model_dir
from raylib_ad.models.recipe import Collect, Optimize, main_stage
from raylib_ad.progress import ProgressCounter
from raylib_ad.train.extra_streams import cycle_images
from raylib_ad.train.feature_cache import FrozenFeatureCache
from raylib_ad.train.step_context import RunnerStepContext, loss_weight
from raylib_ad.train.checkpoints import FINAL_MODEL, PROGRESS, checkpoint as _checkpoint  # noqa: F401 (re-exported)
from raylib_ad.train.checkpoints import cpu_state as _cpu_state, record_point as _record_point
from raylib_ad.train.checkpoints import consider as _consider, kept_summary as _kept_summary
from raylib_ad.train.checkpoints import restore as _restore
from raylib_ad.train.validation import fitted_state_digest, validate

DEFAULT_FEATURE_CACHE_MB = 3072  # per worker; see train/feature_cache.py


class WorkerIO(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def train_batches(self, batch_size: int) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """This worker's training images, on its device, in a fixed order; for video data a dict of the
        clips ("image") and their video ids ("video")."""

    def val_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]] | None:
        """This worker's validation images ("image", "label", "mask"), or None without a validation set."""

    def restore(self) -> Path | None:
        """The directory of the latest checkpoint, when the run is resuming."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """Every worker reports; rank 0 passes the checkpoint directory (the IO may move or delete it)."""


@dataclass
class RunnerConfig:
    batch_size: int = 32  # the global batch: each of N workers takes batch_size // N per step
    max_epochs: int | None = None  # replaces the main Optimize stage's epoch budget
    max_steps: int | None = None  # replaces the main Optimize stage's step budget
    patience: int | None = None  # early stopping of the main stage on validation image AUROC
    max_minutes: float | None = None  # training time over all stages; ends an epoch early when it runs out
    val_every_minutes: float | None = None  # also validate inside epochs, this often (a curve over a budget)
    seed: int = 0
    feature_cache_mb: int = DEFAULT_FEATURE_CACHE_MB
    prefetch_batches: int = 2
    progress: bool = False
    train_images: int | None = None  # the training set's size, when known: bars with a total and an ETA
    image_size: int = 256
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # fail_once_at_epoch, fail_in_stage, fail_marker, fail_after_s (see _maybe_fail_for_tests)
    test_hooks: dict[str, Any] = field(default_factory=dict)


def run_recipe(model, io: WorkerIO, config: RunnerConfig) -> dict[str, Any]:
    """Run every stage of `model.recipe()`; rank 0 reports the final model directory. Returns the final
    metrics (every rank)."""
    recipe, splits_epochs = _recipe(model, config)
    main = main_stage(recipe)
    progress, saved = _restore(io, model)
    clock = {"start": time.monotonic(), "compute": 0.0}
    out_of_time = False
    for index, stage in enumerate(recipe):
        if index < progress["stage"] or (index == progress["stage"] and progress["stage_done"]):
            continue
        if index != progress["stage"]:
            if recipe[progress["stage"]] is main:  # the model's best validation, before the next stage resets it
                progress["main_best"] = {"best": progress["best"], "best_epoch": progress["best_epoch"]}
            progress.update(stage=index, stage_done=False, epoch=-1, steps=0, best=-math.inf, best_epoch=-1,
                            best_key=None, best_step=None, best_ties=0, stale=0)
            saved = None
        begin = time.perf_counter()
        if isinstance(stage, Optimize) and out_of_time:
            continue  # --max-minutes covers the whole run: later optimize stages are skipped...
        if isinstance(stage, Optimize):
            # A model that split --max-epochs among its stages has already applied it.
            stage_config = replace(config, max_epochs=None) if splits_epochs else config
            stopped = _optimize(model, stage, index, io, stage_config, progress, saved, is_main=stage is main,
                                clock=clock)
            clock["compute"] += time.perf_counter() - begin
            out_of_time = stopped == "time"
        else:  # ...but collect and calibrate stages still run: the model needs their statistics
            _collect(model, stage, io, config)
            clock["compute"] += time.perf_counter() - begin
            progress["stage_done"] = True
            if index < len(recipe) - 1:  # a later stage may fail: keep what this one computed
                _checkpoint(model, io, progress, {"stage": stage.name, "completed": stage.kind}, {}, None)
    return _final_report(model, recipe, io, progress, clock)


# --- stages ---------------------------------------------------------------------------------------


def _recipe(model, config: RunnerConfig):
    """The model's stages. A model whose recipe() takes `max_epochs` divides that budget among its own
    stages (DSR splits it between two phases, as anomalib splits its trainer's max_epochs); then the
    runner does not also apply it to the main stage. Returns (recipe, whether the model split it)."""
    import inspect

    if "max_epochs" in inspect.signature(model.recipe).parameters:
        return model.recipe(max_epochs=config.max_epochs), config.max_epochs is not None
    return model.recipe(), False


def _collect(model, stage: Collect, io: WorkerIO, config: RunnerConfig) -> None:
    model.eval()
    worker_batch = max(1, config.batch_size // io.world_size)
    batches = (_on_device(item, io.device) for item in io.train_batches(worker_batch))
    count = _steps_per_epoch(config, io, worker_batch)
    if count is not None:
        batches = _Sized(batches, count)
    with torch.no_grad():
        stage.run(batches, config.progress and io.rank == 0)


class _Sized:
    """A stream of batches that knows how many it holds (when the training set's size is known), so that a
    Collect stage's progress bar (`patchcore features`) has a total and an ETA."""

    def __init__(self, iterator, count: int):
        self._iterator, self._count = iterator, count

    def __iter__(self):
        return iter(self._iterator)

    def __next__(self):
        return next(self._iterator)

    def __len__(self) -> int:
        return self._count


def _steps_per_epoch(config: RunnerConfig, io: WorkerIO, worker_batch: int) -> int | None:
    """Batches this worker streams per epoch: rows are dealt round robin (row i to worker i mod N), so
    worker r holds ceil((n - r) / N) of n images. None when the training set's size is not known."""
    if not config.train_images:
        return None
    rows = -(-max(config.train_images - io.rank, 0) // io.world_size)
    return max(1, -(-rows // worker_batch))


def _optimize(model, stage: Optimize, index: int, io: WorkerIO, config: RunnerConfig,
              progress: dict[str, Any], saved: dict[str, Any] | None, *, is_main: bool,
              clock: dict[str, float]) -> str | None:
    epochs = config.max_epochs if is_main and config.max_epochs else stage.epochs
    steps_budget = config.max_steps if is_main and config.max_steps else stage.steps
    if is_main and config.max_epochs and not config.max_steps:
        steps_budget = None  # an explicit epoch budget replaces a step budget rather than racing it
    specs = {spec.name: spec for spec in stage.optimizers}
    if saved:
        for name, spec in specs.items():
            spec.optimizer.load_state_dict(saved["optimizers"][name]["optimizer"])
            if spec.scheduler is not None and saved["optimizers"][name]["scheduler"] is not None:
                spec.scheduler.load_state_dict(saved["optimizers"][name]["scheduler"])
    best_state = saved.get("best_state") if saved else None
    modules = {name: _wrap_for_ddp(module, io) for name, module in stage.modules.items()}
    use_amp = io.device.type == "cuda"
    worker_batch = max(1, config.batch_size // io.world_size)
    cache = None
    if stage.caches_frozen and config.feature_cache_mb > 0:
        cache = FrozenFeatureCache(config.feature_cache_mb * 2**20, keep_images=stage.needs_images_with_frozen)
    extra = {s.name: cycle_images(s, config, io.rank, io.device) for s in stage.extra_streams}
    epoch = progress["epoch"] + 1
    refilled_epoch = None
    if cache is not None and epoch > 0:
        # Resumed after the stage's first epoch: an undisturbed run trains this epoch from the cache, on
        # shuffled batches. Fill the cache first with a pass that trains nothing, so that the resumed run
        # replays the same batches and ends with the same weights (tests/test_faults.py).
        model.eval()
        for item in io.train_batches(worker_batch):
            images = _images(item).to(io.device)
            cache.add(images, _frozen_features(stage, images, use_amp))
        cache.seal()
        refilled_epoch = epoch
    next_point = None  # the next in-epoch validation, in seconds of the run's clock
    if config.val_every_minutes and stage.validate:
        every = 60 * config.val_every_minutes
        next_point = every * (math.floor((time.monotonic() - clock["start"]) / every) + 1)
    by_steps = epochs is None  # the bar counts what the budget counts
    # An epoch budget with a known epoch length: the bar counts steps (epochs x steps per epoch) so that it
    # moves with every batch and has an ETA; the epoch is in its postfix.
    per_epoch = None if by_steps else _steps_per_epoch(config, io, worker_batch)
    if per_epoch is not None and steps_budget is not None:
        per_epoch = None  # a step budget may end epochs early: the bar would not end where it says
    if by_steps or per_epoch is None:
        bar = ProgressCounter(f"{stage.name} {'steps' if by_steps else 'epochs'}",
                              steps_budget if by_steps else epochs, enabled=config.progress and io.rank == 0,
                              unit="step" if by_steps else "epoch")
        bar.update(progress["steps"] if by_steps else epoch, force=True)  # a resumed run starts where it was
    else:
        bar = ProgressCounter(f"{stage.name} epochs", epochs * per_epoch, enabled=config.progress and io.rank == 0,
                              unit="step")
        bar.update(epoch * per_epoch, force=True, epoch=f"{epoch + 1}/{epochs}")
    bar_steps = by_steps or per_epoch is not None
    shown: dict[str, Any] = {}  # the last epoch's loss and validation AUROC, kept on the bar between epochs
    try:
        stop_reason = None
        while (epochs is None or epoch < epochs) and (steps_budget is None or progress["steps"] < steps_budget):
            _maybe_fail_for_tests(config.test_hooks, epoch, io, stage.name)
            seed = _mix(config.seed, io.rank, index, epoch)
            generator = torch.Generator(device=io.device).manual_seed(seed)
            model.eval()  # frozen parts stay in eval mode; the stage's trainable modules train
            for module in stage.modules.values():
                module.train()
            from_cache = cache is not None and cache.ready
            if from_cache:
                batches = cache.batches(worker_batch, torch.Generator().manual_seed(seed))
            else:
                batches = ((_images(item).to(io.device), None) for item in io.train_batches(worker_batch))
            epoch_start = time.perf_counter()
            sums, seen, waited, standin = {}, 0, 0.0, None
            taken = 0  # images of this worker's shard streamed so far this epoch
            epoch_steps = 0  # the same on every worker: they step together
            while steps_budget is None or progress["steps"] < steps_budget:
                ask = time.perf_counter()
                item = next(batches, None)  # time spent here is time the step waited for data
                waited += time.perf_counter() - ask
                local = 0 if item is None else _count(item)
                total = local
                elapsed = time.monotonic() - clock["start"]
                if io.world_size > 1:  # all workers agree on whether anyone still has data, on the count and
                    # on the clock (the mean of theirs), so that they stop or validate at the same step
                    agreed = distributed.all_reduce_sum(torch.tensor(
                        [float(item is not None), float(local), elapsed], dtype=torch.float64))
                    if agreed[0] == 0:
                        break
                    total, elapsed = int(agreed[1]), float(agreed[2]) / io.world_size
                elif item is None:
                    break
                if config.max_minutes is not None and elapsed >= 60 * config.max_minutes and epoch_steps:
                    break  # the budget ends inside an epoch too: one DRAEM epoch on 2 CPU cores outlasts most
                if next_point is not None and elapsed >= next_point and epoch_steps:  # (at an epoch's first
                    # step the model is the one the previous epoch's end just validated)
                    next_point += 60 * config.val_every_minutes
                    best_state = _validation_point(model, stage, io, worker_batch, progress, epoch, elapsed,
                                                   best_state)
                if item is None:  # this worker's shard is used up: join the step with weight 0
                    item = standin
                images, frozen = item
                if cache is not None and not from_cache:
                    frozen = _frozen_features(stage, images, use_amp)
                    cache.add(images, frozen)
                standin = (None if images is None else images[:1],
                           None if frozen is None else {k: v[:1] for k, v in frozen.items()})
                batch = {"image": images}
                if frozen is not None:
                    batch["frozen"] = frozen
                if not from_cache:  # (a cached stage has no augmentation; its batches come shuffled)
                    batch["generators"] = _image_generators(config.seed, index, epoch, io, taken, len(images))
                    taken += local
                if stage.augment is not None:
                    batch = stage.augment(batch, generator)
                ctx = RunnerStepContext(batch=batch, modules=modules, optimizers=specs, extra=extra, epoch=epoch,
                                        step=progress["steps"], generator=generator, use_amp=use_amp,
                                        total_steps=steps_budget,
                                        weight=loss_weight(stage.loss_reduction, local, total, io.world_size))
                with torch.autocast(device_type=io.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    stage.step(ctx)
                progress["steps"] += 1
                epoch_steps += 1
                if by_steps:
                    bar.update(1)
                elif bar_steps and epoch_steps <= per_epoch:
                    bar.update(1, **{**shown, "epoch": f"{epoch + 1}/{epochs}"})
                for key, value in ctx.logged.items():
                    sums[key] = sums.get(key, 0.0) + value * local
                seen += local
            if cache is not None and not cache.ready:
                cache.seal()
            for spec in specs.values():
                if spec.scheduler is not None and spec.interval == "epoch":
                    spec.scheduler.step()
            train_seconds = time.perf_counter() - epoch_start
            metrics = _epoch_metrics(stage, epoch, sums, seen, waited, train_seconds, from_cache, io)
            if epoch == refilled_epoch:
                metrics["cache_refilled_after_restore"] = True
            if stage.validate:
                val = io.val_batches(worker_batch)
                if val is not None:
                    metrics.update(validate(model, val))
            score = metrics.get("val_image_auroc", math.nan)
            keep, improved = _consider(progress, metrics, epoch + 1)
            if keep:
                best_state = _cpu_state(model)
            progress["stale"] = 0 if improved else progress["stale"] + 1
            progress["epoch"] = epoch
            progress["history"].append(metrics)
            elapsed = float(distributed.all_reduce_max(torch.tensor([time.monotonic() - clock["start"]])))
            if not math.isnan(score):
                _record_point(progress, metrics, epoch + 1, elapsed)
            if is_main and config.patience is not None and stage.validate and progress["stale"] >= config.patience:
                stop_reason = "patience"
            if config.max_minutes is not None and elapsed >= 60 * config.max_minutes:
                stop_reason = "time"
            last = stop_reason is not None or (epochs is not None and epoch + 1 >= epochs) or (
                steps_budget is not None and progress["steps"] >= steps_budget)
            progress["stage_done"] = last
            if last and best_state is not None:
                model.load_state_dict(best_state)  # later stages and the saved model use the best epoch
            if last and is_main:
                reason = stop_reason or ("max_steps" if steps_budget is not None and progress["steps"] >= steps_budget
                                         else "max_epochs")
                progress["kept"] = _kept_summary(progress, reason, {
                    "max_minutes": config.max_minutes, "patience": config.patience, "epochs": epochs,
                    "steps": steps_budget})
            metrics.update(best_val_image_auroc=progress["best"], best_epoch=progress["best_epoch"],
                           stopped=stop_reason is not None)
            shown = {k: v for k, v in (("loss", metrics.get("train_loss")), ("val_auroc", score))
                     if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if bar_steps and not by_steps:
                shown["epoch"] = f"{epoch + 1}/{epochs}"
                advance = max(0, (epoch + 1) * per_epoch - bar.n)  # an epoch shorter than counted ends here
            else:
                advance = 0 if by_steps else 1
            bar.update(advance, force=True, **shown)
            _checkpoint(model, io, progress, metrics, specs, None if last else best_state)
            if last:
                break
            epoch += 1
        return stop_reason
    finally:
        bar.close()


# --- pieces -----------------------------------------------------------------------------------------


def _validation_point(model, stage: Optimize, io: WorkerIO, worker_batch: int, progress, epoch: int,
                      elapsed: float, best_state):
    """Validate inside an epoch (--val-every-minutes): a point of the validation curve, and the best model
    so far when it beats the best one (patience still counts whole epochs). Returns the best state."""
    val = io.val_batches(worker_batch)
    if val is None:
        return best_state
    metrics = validate(model, val)
    _record_point(progress, metrics, epoch + 1, elapsed)
    keep, _ = _consider(progress, metrics, epoch + 1)
    if keep:
        best_state = _cpu_state(model)
    model.eval()  # back to training: frozen parts in eval mode, the stage's modules in train mode
    for module in stage.modules.values():
        module.train()
    return best_state


def _on_device(item, device):
    return {k: v.to(device) for k, v in item.items()} if isinstance(item, dict) else item.to(device)


def _images(item) -> torch.Tensor:
    """The images of a training batch (video data comes with its video ids, which Optimize stages ignore)."""
    return item["image"] if isinstance(item, dict) else item


def _wrap_for_ddp(module: torch.nn.Module, io: WorkerIO) -> torch.nn.Module:
    if io.world_size == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    if io.device.type == "cuda":
        # Batch statistics over the global batch, as one process would compute them (GPU only in torch).
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [io.device.index] if io.device.type == "cuda" else None
    # DDP broadcasts rank 0's parameters now, so every worker starts the stage from the same weights.
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def _frozen_features(stage: Optimize, images: torch.Tensor, use_amp: bool):
    with torch.no_grad(), torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=use_amp):
        return stage.frozen_features(images)


def _count(item) -> int:
    images, frozen = item
    return len(images) if images is not None else len(next(iter(frozen.values())))


def _mix(*values: int) -> int:
    """A seed from several integers (seed, rank, stage, epoch), stable across runs and platforms."""
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + int(value) + 7) % (2**62)
    return seed


def _image_generators(seed: int, stage: int, epoch: int, io: WorkerIO, taken: int, count: int
                      ) -> list[torch.Generator]:
    """One generator per image of a streamed batch, seeded by the image's row in the training set rather
    than by the worker: the same image gets the same synthetic anomaly (DRAEM, DSR) on 1 worker or N.
    Rows are dealt round robin (train/ray_train.py deal_rows: row i to worker i mod N, in order), so the
    k-th image this worker streams in an epoch is row rank + N * k. (A stand-in batch of a worker whose
    shard is used up gets the next row's number; its step has weight 0.)"""
    rows = (io.rank + io.world_size * (taken + k) for k in range(count))
    return [torch.Generator(device=io.device).manual_seed(_mix(seed, stage, epoch, row)) for row in rows]


def _epoch_metrics(stage, epoch, sums, seen, waited, train_seconds, from_cache, io) -> dict[str, Any]:
    """The epoch's report: per-step values averaged over every worker's images, throughput, data wait."""
    keys = sorted(sums)
    totals = distributed.all_reduce_sum(torch.tensor([sums[k] for k in keys] + [float(seen)], dtype=torch.float64))
    images = float(totals[-1])
    means = {k: float(totals[i] / max(images, 1)) for i, k in enumerate(keys)}
    train_loss = means.get("loss", sum(v for k, v in means.items() if k.startswith("loss_")))
    return {"stage": stage.name, "epoch": epoch + 1, "train_loss": train_loss, **{f"train_{k}": v for k, v in means.items()
                                                                            if k != "loss"},
            "train_images_per_second": images / train_seconds,
            "train_images_per_second_per_worker": images / train_seconds / io.world_size,
            "train_images": int(images), "from_feature_cache": from_cache,
            "data_wait_fraction": waited / train_seconds}


def _final_report(model, recipe, io: WorkerIO, progress, clock) -> dict[str, Any]:
    model.eval()
    rss = distributed.all_gather_rows(torch.tensor(
        [[resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]], dtype=torch.float64))[:, 0].tolist()
    metrics = {
        "fit_compute_seconds": clock["compute"],
        "worker_peak_rss_mb": rss,
        "world_size": io.world_size,
        "stages": [f"{s.kind}:{s.name}" for s in recipe],
        "final": True,
        **getattr(model, "fit_timings", {}),
    }
    # Only recipes without an Optimize stage must end bitwise equal on every worker (DDP keeps parameters
    # equal, but BatchNorm statistics of a CPU run are each worker's own): only they hash their state,
    # and the driver refuses to save when the digests differ.
    if not any(isinstance(s, Optimize) for s in recipe):
        digests = distributed.all_gather_rows(
            torch.tensor([[int(fitted_state_digest(model)[:15], 16)]], dtype=torch.int64))[:, 0].tolist()
        metrics["worker_digests"] = [f"{d:015x}" for d in digests]
    if hasattr(model, "memory_bank") and isinstance(model.memory_bank, torch.Tensor):
        metrics["memory_bank_rows"] = int(model.memory_bank.shape[0])
    if progress["history"]:
        best = progress.get("main_best") or progress  # a later stage (calibrate, upsampling) starts its own
        metrics.update(best_epoch=best["best_epoch"], best_val_image_auroc=best["best"],
                       epochs=len(progress["history"]))
        metrics.update(progress.get("kept") or {})  # which epoch/step was kept, by what, why training stopped
    directory = None
    if io.rank == 0:
        directory = tempfile.mkdtemp(prefix="raylib_ad_final_")
        write_model_dir(model, Path(directory) / FINAL_MODEL)
        (Path(directory) / PROGRESS).write_text(json.dumps(progress, default=float))
    io.report(metrics, directory)
    return metrics


def _maybe_fail_for_tests(hooks: dict[str, Any], epoch: int, io: WorkerIO, stage: str) -> None:
    """Testing hook: `fail_once_at_epoch` kills rank 1 (or 0 alone) once, early in that epoch of the first
    Optimize stage to reach it (of the stage named `fail_in_stage`, when given), to prove a run resumes
    from its latest checkpoint. A marker file makes it happen only once."""
    marker = hooks.get("fail_marker")
    if hooks.get("fail_once_at_epoch") != epoch or not marker or os.path.exists(marker):
        return
    if hooks.get("fail_in_stage", stage) != stage:
        return
    if io.rank == min(1, io.world_size - 1):
        Path(marker).write_text("failed once")
        # Die a few seconds into the epoch, as a real mid-epoch crash would. Ray Train registers a
        # reported checkpoint when its controller next polls the workers (every 2 s); a worker that
        # dies before that poll takes its last report with it, and the run restarts one epoch earlier.
        time.sleep(hooks.get("fail_after_s", 6.0))
        os._exit(1)  # a hard crash, as a killed worker would look
