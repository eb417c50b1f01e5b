"""A worker's training shard, kept in memory after the first epoch together with the output of the
model's frozen part (no Ray here).

Why: the training images are not augmented and the pretrained part of STFPM, Reverse Distillation and
FastFlow is frozen, so every epoch after the first would decode the same images again and push them
through the same frozen network for the same result. On 2 CPU cores that is a third of STFPM's step
and all of the decode work. From epoch 2 on, the loop draws shuffled batches from this cache instead of
the Ray Data stream. A shard larger than the memory budget is not cached: the loop then streams (and
recomputes) every epoch, exactly as before.
"""

from __future__ import annotations

from typing import Iterator

import torch

Frozen = dict[str, torch.Tensor]


class FrozenFeatureCache:
    def __init__(self, budget_bytes: int, keep_images: bool = True):
        self.budget_bytes = int(budget_bytes)
        self.keep_images = keep_images
        self._images: list[torch.Tensor] = []
        self._frozen: list[Frozen] = []
        self.nbytes = 0
        self.overflowed = False
        self.images: torch.Tensor | None = None
        self.frozen: Frozen | None = None

    @property
    def ready(self) -> bool:
        """True once a whole epoch was added within the budget and `seal()` was called."""
        return self.frozen is not None

    def add(self, images: torch.Tensor, frozen: Frozen) -> None:
        """Keep one streamed batch. Past the budget, drop everything: a partial cache is useless."""
        if self.overflowed:
            return
        size = sum(t.numel() * t.element_size() for t in frozen.values())
        if self.keep_images:
            size += images.numel() * images.element_size()
        if self.nbytes + size > self.budget_bytes:
            self.overflowed = True
            self._images, self._frozen, self.nbytes = [], [], 0
            return
        self.nbytes += size
        self._frozen.append({k: v.detach() for k, v in frozen.items()})
        if self.keep_images:
            self._images.append(images.detach())

    def seal(self) -> None:
        """End of the first epoch: one tensor per field, so later epochs can draw any permutation."""
        if self.overflowed or not self._frozen:
            return
        self.frozen = {k: torch.cat([f[k] for f in self._frozen]) for k in self._frozen[0]}
        self.images = torch.cat(self._images) if self.keep_images else None
        self._images, self._frozen = [], []

    def __len__(self) -> int:
        return 0 if self.frozen is None else len(next(iter(self.frozen.values())))

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor | None, Frozen]]:
        """Shuffled batches (the same count as the streamed epoch: ceil(len / batch_size))."""
        assert self.frozen is not None, "seal() the cache after the first epoch"
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size].to(next(iter(self.frozen.values())).device)
            images = None if self.images is None else self.images.index_select(0, index)
            yield images, {k: v.index_select(0, index) for k, v in self.frozen.items()}
