"""The exchange folder between the two processes: DIR/<model>/request.pt (written by our side: anomalib's
init arguments, anomalib-keyed weights, the inputs and every random draw) and DIR/<model>/response.pt
(written by the anomalib side: named output tensors, gradients, and notes). Plain torch files of tensors,
strings, numbers, lists and dicts only, loaded with weights_only=True on both sides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

REQUEST = "request.pt"
RESPONSE = "response.pt"


def _save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _plain(obj: Any) -> Any:
    """Detached, contiguous CPU tensors (no views of larger storages, no autograd history)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").contiguous().clone()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def write_request(root: Path, model: str, request: dict[str, Any]) -> Path:
    path = Path(root) / model / REQUEST
    _save(_plain(request), path)
    return path


def read_request(root: Path, model: str) -> dict[str, Any]:
    return torch.load(Path(root) / model / REQUEST, map_location="cpu", weights_only=True)


def write_response(root: Path, model: str, response: dict[str, Any]) -> Path:
    path = Path(root) / model / RESPONSE
    _save(_plain(response), path)
    return path


def read_response(root: Path, model: str) -> dict[str, Any] | None:
    path = Path(root) / model / RESPONSE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
