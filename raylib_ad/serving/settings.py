"""What the serving application is told: where models come from and the limits on requests. Built from
the `args:` of serve/config.yaml or from `raylib-ad serve` flags; every value is checked here, once, so
a typo fails at deploy time with the key named instead of inside a replica."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from raylib_ad.errors import ConfigError

MiB = 2**20


@dataclass(frozen=True)
class ServeSettings:
    # category -> model directory (absolute after from_dict: replicas do not share the driver's cwd)
    model_dirs: dict[str, str] = field(default_factory=dict)
    registry: bool = False  # also serve `champion` versions from the MLflow registry
    dataset: str | None = None  # registered names are raylib_ad-<dataset>-<category>
    tracking_uri: str | None = None  # resolved on the driver; None -> raylib_ad.tracking default
    device: str = "auto"  # auto -> cuda when the replica has a GPU, else cpu
    max_body_bytes: int = 20 * MiB  # whole request body, multipart included
    max_image_pixels: int = 4096 * 4096  # width x height of one decoded image
    max_files: int = 32  # files in one multipart request
    champion_ttl_s: float = 10.0  # how old a replica's view of "current version" may get
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    torch_threads: int | None = None  # None: what Ray gives the replica (OMP_NUM_THREADS)
    cache_dir: str | None = None  # where registry versions are downloaded; None -> a temp dir

    @classmethod
    def from_dict(cls, args: Mapping[str, Any] | None) -> "ServeSettings":
        args = dict(args or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ConfigError(f"unknown serving setting(s) {unknown}; known: {sorted(known)}")
        model_dirs = args.get("model_dirs") or {}
        if isinstance(model_dirs, (list, tuple)):  # ["widget=/models/widget", ...] as on the CLI
            model_dirs = parse_model_dirs(model_dirs)
        if not isinstance(model_dirs, Mapping):
            raise ConfigError(f"model_dirs must map category -> directory, got {model_dirs!r}")
        args["model_dirs"] = {str(c): str(Path(d).expanduser().resolve()) for c, d in model_dirs.items()}
        for c in args["model_dirs"]:
            _check_category(c, "model_dirs")
        settings = cls(**args)
        settings._check()
        return settings

    def _check(self) -> None:
        if not self.model_dirs and not self.registry:
            raise ConfigError("nothing to serve: give model_dirs (--model-dir CATEGORY=DIR) and/or registry: true")
        if self.registry and not self.dataset:
            raise ConfigError("registry: true needs dataset (--dataset), the <dataset> of raylib_ad-<dataset>-<category>")
        for name in ("max_body_bytes", "max_image_pixels", "max_files", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("champion_ttl_s", "batch_wait_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if self.torch_threads is not None and (not isinstance(self.torch_threads, int) or self.torch_threads < 1):
            raise ConfigError(f"torch_threads must be a positive integer or null, got {self.torch_threads!r}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_category(category: str, where: str) -> None:
    # Categories appear in URL paths and registered model names.
    if not category or "/" in category or "@" in category or category.strip() != category:
        raise ConfigError(f"{where}: category {category!r} must be non-empty, without '/', '@' or spaces at the ends")


def parse_model_dirs(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """["widget=/models/widget", ...] -> {"widget": "/models/widget"}; a repeated category is an error."""
    out: dict[str, str] = {}
    for item in items:
        category, sep, directory = str(item).partition("=")
        if not sep or not category or not directory:
            raise ConfigError(f"--model-dir expects CATEGORY=DIR, got {item!r}")
        if category in out:
            raise ConfigError(f"--model-dir gives category {category!r} twice")
        out[category] = directory
    return out
