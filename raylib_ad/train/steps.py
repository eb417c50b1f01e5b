"""One optimization step, shared by the Ray Train loop and the DDP tests (no Ray here)."""

from __future__ import annotations

import torch

from raylib_ad.models import AnomalyModel


def training_step(
    module: torch.nn.Module,
    model: AnomalyModel,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor | None,
    *,
    world_size: int = 1,
    use_amp: bool = False,
    frozen: dict[str, torch.Tensor] | None = None,
) -> float:
    """Forward through `module` (the model, or its DDP wrapper), backward, clip, step. Returns the loss.

    `frozen`: the model's frozen_features() for these images, when the loop has them cached (then
    `images` may be None for models that do not need them). bf16 autocast on GPU only: CPUs without
    native bf16 run it slower than float32.
    """
    device = images.device if images is not None else next(iter(frozen.values())).device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
        loss = (module(images) if frozen is None else module(images, frozen=frozen))["loss"]
    scaled = loss * world_size if model.loss_reduction == "sum" else loss
    optimizer.zero_grad(set_to_none=True)
    scaled.backward()
    if model.gradient_clip_val:
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.gradient_clip_val)
    optimizer.step()
    return float(loss.detach())
