"""DSR's anomalies in code space (anomalib DiscreteLatentModel.generate_fake_anomalies_joined and the
anomaly branch of its forward), drawn from a torch.Generator.

Inside the (max-pooled) mask, each position's code is replaced by a random code among its k nearest,
excluding the nearest 5% of the codebook (too similar to be an anomaly), with k = strength * codebook
size and strength ~ U(latent_anomaly_strength, 1) per image. Per image, the anomaly goes into the top
level (and the bottom codes recomputed from it are disturbed too), or into one level only; the target
mask is the mask pooled to the disturbed level's resolution.

`generator`: one for the batch, or a list with one per image (the runner's batch["generators"]): then
every draw for an image comes from its own generator, whatever worker or batch the image is in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .latent import DiscreteLatentModel

NEAREST_EXCLUDED = 0.05


def _rand(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _per_image(batch: int, shape: tuple[int, ...], generator, device) -> torch.Tensor:
    """(batch, *shape) uniforms: from one generator, or row i from generator[i]."""
    if isinstance(generator, torch.Generator):
        return _rand((batch, *shape), generator, device)
    return torch.cat([_rand((1, *shape), g, device) for g in generator])


def _of_image(generator, k: int) -> torch.Generator:
    return generator if isinstance(generator, torch.Generator) else generator[k]


def replace_codes(features: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor,
                  strength: torch.Tensor, generator) -> torch.Tensor:
    """codes (B, D, h, w) with the positions under `mask` (B, 1, H, W) replaced by far-but-not-too-far
    codes of `codebook` (K, D), chosen by distance to `features` (the unquantized vectors)."""
    batch, dim, height, width = codes.shape
    num_codes = codebook.shape[0]
    small = F.max_pool2d(mask.float(), (mask.shape[2] // height, mask.shape[3] // width))
    replaced = codes.clone()
    codebook = codebook.float()
    norms = (codebook * codebook).sum(1)
    for k in small.flatten(1).any(1).nonzero().flatten().tolist():  # images without an anomaly keep their codes
        flat = features[k].permute(1, 2, 0).reshape(-1, dim).float()
        distances = torch.addmm(norms[None], flat, codebook.t(), alpha=-2)  # + |z|^2: same order per row
        top = max(1, min(int(float(strength[k]) * num_codes) + 1, num_codes - 1))
        skip = min(int(num_codes * NEAREST_EXCLUDED), top - 1)
        # Uniform over the codes ranked skip .. top-1 by distance (anomalib: a random column of
        # topk(top)[:, skip:]); by thresholds and a random score instead of sorting every row.
        upper = distances.kthvalue(top, dim=1, keepdim=True).values
        band = distances <= upper
        if skip > 0:
            band &= distances > distances.kthvalue(skip, dim=1, keepdim=True).values
        score = _rand(distances.shape, _of_image(generator, k), distances.device).masked_fill_(~band, -1.0)
        chosen = codebook[score.argmax(1)].view(height, width, dim).permute(2, 0, 1)
        replaced[k] = torch.where(small[k] > 0, chosen.to(codes.dtype), codes[k])
    return replaced


def _pooled_back(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The mask at a latent level's resolution, brought back to image size (blocks, as anomalib)."""
    factor = (mask.shape[2] // size[0], mask.shape[3] // size[1])
    return F.interpolate(F.max_pool2d(mask.float(), factor), scale_factor=factor, mode="nearest")


@torch.no_grad()
def latent_anomalies(model: DiscreteLatentModel, images: torch.Tensor, mask: torch.Tensor, min_strength: float,
                     generator) -> dict[str, torch.Tensor]:
    """Returns the clean codes (quantized_t, quantized_b), the disturbed ones (anomaly_top, anomaly_bot),
    the general decoder's image of the disturbed codes (recon_image) and the target mask (anomaly_mask)."""
    batch, device = images.shape[0], images.device
    clean = model(images)
    q_top, q_bot = clean["quantized_t"], clean["quantized_b"]
    strength_lo = _per_image(batch, (), generator, device) * (1 - min_strength) + min_strength
    strength_hi = _per_image(batch, (), generator, device) * (1 - min_strength) + min_strength
    # Both levels: disturb the top codes, recompute the bottom features from them, disturb those too.
    top_both = replace_codes(clean["z_top"], q_top, model.vq_top.codebook, mask, strength_lo, generator)
    z_bot_both = model.bottom_features(clean["enc_b"], top_both)
    bot_both = replace_codes(z_bot_both, model.vq_bot(z_bot_both), model.vq_bot.codebook, mask, strength_hi,
                             generator)
    # Bottom level only: disturb the clean bottom codes.
    bot_only = replace_codes(clean["z_bot"], q_bot, model.vq_bot.codebook, mask, strength_hi, generator)

    def coin() -> torch.Tensor:
        return (_per_image(batch, (1, 1, 1), generator, device) < 0.5).to(q_top.dtype)

    use_both, use_lo = coin(), coin()
    use_hi = 1 - use_lo
    # Not both: top only (disturbed top, clean bottom) or bottom only (clean top, disturbed bottom).
    anomaly_top = use_both * top_both + (1 - use_both) * (use_lo * top_both + use_hi * q_top)
    anomaly_bot = use_both * bot_both + (1 - use_both) * (use_lo * q_bot + use_hi * bot_only)
    mask_lo = _pooled_back(mask, q_top.shape[-2:])
    mask_hi = _pooled_back(mask, q_bot.shape[-2:])
    anomaly_mask = use_both * mask_lo + (1 - use_both) * (use_lo * mask_lo + use_hi * mask_hi)
    return {"quantized_t": q_top, "quantized_b": q_bot, "anomaly_top": anomaly_top, "anomaly_bot": anomaly_bot,
            "recon_image": model.decode(anomaly_top, anomaly_bot), "anomaly_mask": anomaly_mask}
