"""Training recipes: a model declares HOW it is trained as an ordered list of stages; one runner
(raylib_ad/train/runner.py) executes any recipe, in Ray Train workers or in one process.

Stages:
- `Collect`: one pass over the worker's training shard without gradients, then a reduction across
  workers through raylib_ad.distributed (memory banks, CFA's memory, EfficientAD's channel statistics,
  few-shot references). Its function receives an iterator of image batches.
- `Optimize`: trainable modules (each wrapped in DDP by the runner), optimizers with schedulers stepped
  per step or per epoch, a step function that may use several optimizers, a budget in epochs and/or
  steps, an optional per-batch augmentation on the worker's device, optional extra image streams
  (EfficientAD's penalty images), and a cacheable frozen part (used only when inputs are not augmented).
- `Calibrate`: like Collect, but after the last Optimize stage, on the best model (statistics on normal
  images, e.g. EfficientAD's quantiles).

A model with no stages is zero-shot: the runner writes its model directory without a pass over data.
Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

# "image": (B, 3, H, W) normalized; "generators": one torch.Generator per image, seeded by the image's row in
# the training set, the stage and the epoch (not by the worker: an image gets the same random draws on 1
# worker or N; absent on batches replayed from the frozen-feature cache); an augmentation may add fields.
Batch = dict[str, Any]


@dataclass
class Collect:
    """A pass over the worker's shard, then a reduction across workers.

    `run(batches, progress)` consumes an iterator of (B, 3, H, W) image tensors already on the model's
    device and must end with every worker holding the same result (reduce through raylib_ad.distributed).
    """

    name: str
    run: Callable[[Iterable[torch.Tensor], bool], None]
    kind: str = field(default="collect", init=False)


@dataclass
class Calibrate(Collect):
    """A pass over the normal training images after training, on the best model (no gradients)."""

    kind: str = field(default="calibrate", init=False)


@dataclass
class OptimizerSpec:
    """One optimizer of a stage. `interval` says when `scheduler.step()` is called: after every optimizer
    step ("step") or after every epoch ("epoch"). `clip_grad_norm` clips that optimizer's parameters."""

    name: str
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    interval: str = "epoch"
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.interval not in ("step", "epoch"):
            raise ValueError(f"optimizer {self.name}: interval must be 'step' or 'epoch', got {self.interval!r}")


@dataclass
class ExtraStream:
    """Images other than the training set, drawn at every step (EfficientAD's penalty images).
    The worker decodes them itself (same size and normalization as the training images) and cycles
    through them in a seeded order; a step reads `next(ctx.extra[name])`."""

    name: str
    paths: list[str]
    batch_size: int = 1


class StepContext(Protocol):
    """What a step function sees (implemented by raylib_ad/train/runner.py)."""

    batch: Batch  # this worker's batch: "image", "frozen" when the frozen part is cached, augmentation fields
    modules: dict[str, nn.Module]  # the stage's trainable modules, DDP-wrapped when distributed
    extra: dict[str, Iterator[torch.Tensor]]  # extra streams by name
    epoch: int
    step: int  # optimizer steps taken in this stage so far (the step function's call count)
    total_steps: int | None  # the stage's step budget after --max-steps (None: an epoch budget only)
    generator: torch.Generator  # seeded per worker and epoch; per-image draws: batch["generators"]

    def optimize(self, optimizer: str, loss: torch.Tensor, *, retain_graph: bool = False) -> float:
        """zero_grad, backward (weighted so that N workers take the step one process takes on the global
        batch), clip, step, and step the scheduler if it runs per step. Returns the unweighted loss."""

    def log(self, **values: float) -> None:
        """Per-step values averaged into the epoch's report (e.g. generator and discriminator loss)."""


def default_step(ctx: StepContext) -> None:
    """One loss, one optimizer: the module's train-mode forward returns {"loss": ...}."""
    images, frozen = ctx.batch["image"], ctx.batch.get("frozen")
    module = ctx.modules["model"]
    out = module(images) if frozen is None else module(images, frozen=frozen)
    ctx.optimize("main", out["loss"])


@dataclass
class Optimize:
    """Gradient training of `modules`. The budget is `epochs` (passes over the shard) and/or `steps`
    (optimizer steps of the step function); the first reached ends the stage. `--max-epochs` on the
    command line replaces the budget of the stage marked `main` (the last Optimize stage by default)."""

    name: str
    modules: dict[str, nn.Module]
    optimizers: list[OptimizerSpec]
    step: Callable[[StepContext], None] = default_step
    epochs: int | None = None
    steps: int | None = None
    # "mean" when the step's losses average over the batch; "sum" when they add up over it (STFPM). The
    # runner weights each worker's loss so that DDP's gradient average equals the global-batch gradient.
    loss_reduction: str = "mean"
    # Per-batch augmentation on the worker's device: (batch, generator) -> batch. `generator` is seeded per
    # worker; draw from batch["generators"] (one per image) for what must not depend on the worker.
    augment: Callable[[Batch, torch.Generator], Batch] | None = None
    extra_streams: list[ExtraStream] = field(default_factory=list)
    # The output of a frozen part for a batch of images, or None. When the inputs are not augmented it
    # never changes, so the runner computes it once per image, caches it, and hands it to the step as
    # batch["frozen"] from the second epoch on (and also on the first, computed on the fly).
    frozen_features: Callable[[torch.Tensor], dict[str, torch.Tensor] | None] | None = None
    # Whether the step still needs the images once it has the frozen features (STFPM's student does).
    needs_images_with_frozen: bool = True
    # Validate (image/pixel AUROC) after every epoch, keep the best epoch's model, stop early on --patience.
    validate: bool = True
    main: bool = False

    kind: str = field(default="optimize", init=False)

    def __post_init__(self) -> None:
        if self.epochs is None and self.steps is None:
            raise ValueError(f"stage {self.name}: give a budget in epochs or steps")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"stage {self.name}: loss_reduction must be 'mean' or 'sum'")
        names = [spec.name for spec in self.optimizers]
        if len(set(names)) != len(names):
            raise ValueError(f"stage {self.name}: optimizer names must be unique, got {names}")

    @property
    def caches_frozen(self) -> bool:
        return self.frozen_features is not None and self.augment is None


Stage = Collect | Optimize


def main_stage(recipe: list[Stage]) -> Optimize | None:
    """The Optimize stage that --max-epochs / --max-steps govern: the one marked main, else the last."""
    optimize = [s for s in recipe if isinstance(s, Optimize)]
    marked = [s for s in optimize if s.main]
    if len(marked) > 1:
        raise ValueError(f"recipe marks {len(marked)} stages as main; at most one may be")
    return marked[0] if marked else (optimize[-1] if optimize else None)


def describe(recipe: list[Stage]) -> str:
    """'collect:features -> optimize:train(10 epochs) -> calibrate:quantiles' for logs and docs."""
    parts = []
    for stage in recipe:
        if isinstance(stage, Optimize):
            budget = ", ".join(x for x in (f"{stage.epochs} epochs" if stage.epochs else "",
                                           f"{stage.steps} steps" if stage.steps else "") if x)
            parts.append(f"optimize:{stage.name}({budget})")
        else:
            parts.append(f"{stage.kind}:{stage.name}")
    return " -> ".join(parts) or "(zero-shot: no stages)"
