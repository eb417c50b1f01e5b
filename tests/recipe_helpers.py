"""One optimizer step of a model's (first) Optimize stage, outside the runner's loop: what the DDP and
feature-cache tests compare. Uses the runner's own step context and loss weighting."""

from __future__ import annotations

import torch

from raylib_ad.models.recipe import Optimize, OptimizerSpec
from raylib_ad.train.step_context import RunnerStepContext, loss_weight


def optimize_stage(model) -> Optimize:
    return next(stage for stage in model.recipe() if isinstance(stage, Optimize))


def training_step(module, model, optimizer, images, *, world_size: int = 1, frozen=None,
                  local_count: int | None = None, global_count: int | None = None) -> float:
    """Forward through `module` (the model or its DDP wrapper) with the stage's step function, using
    `optimizer` in place of the stage's own. Returns the loss."""
    stage = optimize_stage(model)
    count = len(images) if images is not None else len(next(iter(frozen.values())))
    local = count if local_count is None else local_count
    total = local * world_size if global_count is None else global_count
    batch = {"image": images, **({"frozen": frozen} if frozen is not None else {})}
    spec = stage.optimizers[0]
    ctx = RunnerStepContext(batch=batch, modules={"model": module},
                            optimizers={spec.name: OptimizerSpec(spec.name, optimizer)}, extra={}, epoch=0, step=0,
                            generator=torch.Generator().manual_seed(0), use_amp=False,
                            weight=loss_weight(stage.loss_reduction, local, total, world_size))
    stage.step(ctx)
    return ctx.logged["loss"]
