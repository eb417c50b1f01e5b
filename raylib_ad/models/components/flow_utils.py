"""Small Ray-free helpers shared by the flow and hypersphere models (C-Flow, CS-Flow, U-Flow, CFA):
setting checks, feature-map geometry checks that fail at construction with a message naming the
backbone, the layers and what the model needs, and seeded construction of randomly initialised parts."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ...errors import ConfigError
from .feature_extractor import feature_layers


def is_int(value: Any, low: int = -math.inf, high: float = math.inf) -> bool:
    """An integer (not a bool) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_number(value: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False) -> bool:
    """A real number (not a bool or a string) in [low, high], or (low, high] when low_open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (low < value if low_open else low <= value) and value <= high


def check_layers(model: str, backbone: str | None, layers: Sequence[str] | None, need: str) -> None:
    """Before any module is built: the requested layers exist on the backbone, else a ConfigError that
    names the backbone, the layers, the backbone's feature layers and what `model` needs."""
    if backbone is None or not layers:
        return
    from .feature_extractor import module_layer

    names, strides = feature_layers(backbone)  # ConfigError for an unknown backbone
    unknown = []
    for layer in layers:
        if layer not in names:
            try:
                module_layer(backbone, layer)  # any module of the net, e.g. blocks.5.8, is a layer too
            except ConfigError:
                unknown.append(layer)
    if unknown:
        available = ", ".join(f"{n} (stride {s})" for n, s in zip(names, strides))
        raise ConfigError(f"{model}: layers {unknown} are not feature layers of backbone '{backbone}' "
                          f"(available: {available}) nor modules of it (e.g. 'blocks.5.8'); {model} needs {need}")


def feature_side(image_size: int, stride: int) -> int:
    """Side of a convolutional feature map of a square input (strided convs with padding round up)."""
    return math.ceil(image_size / stride)


def geometry_error(model: str, backbone: str, layers: Sequence[str], image_size: int, found: str,
                   need: str) -> ConfigError:
    return ConfigError(f"{model}: backbone '{backbone}' with layers {list(layers)} at image_size {image_size} "
                       f"gives {found}; {model} needs {need}")


def full_precision(like: torch.Tensor):
    """Autocast off on `like`'s device: for sums of squares and log-likelihoods that bf16 would ruin
    (the runner trains under bf16 autocast on GPU)."""
    return torch.autocast(device_type=like.device.type, enabled=False)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build randomly initialised parts from `seed` alone, so every DDP worker (and a reload) starts
    identical, without touching the caller's random state. FrEIA's AllInOneBlock draws its channel
    permutation from numpy's global generator, so that one is seeded and restored too."""
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        np.random.set_state(numpy_state)
