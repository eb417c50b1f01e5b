"""DSR's discrete latent model: a two-level VQ-VAE (VQ-VAE-2 style) with codebooks for a coarse ("top",
"lo", stride 8) and a fine ("bottom", "hi", stride 4) feature map, and a general appearance decoder.

Module and tensor names follow anomalib's dsr/torch_model.py (DiscreteLatentModel), so the ImageNet
model anomalib downloads (vq_model_pretrained_128_4096.pckl, a state dict of that module) loads here
unchanged. anomalib only ever loads that file; the codebook training (exponential moving averages,
commitment loss, data-initialized codebooks, restarts of unused codes) is our addition, used when no such
file is given (see model.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed


class Residual(nn.Module):
    """x + conv1x1(relu(conv3x3(x))), computed on relu(x).

    The ReLU is applied to x before the skip connection too: the original code (and anomalib's) starts
    the block with an in-place ReLU, which rewrites x itself before `x + block(x)` reads it; the pretrained
    weights were trained that way. Written out here instead of relying on the in-place side effect."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self._block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.ReLU(),
                                    nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return x + self._block(x)


class ResidualStack(nn.Module):
    def __init__(self, channels: int, num_layers: int, hidden: int):
        super().__init__()
        self._layers = nn.ModuleList(Residual(channels, hidden) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._layers:
            x = layer(x)
        return F.relu(x)


class VectorQuantizer(nn.Module):
    """Nearest-code quantization with a straight-through gradient. `_ema_cluster_size` and `_ema_w` are
    the moving averages of code usage and of the vectors assigned to each code (anomalib keeps them only
    so that the pretrained file loads; here they also drive codebook training)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self._embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.normal_(self._embedding.weight)
        self._embedding.weight.requires_grad_(False)  # moved by the moving averages, not by gradients
        self.register_buffer("_ema_cluster_size", torch.ones(num_embeddings))
        self._ema_w = nn.Parameter(self._embedding.weight.detach().clone(), requires_grad=False)

    @property
    def codebook(self) -> torch.Tensor:
        return self._embedding.weight

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w) index of the nearest code (squared Euclidean distance)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        codebook = self.codebook.float()
        # |z|^2 is the same for every code of a row: argmin needs only |e|^2 - 2 z.e
        distances = torch.addmm((codebook * codebook).sum(1)[None], flat, codebook.t(), alpha=-2)
        return distances.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantize(z)[0]

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized with a straight-through gradient to z, indices)."""
        index = self.indices(z)
        quantized = F.embedding(index, self.codebook).permute(0, 3, 1, 2).to(z.dtype)
        return z + (quantized - z).detach(), index

    @torch.no_grad()
    def initialize_from(self, z: torch.Tensor, generator: torch.Generator) -> None:
        """Codebook := randomly chosen vectors of z (rank 0's, on every worker): every code starts where
        the data is, instead of where a normal draw put it."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        pick = torch.randint(len(flat), (self.codebook.shape[0],), generator=generator, device=generator.device)
        chosen = distributed.broadcast(flat[pick.to(flat.device)])
        self.codebook.copy_(chosen)
        self._ema_w.copy_(chosen)
        self._ema_cluster_size.fill_(1.0)

    @torch.no_grad()
    def ema_update(self, z: torch.Tensor, index: torch.Tensor, generator: torch.Generator, *, decay: float = 0.99,
                   eps: float = 1e-5, restart_below: float = 0.03) -> None:
        """One moving-average step over every worker's batch (counts and sums are all-reduced, so all
        workers keep the same codebook), then codes whose usage fell below `restart_below` restart at
        random vectors of the batch (Dhariwal et al. 2020, "Jukebox")."""
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        index = index.reshape(-1)
        num_codes = self.codebook.shape[0]
        counts = torch.bincount(index, minlength=num_codes).float()
        sums = torch.zeros_like(self._ema_w).index_add_(0, index, flat)
        counts, sums = distributed.all_reduce_sum(counts), distributed.all_reduce_sum(sums)
        self._ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        total = self._ema_cluster_size.sum()
        # Laplace smoothing keeps a code that lost all its vectors from dividing by zero.
        smoothed = (self._ema_cluster_size + eps) / (total + num_codes * eps) * total
        self._ema_w.mul_(decay).add_(sums, alpha=1 - decay)
        self.codebook.copy_(self._ema_w / smoothed[:, None])
        dead = (self._ema_cluster_size < restart_below).nonzero().flatten()
        if len(dead):
            pick = torch.randint(len(flat), (len(dead),), generator=generator, device=generator.device)
            fresh = distributed.broadcast(flat[pick.to(flat.device)])
            self.codebook[dead] = fresh
            self._ema_w[dead] = fresh
            self._ema_cluster_size[dead] = 1.0


class EncoderBot(nn.Module):
    """Image -> stride-4 features (two stride-2 4x4 convs, a 3x3 conv, a residual stack)."""

    def __init__(self, in_channels: int, hiddens: int, res_layers: int, res_hiddens: int):
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, hiddens // 2, 4, stride=2, padding=1)
        self._conv_2 = nn.Conv2d(hiddens // 2, hiddens, 4, stride=2, padding=1)
        self._conv_3 = nn.Conv2d(hiddens, hiddens, 3, padding=1)
        self._residual_stack = ResidualStack(hiddens, res_layers, res_hiddens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self._conv_2(F.relu(self._conv_1(x))))
        return self._residual_stack(self._conv_3(x))


class EncoderTop(nn.Module):
    """Stride-4 features -> stride-8 features."""

    def __init__(self, in_channels: int, hiddens: int, res_layers: int, res_hiddens: int):
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, hiddens, 4, stride=2, padding=1)
        self._conv_2 = nn.Conv2d(hiddens, hiddens, 3, padding=1)
        self._residual_stack = ResidualStack(hiddens, res_layers, res_hiddens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual_stack(F.relu(self._conv_2(F.relu(self._conv_1(x)))))


class DecoderBot(nn.Module):
    """General appearance decoder: [upsampled top codes, bottom codes] (stride 4) -> image."""

    def __init__(self, in_channels: int, hiddens: int, res_layers: int, res_hiddens: int, out_channels: int = 3):
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, hiddens, 3, padding=1)
        self._residual_stack = ResidualStack(hiddens, res_layers, res_hiddens)
        self._conv_trans_1 = nn.ConvTranspose2d(hiddens, hiddens // 2, 4, stride=2, padding=1)
        self._conv_trans_2 = nn.ConvTranspose2d(hiddens // 2, out_channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual_stack(self._conv_1(x))
        return self._conv_trans_2(F.relu(self._conv_trans_1(x)))


class DiscreteLatentModel(nn.Module):
    def __init__(self, num_hiddens: int = 128, num_residual_layers: int = 2, num_residual_hiddens: int = 64,
                 num_embeddings: int = 4096, embedding_dim: int = 128):
        super().__init__()
        args = (num_hiddens, num_residual_layers, num_residual_hiddens)
        self._encoder_b = EncoderBot(3, *args)
        self._encoder_t = EncoderTop(num_hiddens, *args)
        self._pre_vq_conv_top = nn.Conv2d(num_hiddens, embedding_dim, 1)
        self._pre_vq_conv_bot = nn.Conv2d(num_hiddens + embedding_dim, embedding_dim, 1)
        self._vq_vae_top = VectorQuantizer(num_embeddings, embedding_dim)
        self._vq_vae_bot = VectorQuantizer(num_embeddings, embedding_dim)
        self._decoder_b = DecoderBot(2 * embedding_dim, *args)
        self.upsample_t = nn.ConvTranspose2d(embedding_dim, embedding_dim, 4, stride=2, padding=1)

    @property
    def vq_top(self) -> VectorQuantizer:
        return self._vq_vae_top

    @property
    def vq_bot(self) -> VectorQuantizer:
        return self._vq_vae_bot

    def upsample_top(self, codes: torch.Tensor, *, frozen: bool = False) -> torch.Tensor:
        """Top codes (stride 8) -> stride 4. `frozen`: gradients reach the input but not these weights
        (DSR's second phase trains what feeds this layer, never the layer)."""
        if not frozen:
            return self.upsample_t(codes)
        layer = self.upsample_t
        return F.conv_transpose2d(codes, layer.weight.detach(), layer.bias.detach(), stride=2, padding=1)

    def bottom_features(self, enc_b: torch.Tensor, top_codes: torch.Tensor) -> torch.Tensor:
        """F_hi: the stride-4 encoder output joined with the upsampled top codes, projected to code space."""
        return self._pre_vq_conv_bot(torch.cat((enc_b, self.upsample_t(top_codes)), dim=1))

    def decode(self, top_codes: torch.Tensor, bottom_codes: torch.Tensor) -> torch.Tensor:
        return self._decoder_b(torch.cat((self.upsample_t(top_codes), bottom_codes), dim=1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode, quantize both levels, decode. Also returns the unquantized features and code indices
        (for the codebook training)."""
        enc_b = self._encoder_b(images)
        z_top = self._pre_vq_conv_top(self._encoder_t(enc_b))
        q_top, index_top = self._vq_vae_top.quantize(z_top)
        z_bot = self.bottom_features(enc_b, q_top)
        q_bot, index_bot = self._vq_vae_bot.quantize(z_bot)
        return {"recon_image": self.decode(q_top, q_bot), "quantized_t": q_top, "quantized_b": q_bot,
                "enc_b": enc_b, "z_top": z_top, "z_bot": z_bot, "index_top": index_top, "index_bot": index_bot}
