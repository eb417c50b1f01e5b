"""GANomaly's DCGAN-style networks, laid out as anomalib builds them (torch_model.py there).

anomalib builds every network for the configured image size S and zero-pads each input batch to the
next power of two P >= S before it enters them. The encoder's depth follows S (one stride-2 block per
halving of S // 2 while it is above 4), the first convolution pads by 4 (not DCGAN's 1), and the
latent code must come out 1 x 1 with the decoder growing it back to exactly P. That holds for S in
[5P/8, P], i.e. 20..32, 40..64, 80..128, 160..256, ...; `supported_image_size` says which sizes work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1); exact where anomalib's float log2 is only close."""
    return 1 << (int(n) - 1).bit_length()


def pad_nextpow2(images: torch.Tensor) -> torch.Tensor:
    """Zero-pad (B, C, H, W) to a square of the next power of two of max(H, W), centred; an odd
    remainder goes to the top / left (anomalib's pad_nextpow2). Zero is the mean colour after
    normalization."""
    side = next_pow2(max(images.shape[-2:]))
    dh, dw = side - images.shape[-2], side - images.shape[-1]
    if dh == 0 and dw == 0:
        return images
    return F.pad(images, [math.ceil(dw / 2), dw // 2, math.ceil(dh / 2), dh // 2])


def _pyramid_blocks(size: int) -> int:
    """Stride-2 blocks anomalib stacks for image size `size`: halvings of size // 2 while above 4."""
    blocks, dim = 0, size // 2
    while dim > 4:
        blocks, dim = blocks + 1, dim // 2
    return blocks


def supported_image_size(size: int) -> bool:
    """Whether anomalib's networks built for `size` turn the padded input into a 1 x 1 code and decode
    it back to the padded size (otherwise anomalib would fail on shapes, or score h*w values per image)."""
    if size < 2:
        return False
    padded, blocks = next_pow2(size), _pyramid_blocks(size)
    side = (padded + 2 * 4 - 4) // 2 + 1  # first conv: kernel 4, stride 2, padding 4
    for _ in range(blocks):
        side = (side + 2 - 4) // 2 + 1  # kernel 4, stride 2, padding 1
    decoded = 4 * 2**blocks * 2  # 4 x 4 from the 1 x 1 code, doubled per block and by the last layer
    return side - 3 == 1 and decoded == padded and size // 2 >= 4


def supported_sizes_near(size: int) -> list[int]:
    """The closest supported sizes below and above `size` (for error messages)."""
    below = next((s for s in range(size - 1, 1, -1) if supported_image_size(s)), None)
    above = next(s for s in range(max(size + 1, 2), 4 * size + 64) if supported_image_size(s))
    return [s for s in (below, above) if s is not None]


class Encoder(nn.Module):
    """Image -> (B, latent_vec_size, 1, 1): a conv, `extra_layers` 3x3 blocks, a pyramid of stride-2
    blocks doubling the width, and (add_final_conv_layer) a 4x4 conv to the code."""

    def __init__(self, image_size: int, latent_vec_size: int, channels: int, n_features: int,
                 extra_layers: int = 0, add_final_conv_layer: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, n_features, 4, stride=2, padding=4, bias=False),
                                   nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(extra_layers):
            layers += [nn.Conv2d(n_features, n_features, 3, stride=1, padding=1, bias=False),
                       nn.BatchNorm2d(n_features), nn.LeakyReLU(0.2, inplace=True)]
        width = n_features
        for _ in range(_pyramid_blocks(image_size)):
            layers += [nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        self.features = nn.Sequential(*layers)
        self.out_channels = width
        self.final = (nn.Conv2d(width, latent_vec_size, 4, stride=1, padding=0, bias=False)
                      if add_final_conv_layer else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.features(images)
        return out if self.final is None else self.final(out)


class Decoder(nn.Module):
    """(B, latent_vec_size, 1, 1) -> image in [-1, 1] (tanh): transposed convs halving the width."""

    def __init__(self, image_size: int, latent_vec_size: int, channels: int, n_features: int,
                 extra_layers: int = 0):
        super().__init__()
        # anomalib's starting width: n_features * 2 ** (ceil(log2(S // 2)) - 2).
        width = n_features * 2 ** ((image_size // 2 - 1).bit_length() - 2)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_vec_size, width, 4, stride=1, padding=0, bias=False),
                                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for _ in range(_pyramid_blocks(image_size)):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)]
            width //= 2
        for _ in range(extra_layers):
            layers += [nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1, bias=False), nn.Tanh()]
        self.layers = nn.Sequential(*layers)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.layers(code)


class Generator(nn.Module):
    """Encoder -> decoder -> encoder: (fake image, code of the input, code of the fake)."""

    def __init__(self, image_size: int, latent_vec_size: int, channels: int, n_features: int,
                 extra_layers: int = 0, add_final_conv_layer: bool = True):
        super().__init__()
        args = (image_size, latent_vec_size, channels, n_features, extra_layers)
        self.encoder1 = Encoder(*args, add_final_conv_layer)
        self.decoder = Decoder(*args)
        self.encoder2 = Encoder(*args, add_final_conv_layer)

    def forward(self, padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent_i = self.encoder1(padded)
        fake = self.decoder(latent_i)
        return fake, latent_i, self.encoder2(fake)


class Discriminator(nn.Module):
    """The encoder's layers with a one-channel code: features = all but the last conv; the last conv
    plus a sigmoid is the real/fake probability, one per image."""

    def __init__(self, image_size: int, channels: int, n_features: int, extra_layers: int = 0):
        super().__init__()
        encoder = Encoder(image_size, 1, channels, n_features, extra_layers, add_final_conv_layer=True)
        self.features = encoder.features
        self.classifier = nn.Sequential(encoder.final, nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return self.classifier(features).flatten(), features
