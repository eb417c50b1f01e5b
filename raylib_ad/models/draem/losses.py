"""Losses shared by the reconstruction models (DRAEM, DSR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Softmax focal loss (Lin et al., 2017) with equal class weights, averaged over pixels:
    mean(-(1 - p_t)^gamma * log p_t) for (B, C, H, W) logits and (B, H, W) integer labels.

    This is the loss of the original DRAEM and DSR code (their FocalLoss with alpha=None, gamma=2) and of
    anomalib's kornia FocalLoss(alpha=1) as kornia computed it when anomalib adopted it. kornia >= 0.7
    reads alpha as the weight of the foreground classes and 1 - alpha as the background's, so alpha=1
    there gives normal pixels no loss at all (and its reduced path divides by the class count): written
    out here so the result does not depend on the kornia version."""
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target.long()[:, None])[:, 0]
    return -((1 - log_p.exp()).pow(gamma) * log_p).mean()
