"""Weights files published at a URL (torchvision's detection models, anomalib's release assets), found
locally before anything is downloaded:

1. an explicit file (``weights=PATH`` or a setting naming one),
2. ``$RAYLIB_AD_WEIGHTS_DIR/<file name>`` (the name at the end of the URL),
3. torch's hub cache (``$TORCH_HOME/hub/checkpoints/<file name>``, where torchvision downloads land),
4. a download into that cache, unless $RAYLIB_AD_OFFLINE is set or the host does not answer.

Otherwise a WeightsUnavailableError names the ways out. For timm backbones see weights.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from ...errors import WeightsUnavailableError


def file_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def hub_cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name(url)


def resolve_url_weights(what: str, url: str, explicit: str | None = None, *, how: str = "") -> Path:
    """A local file with the weights at `url` ('what' names them in messages; 'how' adds a way out)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file for {what} not found: {path}")
        return path
    name = file_name(url)
    env_dir = os.environ.get("RAYLIB_AD_WEIGHTS_DIR")
    if env_dir and (Path(env_dir) / name).is_file():
        return Path(env_dir) / name
    cached = hub_cache_path(url)
    if cached.is_file():
        return cached
    if _may_download(url):
        torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu")
        if cached.is_file():
            return cached
    lines = [f"weights for {what} are not available: no local copy of {name} was found and {url} cannot be "
             f"downloaded (offline, or $RAYLIB_AD_OFFLINE is set). Ways out:",
             f"  - download {url} elsewhere and pass it: --weights PATH (or the setting that names this file);",
             f"  - put it at $RAYLIB_AD_WEIGHTS_DIR/{name};",
             f"  - or at {cached} (torch's hub cache);"]
    if how:
        lines.append(f"  - {how};")
    lines.append("  - serve or evaluate a model directory written earlier: it holds these weights.")
    raise WeightsUnavailableError("\n".join(lines))


def _may_download(url: str, timeout: float = 1.5) -> bool:
    if os.environ.get("RAYLIB_AD_OFFLINE", "") not in ("", "0"):
        return False
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
