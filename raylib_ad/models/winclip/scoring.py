"""WinCLIP's scoring arithmetic (paper eq. 1-4, anomalib's utils.py), as plain tensor functions.

Sliding windows are written as index rows: `window_indices(grid, k)` is (n_windows, k*k), the patch
indices (row-major) each k x k window covers, windows ordered row-major by their top-left patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_indices(grid: tuple[int, int], kernel: int, stride: int = 1) -> torch.Tensor:
    """(n_windows, kernel*kernel) patch indices of every kernel x kernel window on a (h, w) patch grid."""
    height, width = grid
    if kernel < 1 or kernel > min(height, width):
        raise ValueError(f"window size {kernel} does not fit the {height}x{width} patch grid")
    patches = torch.arange(height * width).view(height, width)
    windows = patches.unfold(0, kernel, stride).unfold(1, kernel, stride)  # (nh, nw, k, k)
    return windows.reshape(-1, kernel * kernel)


def cosine_similarity(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(..., N, D) x (M, D) -> (..., N, M) cosine similarities."""
    return F.normalize(embeddings, dim=-1) @ F.normalize(references, dim=-1).transpose(-2, -1)


def class_scores(embeddings: torch.Tensor, text_embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probability of the anomalous class: softmax over (normal, anomalous) of cosine / temperature."""
    return (cosine_similarity(embeddings, text_embeddings) / temperature).softmax(dim=-1)[..., 1]


def harmonic_aggregation(window_scores: torch.Tensor, windows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, n_windows) window scores -> (B, h, w): each patch takes the harmonic mean of the windows
    covering it. A zero window score makes its patches 0 (anomalib: 1/0 -> inf -> mean 0); a patch no
    window covers gets 0."""
    n_patches = grid[0] * grid[1]
    cover = torch.zeros(windows.shape[0], n_patches, dtype=torch.bool, device=windows.device)
    # A tensor source, not the scalar True: the ONNX exporter (TorchScript) has no scatter_ with a bool value.
    cover.scatter_(1, windows, torch.ones_like(windows, dtype=torch.bool))
    inverse = torch.where(cover.unsqueeze(0), 1.0 / window_scores.unsqueeze(-1), 0.0).sum(dim=1)  # (B, P)
    counts = cover.sum(dim=0).to(window_scores.dtype)
    patch_scores = (counts / inverse).nan_to_num(nan=0.0, posinf=0.0)
    return patch_scores.view(-1, *grid)


def visual_association(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, N, D) against a (M, D) memory -> (B, N): half the cosine distance to the nearest memory row."""
    return (1.0 - cosine_similarity(embeddings, memory)).amin(dim=-1) / 2
