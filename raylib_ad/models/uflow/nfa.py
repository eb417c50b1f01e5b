"""U-Flow's unsupervised threshold (Tailanian et al., 2022, "U-Flow: A U-shaped Normalizing Flow for
Anomaly Detection with Unsupervised Threshold"), an a-contrario test on a flow's latent variables.

A normalizing flow trained on normal images maps them to independent standard normals, so each position's
log-likelihood is -0.5 * ||z||^2 + const. Under that null hypothesis a latent value is a "candidate"
(z_c^2 >= tau, with tau the chi-square(1) quantile at `probability_thr`) with probability
1 - probability_thr. Around every position, the candidates in a window (averaged over channels) are
compared with the binomial tail: the probability that normal data shows that many. Multiplied by the
number of tests (positions over all scales), this is the Number of False Alarms (NFA): the expected number
of windows as extreme as this one in a normal image. A position is anomalous when NFA < epsilon, i.e.
when -log10 NFA > -log10 epsilon; epsilon = 1 (threshold 0) means "at most one false alarm per image on
average", a threshold that needs no labelled anomaly.

Everything here is plain torch (no Ray, no scipy): the binomial tail is summed exactly in log space.
As a threshold method beside F1 (postprocess/threshold.py), a model whose maps and scores are -log10 NFA
(U-Flow with anomaly_map_mode="nfa") is thresholded at `nfa_threshold(epsilon)` without any validation
labels: `decide(maps, epsilon)` gives the segmentation and the image decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

NFA_METHOD = "nfa"  # the name of this threshold method beside "f1_max" and "normal_quantile"


def nfa_threshold(epsilon: float = 1.0) -> float:
    """The threshold on -log10 NFA maps and scores: anomalous where NFA < epsilon (expected false alarms
    per image). epsilon = 1 gives 0."""
    if not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and epsilon > 0):
        raise ValueError(f"NFA epsilon must be a number > 0, got {epsilon!r}")
    return -math.log10(float(epsilon))


def candidate_threshold(probability_thr: float) -> float:
    """tau with P(z^2 >= tau) = 1 - probability_thr for z ~ N(0, 1): the chi-square(1) quantile."""
    if not 0.0 < probability_thr < 1.0:
        raise ValueError(f"probability_thr must be in (0, 1), got {probability_thr!r}")
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    return float(normal.icdf(torch.tensor((1.0 + probability_thr) / 2.0, dtype=torch.float64)) ** 2)


def log10_binomial_tail(n: int, p: float, device=None) -> torch.Tensor:
    """(n + 2,) table: entry k = log10 P(X >= k) for X ~ Binomial(n, p), k = 0..n+1 (entry n+1 is -inf)."""
    k = torch.arange(n + 1, dtype=torch.float64, device=device)
    log_pmf = (torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64, device=device)) - torch.lgamma(k + 1)
               - torch.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p))
    tail = torch.logcumsumexp(log_pmf.flip(0), dim=0).flip(0)  # log P(X >= k)
    return torch.cat([tail, tail.new_full((1,), -math.inf)]) / math.log(10)


def binomial_log10_pvalue(z: torch.Tensor, window: float, probability_thr: float) -> torch.Tensor:
    """(B, 1, h, w): log10 of the probability, under the null hypothesis, of at least the observed mean
    number of candidates (per channel) in the window around each position."""
    half = max(int(window // 2), 1)
    side = 2 * half + 1
    z2 = z.detach().double().pow(2)
    # reflect padding needs a map wider than the pad; tiny maps repeat their border instead
    mode = "reflect" if min(z2.shape[-2:]) > half else "replicate"
    candidates = (F.pad(z2, (half,) * 4, mode=mode) >= candidate_threshold(probability_thr)).double()
    counts = F.avg_pool2d(candidates, side, stride=1) * side * side  # per channel, in the window
    mean_count = counts.mean(dim=1, keepdim=True)  # averaged over channels, as the paper's code does
    # P(X > x) for a fractional mean count x is P(X >= floor(x) + 1). When every value in the window is a
    # candidate that probability is 0; it is kept at P(X >= n) so that the map stays finite.
    index = (torch.floor(mean_count + 1e-9).long() + 1).clamp(max=side * side)
    table = log10_binomial_tail(side * side, 1.0 - probability_thr, device=z.device)
    return table[index]


def minus_log10_nfa(latents: Sequence[torch.Tensor], output_size: int | tuple[int, int], *,
                    window_size: int = 7, probability_thr: float = 0.5) -> torch.Tensor:
    """(B, H, W) -log10 NFA from a flow's latents, finest scale first (each (B, C, h, w), N(0, I) on normal
    data): > 0 where fewer than one false alarm per image is expected. The window halves with each scale;
    the per-scale log-probabilities are upsampled (bicubic) and added; the number of tests is the number of
    positions over all scales. Defaults: anomalib's (window 7, probability 0.5); the paper's later code
    uses window 5 and probability 0.9."""
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    log_prob = 0.0
    for scale, z in enumerate(latents):
        per_scale = binomial_log10_pvalue(z, window_size / 2**scale, probability_thr)
        log_prob = log_prob + F.interpolate(per_scale, size=size, mode="bicubic", align_corners=True)
    tests = sum(z.shape[-2] * z.shape[-1] for z in latents)
    return -(math.log10(tests) + log_prob)[:, 0].float()


@dataclass
class NfaDecision:
    mask: torch.Tensor  # (B, H, W) bool: anomalous pixels
    is_anomalous: torch.Tensor  # (B,) bool: images with at least one anomalous pixel
    threshold: float  # on the -log10 NFA scale


def decide(minus_log_nfa: torch.Tensor, epsilon: float = 1.0) -> NfaDecision:
    """Segmentation and image decision from -log10 NFA maps (B, H, W), without labels."""
    threshold = nfa_threshold(epsilon)
    mask = minus_log_nfa > threshold
    return NfaDecision(mask=mask, is_anomalous=mask.flatten(1).any(dim=1), threshold=threshold)
