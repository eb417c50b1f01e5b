"""Which model serves a category, and the slot that holds it in a replica.

`Catalog` answers "what is the current version of category C" (a model directory's content fingerprint,
or the registry version carrying the `champion` alias) and fetches it. `ModelSlot` holds one loaded
category and swaps in a new version when the catalog says the current one moved: checked at most every
`champion_ttl_s`, or at once on `refresh(force=True)` (the reload endpoint). The old model keeps
serving while the new one loads, and keeps serving if the new one fails to load. No Ray in here: the
app caches slots with `serve.multiplexed`, keyed by category.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raylib_ad.errors import ConfigError
from raylib_ad.serving.errors import ModelUnavailable, ServingError, UnknownCategory
from raylib_ad.serving.settings import ServeSettings

log = logging.getLogger("raylib_ad.serving")


@dataclass(frozen=True)
class ModelInfo:
    category: str
    source: str  # "model_dir" or "registry"
    name: str  # the registered model name, or the model directory's name (dir_name): never a server path
    version: int | str  # the registry version, or a fingerprint of the directory's files
    location: str  # the directory, or the version's artifact URI

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}


# Names `raylib-ad train` and `export` give a model directory inside its run folder: alone they say
# nothing, so the run folder's name comes with them (runs/demo/model -> "demo/model").
GENERIC_DIR_NAMES = ("model", "export", "model_onnx", "model_openvino")


def dir_name(directory: str | os.PathLike) -> str:
    """The public name of a served model directory: its own name (with its parent's for the generic
    names above), not the absolute path, which would tell every client the server's file layout."""
    path = Path(directory)
    if path.name in GENERIC_DIR_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def dir_fingerprint(directory: Path) -> str:
    """Changes whenever the directory is rewritten (write_model_dir renames a new one into place)."""
    digest = hashlib.sha1()
    # the files of a model directory, then those of an exported one (raylib-ad export)
    for file in ("config.json", "stats.json", "weights.safetensors", "export.json", "model.onnx", "model.bin"):
        try:
            st = (directory / file).stat()
        except OSError:
            digest.update(f"{file}:missing".encode())
            continue
        digest.update(f"{file}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
    return digest.hexdigest()[:12]


class Catalog:
    """Model directories first, then (with `registry`) the champions of `dataset` in the MLflow registry."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.cache_dir = Path(settings.cache_dir or tempfile.mkdtemp(prefix="raylib_ad_serve_"))

    @property
    def _uri(self) -> str:
        from raylib_ad.tracking.mlflow_run import tracking_uri

        return self.settings.tracking_uri or tracking_uri()

    def current(self, category: str) -> ModelInfo:
        directory = self.settings.model_dirs.get(category)
        if directory is not None:
            return ModelInfo(category, "model_dir", dir_name(directory), dir_fingerprint(Path(directory)), directory)
        if not self.settings.registry:
            raise UnknownCategory(f"category {category!r} is not served; served categories: "
                                  f"{sorted(self.settings.model_dirs)}")
        from raylib_ad.tracking.registry import CHAMPION, get_champion, registered_name

        try:
            name = registered_name(self.settings.dataset, category)
        except ConfigError as err:
            raise UnknownCategory(f"category {category!r} is not served: {err}") from None
        try:
            champion = get_champion(self.settings.dataset, category, uri=self._uri)
        except Exception as err:  # an unreachable or broken registry is the server's problem, not the client's
            raise ModelUnavailable(f"the MLflow registry at {self._uri} cannot be read: {type(err).__name__}: {err}") from None
        if champion is None:
            raise UnknownCategory(f"category {category!r} is not served: {name} has no '{CHAMPION}' version in the "
                                  f"registry and no model directory was given for it")
        return ModelInfo(category, "registry", champion.name, champion.version, champion.source)

    def require(self, category: str) -> ModelInfo:
        """current(), with an unknown category logged at INFO: it is the client's 404, not a server fault
        (checked before the replica's model cache, which logs every failed load at ERROR)."""
        try:
            return self.current(category)
        except UnknownCategory as err:
            log.info("404 for category %r: %s", category, err.message)
            raise

    def list(self) -> list[ModelInfo]:
        infos = [self.current(c) for c in sorted(self.settings.model_dirs)]
        if self.settings.registry:
            from raylib_ad.tracking.registry import list_champions

            prefix = f"raylib_ad-{self.settings.dataset}-"
            try:
                champions = list_champions(uri=self._uri, dataset=self.settings.dataset)
            except Exception as err:
                raise ModelUnavailable(f"the MLflow registry at {self._uri} cannot be read: {type(err).__name__}: {err}") from None
            for c in champions:
                category = c.name[len(prefix):]
                if category not in self.settings.model_dirs:  # a model directory overrides the registry
                    infos.append(ModelInfo(category, "registry", c.name, c.version, c.source))
        return infos

    def fetch(self, info: ModelInfo) -> Path:
        """A local directory holding exactly this version (the artifact URI, not the alias: the alias may
        have moved again since `current`)."""
        if info.source == "model_dir":
            return Path(info.location)
        target = self.cache_dir / info.name / f"v{info.version}"
        if (target / "config.json").is_file():
            return target
        import mlflow.artifacts

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{info.version}.", dir=target.parent))
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.location, dst_path=str(tmp),
                                                            tracking_uri=self._uri))
            shutil.rmtree(target, ignore_errors=True)  # a leftover without config.json
            os.replace(path, target)  # the artifact folder itself, not tmp/model
        except Exception as err:
            raise ModelUnavailable(f"{info.name} version {info.version} cannot be downloaded from {info.location}: "
                                   f"{type(err).__name__}: {err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def forget_others(self, info: ModelInfo) -> None:
        """Delete downloaded versions of this model other than `info`'s (the slot no longer uses them)."""
        if info.source != "registry":
            return
        for old in (self.cache_dir / info.name).glob("v*"):
            if old.name != f"v{info.version}":
                shutil.rmtree(old, ignore_errors=True)


def resolve_device(device: str) -> str:
    try:
        import torch
    except ImportError:  # a server without torch serves exported models (onnxruntime / openvino) on the CPU
        return "cpu" if device == "auto" else device

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_trained(info: ModelInfo, directory: Path, device: str):
    try:
        if (Path(directory) / "export.json").is_file():  # exported: ExportedModel, without importing torch
            from raylib_ad.export.runtime import ExportedModel

            return ExportedModel(directory, device=device)
        from raylib_ad.artifact import load

        return load(directory, device=device)
    except Exception as err:  # whatever breaks a model directory, the caller answers 503 with the reason
        log.warning("category %s: %s (%s) failed to load: %s: %s", info.category, info.name, directory,
                    type(err).__name__, err)  # the server's log keeps the path; the answer names the model
        reason = str(err).replace(str(directory), info.name)
        raise ModelUnavailable(f"the model for category {info.category!r} ({info.name}, version {info.version}) "
                               f"failed to load: {reason}") from None


class ModelSlot:
    """One category's loaded model in one replica."""

    def __init__(self, category: str, catalog: Catalog, device: str = "cpu", ttl_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.category, self.catalog, self.device, self.ttl_s, self.clock = category, catalog, device, ttl_s, clock
        self._state: tuple[Any, ModelInfo] | None = None  # (TrainedModel, ModelInfo), swapped as one reference
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self.last_error: str | None = None

    @classmethod
    def open(cls, category: str, catalog: Catalog, device: str = "cpu", ttl_s: float = 10.0) -> "ModelSlot":
        slot = cls(category, catalog, device, ttl_s)
        slot.refresh(force=True)
        return slot

    def snapshot(self) -> tuple[Any, ModelInfo]:
        if self._state is None:
            raise ModelUnavailable(f"no model is loaded for category {self.category!r}: {self.last_error}")
        return self._state

    @property
    def info(self) -> ModelInfo | None:
        return None if self._state is None else self._state[1]

    def is_fresh(self) -> bool:
        return self._state is not None and self.clock() - self._checked < self.ttl_s

    def refresh(self, force: bool = False) -> bool:
        """Swap in the current version if it moved; True if it did. Without `force` this checks at most
        every ttl_s, and a failed check or load keeps the served model (logged, kept in last_error); with
        `force` it checks now and raises the failure."""
        if not force and self.is_fresh():
            return False
        with self._lock:  # one check at a time; requests arriving meanwhile keep using the current model
            if not force and self.is_fresh():
                return False
            try:
                info = self.catalog.current(self.category)
                old = self.info
                changed = old is None or (info.version, info.location) != (old.version, old.location)
                if changed:
                    trained = load_trained(info, self.catalog.fetch(info), self.device)
                    self._state = (trained, info)
                    self.catalog.forget_others(info)
                    log.info("category %s now serves %s version %s", self.category, info.name, info.version)
                self._checked, self.last_error = self.clock(), None
                return changed
            except ServingError as err:
                self.last_error = err.message
                if force or self._state is None:
                    raise
                self._checked = self.clock()  # retry after ttl_s, not on every request
                log.warning("category %s keeps serving %s version %s: %s", self.category, self.info.name,
                            self.info.version, err.message)
                return False
