"""Where EfficientAD's teacher comes from: a file, or a distillation from a pretrained timm backbone.

Teacher files, in order of preference (only when the model is built with pretrained=True):
1. `weights=PATH` (CLI --weights) or the setting `teacher=PATH`;
2. anomalib's teacher (a PDN distilled from WideResNet-101 on ImageNet), the default:
   $RAYLIB_AD_WEIGHTS_DIR/efficientad_pretrained_weights/pretrained_teacher_{small,medium}.pth (the file
   names of anomalib's download) if there, else from the asset cache, downloaded from anomalib's address
   when absent (raylib_ad/assets.py, asset "efficientad_teacher");
3. with `self_distilled_teacher=true` (or a `distill_dir`), none: the recipe starts with a distillation
   stage (model.py), a teacher that is not the published one.
With pretrained=False (read_model, tests) no file is read: a loaded model's teacher comes from its
weights.safetensors, and a model trained that way distills from a randomly initialised backbone.

Accepted formats: a torch state dict (.pth/.pt, anomalib's files) or a safetensors file with the PDN's
keys (conv1.weight, conv1.bias, ...) as `save_teacher` writes it, or a raylib_ad model directory
(its weights.safetensors: the keys under "teacher." are taken).

The distillation target follows the original EfficientAD pretraining script: backbone features of the
image at twice the PDN's input size, at strides 8 and 16 ("layer2", "layer3"), each position described
by its 3 x 3 neighbourhood, each layer averaged to 1024 values, both together to the teacher's channel
count (PatchCore's adaptive average pooling). Those poolings are linear, so they are folded into one
fixed (out_channels, 9 * sum C) matrix applied as a 1 x 1 convolution: the same numbers, a fraction of
the memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, WeightsUnavailableError
from ..base import default_layers_for
from ..components.feature_extractor import FeatureExtractor
from ..components.weights import read_state_dict

ANOMALIB_WEIGHTS_FOLDER = "efficientad_pretrained_weights"
TEACHER_FORMAT = "raylib_ad.efficient_ad.teacher/1"
TEACHER_ASSET = "efficientad_teacher"  # raylib_ad/assets.py


def _teacher_file(model_size: str) -> str:
    return f"pretrained_teacher_{model_size}.pth"


def local_anomalib_teacher(model_size: str) -> Path | None:
    """anomalib's teacher file under $RAYLIB_AD_WEIGHTS_DIR or in the asset cache, without downloading."""
    from ...assets import cached_path

    root = os.environ.get("RAYLIB_AD_WEIGHTS_DIR")
    candidates = [Path(root) / ANOMALIB_WEIGHTS_FOLDER] if root else []
    cached = cached_path(TEACHER_ASSET)
    if cached is not None:
        candidates.append(cached)
    for folder in candidates:
        if (folder / _teacher_file(model_size)).is_file():
            return folder / _teacher_file(model_size)
    return None


def anomalib_teacher_path(model_size: str) -> Path:
    """anomalib's teacher file: found locally, else downloaded into the asset cache from anomalib's address
    (AssetUnavailableError offline, naming the file, the address and self_distilled_teacher=true)."""
    from ...assets import fetch_asset

    local = local_anomalib_teacher(model_size)
    if local is not None:
        return local
    path = fetch_asset(TEACHER_ASSET) / _teacher_file(model_size)
    if not path.is_file():
        raise WeightsUnavailableError(f"EfficientAD teacher: {path.parent} (anomalib's download) holds no "
                                      f"{path.name}")
    return path


def read_teacher_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A PDN state dict from a .pth/.pt/.safetensors file or a raylib_ad model directory."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.is_dir():
        weights = path / "weights.safetensors"
        if not weights.is_file():
            raise WeightsUnavailableError(f"EfficientAD teacher: {path} is a folder without weights.safetensors")
        state = {k[len("teacher."):]: v for k, v in load_file(str(weights)).items() if k.startswith("teacher.")}
        if not state:
            raise WeightsUnavailableError(f"EfficientAD teacher: {weights} holds no 'teacher.' tensors")
        return state
    if not path.is_file():
        raise WeightsUnavailableError(f"EfficientAD teacher file not found: {path}")
    return read_state_dict(path)


def load_teacher(teacher: nn.Module, path: str | os.PathLike, model_size: str) -> None:
    state = read_teacher_state(path)
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"EfficientAD teacher file {path} does not fit a {model_size} PDN with "
                          f"{_out_channels(teacher)} output channels "
                          f"(check model_size and teacher_out_channels): {err}") from err


def _out_channels(teacher: nn.Module) -> int:
    last = [m for m in teacher.modules() if isinstance(m, nn.Conv2d)][-1]
    return int(last.out_channels)


def save_teacher(teacher: nn.Module, path: str | os.PathLike, model_size: str) -> Path:
    """The teacher's state dict as safetensors (keys conv1.weight, ...; metadata: format, model_size,
    out_channels), loadable with `teacher=PATH`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": TEACHER_FORMAT, "model_size": model_size,
                                            "out_channels": str(_out_channels(teacher))})
    return path


def list_images(folder: str, setting: str) -> list[str]:
    """Image files under `folder` (recursive, sorted), or a ConfigError naming the setting."""
    from ...data.layouts import IMAGE_EXTENSIONS

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"efficient_ad: setting {setting}={folder!r} is not a folder")
    paths = sorted(str(p) for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))
    if not paths:
        raise ConfigError(f"efficient_ad: setting {setting}={folder!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                          f"in that folder")
    return paths


class DistillationTarget(nn.Module):
    """Frozen backbone features the teacher learns to reproduce: (B, out_channels, S/4, S/4) for
    images (B, 3, S, S) in [0, 1]. The images arrive decoded at S (training images or the distill
    stream) and are upsampled to 2S; the original decodes ImageNet at 512 px for the backbone."""

    def __init__(self, backbone: str, out_channels: int, pretrained: bool = True):
        super().__init__()
        self.layers = default_layers_for(backbone, ("layer2", "layer3"))
        self.extractor = FeatureExtractor(backbone, self.layers, pretrained=pretrained)
        self.register_buffer("mean", torch.tensor(self.extractor.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.extractor.std).view(1, 3, 1, 1))
        dims = [9 * self.extractor.channels[layer] for layer in self.layers]
        self.register_buffer("projection", pooling_matrix(dims, out_channels))  # (out, sum dims)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, scale_factor=2.0, mode="bilinear", align_corners=False)
        features = self.extractor((x - self.mean) / self.std)
        maps, size = [], None
        for layer in self.layers:
            f = features[layer].float()
            h, w = f.shape[-2:]
            patches = F.unfold(f, kernel_size=3, padding=1).view(f.shape[0], -1, h, w)
            if size is None:
                size = (h, w)
            elif (h, w) != size:
                patches = F.interpolate(patches, size=size, mode="bilinear", align_corners=False)
            maps.append(patches)
        return torch.einsum("oc,bchw->bohw", self.projection, torch.cat(maps, dim=1))


def pooling_matrix(dims: list[int], out_channels: int, per_layer: int = 1024) -> torch.Tensor:
    """The linear map of PatchCore's two adaptive average poolings (each layer's vector to `per_layer`
    values, their concatenation to `out_channels`), found by pooling identity matrices."""
    blocks = []
    for dim in dims:
        eye = torch.eye(dim, dtype=torch.float64).unsqueeze(1)  # (dim, 1, dim): row i is e_i
        blocks.append(F.adaptive_avg_pool1d(eye, per_layer).squeeze(1).T)  # (per_layer, dim)
    first = torch.block_diag(*blocks)  # (len(dims) * per_layer, sum dims)
    second = F.adaptive_avg_pool1d(torch.eye(first.shape[0], dtype=torch.float64).unsqueeze(1),
                                   out_channels).squeeze(1).T  # (out, len(dims) * per_layer)
    return (second @ first).float()
