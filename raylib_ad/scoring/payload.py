"""A model directory as bytes, so it can travel through Ray's object store to actors on any node (a path
on the driver's disk means nothing on another machine), and back into a loaded model there."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from raylib_ad.errors import DataError

Payload = dict[str, bytes]  # path relative to the model directory -> file contents


def directory_payload(directory: str | os.PathLike) -> Payload:
    """Every file of a model directory (any format artifact.load reads: subfolders included)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"model directory {directory} does not exist")
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
             if p.is_file() and not p.name.startswith(".")}
    if not files:
        raise DataError(f"model directory {directory} is empty")
    return files


def model_payload(model, stats: dict | None = None) -> Payload:
    """An in-memory AnomalyModel, serialized exactly as write_model_dir stores it."""
    from raylib_ad.artifact import write_model_dir

    with tempfile.TemporaryDirectory(prefix="raylib_ad-payload-") as tmp:
        return directory_payload(write_model_dir(model, Path(tmp) / "model", stats))


def payload_digest(payload: Payload) -> str:
    """Identifies the model (weights, config and stats): a resumed run refuses parts of another model."""
    digest = hashlib.sha256()
    for name in sorted(payload):
        digest.update(name.encode() + b"\0" + str(len(payload[name])).encode() + b"\0")
        digest.update(payload[name])
    return digest.hexdigest()[:16]


def load_payload(payload: Payload, device: str = "cpu"):
    """Write the files to a private temporary directory and load them with raylib_ad.artifact.load (so
    whatever formats load() knows, this knows). The directory lives as long as the returned model: a
    backend may keep reading its files."""
    from raylib_ad.artifact import load

    tmp = Path(tempfile.mkdtemp(prefix="raylib_ad-replica-"))
    try:
        for name, data in payload.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        model = load(tmp, device=device)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, str(tmp), True)
    return model
