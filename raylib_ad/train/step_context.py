"""What a recipe's step function sees (models/recipe.py StepContext), and how a worker's loss is weighted
so that N DDP workers take exactly the optimizer step one process takes on the global batch. No Ray here.

DDP averages gradients over workers. With a loss that is a mean over the worker's batch, the average of
N worker means equals the global-batch mean only when every worker holds the same number of images; the
last batch of an epoch, or shards of unequal length (every image is used once, so shards may differ by
one), break that. Each worker therefore scales its loss by local_count * N / global_count. A loss that
sums over the batch (STFPM) is scaled by N. A worker with no image left in a step still has to join
DDP's all-reduce: it runs the step on a stand-in batch with weight 0.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from raylib_ad.models.recipe import OptimizerSpec


def loss_weight(reduction: str, local_count: int, global_count: int, world_size: int) -> float:
    """The factor a worker's loss is multiplied by before backward (see the module docstring)."""
    if local_count == 0:
        return 0.0
    if reduction == "sum":
        return float(world_size)
    return local_count * world_size / global_count


class RunnerStepContext:
    """One step's view of the stage: the batch, the (DDP-wrapped) modules, the optimizers, the streams."""

    def __init__(self, *, batch: dict[str, Any], modules: dict[str, torch.nn.Module],
                 optimizers: dict[str, OptimizerSpec], extra: dict[str, Iterator[torch.Tensor]], epoch: int,
                 step: int, generator: torch.Generator, weight: float, use_amp: bool,
                 total_steps: int | None = None):
        self.batch = batch
        self.modules = modules
        self.extra = extra
        self.epoch = epoch
        self.step = step
        self.total_steps = total_steps  # the stage's resolved step budget (None: epochs only)
        self.generator = generator
        self.weight = weight
        self._optimizers = optimizers
        self._use_amp = use_amp
        self.logged: dict[str, float] = {}

    def optimize(self, optimizer: str, loss: torch.Tensor, *, retain_graph: bool = False) -> float:
        try:
            spec = self._optimizers[optimizer]
        except KeyError:
            raise KeyError(f"step asked for optimizer '{optimizer}'; the stage has {sorted(self._optimizers)}") from None
        spec.optimizer.zero_grad(set_to_none=True)
        # Backward outside autocast (the forward ran inside it on GPU), in float32.
        with torch.autocast(device_type=loss.device.type, enabled=False):
            (loss.float() * self.weight).backward(retain_graph=retain_graph)
        if spec.clip_grad_norm:
            params = [p for group in spec.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, spec.clip_grad_norm)
        spec.optimizer.step()
        if spec.scheduler is not None and spec.interval == "step":
            spec.scheduler.step()
        value = float(loss.detach())
        self.logged.setdefault(f"loss_{optimizer}" if len(self._optimizers) > 1 else "loss", value)
        return value

    def log(self, **values: float) -> None:
        for key, value in values.items():
            self.logged[key] = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
