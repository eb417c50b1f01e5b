"""The MLflow model registry as raylib_ad uses it: one registered model per (dataset, category), named
`raylib_ad-<dataset>-<category>`, whose versions are model directories logged by training runs
(artifact path `model`), and the alias `champion` on the version to serve.

Versions are created from the run's artifact URI directly: MLflow 3's `register_model("runs:/...")`
only accepts its own logged-model format, and a raylib_ad model directory is not one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from raylib_ad.errors import ConfigError
from raylib_ad.tracking.mlflow_run import tracking_uri

CHAMPION = "champion"
PREFIX = "raylib_ad"


def registered_name(dataset: str, category: str) -> str:
    for field, value in (("dataset", dataset), ("category", category)):
        if not value or "/" in value or "@" in value:
            raise ConfigError(f"{field} '{value}' cannot be part of a registered model name")
    return f"{PREFIX}-{dataset}-{category}"


@dataclass(frozen=True)
class Champion:
    name: str
    version: int
    run_id: str | None
    source: str


def _client(uri: str | None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri(), registry_uri=uri or tracking_uri())


def register_champion(run_id: str, dataset: str, category: str, *, uri: str | None = None,
                      artifact_path: str = "model", tags: dict[str, str] | None = None) -> int:
    """Register the run's model directory as a new version and point `champion` at it. Earlier
    versions stay registered (an alias moves; nothing is deleted). Returns the new version number."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    name = registered_name(dataset, category)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"dataset": dataset, "category": category})
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return int(version.version)


def get_champion(dataset: str, category: str, *, uri: str | None = None) -> Champion | None:
    """The version carrying the `champion` alias, or None when the category has none."""
    from mlflow.exceptions import MlflowException

    name = registered_name(dataset, category)
    try:
        version = _client(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return Champion(name, int(version.version), version.run_id, version.source)


def list_champions(*, uri: str | None = None, dataset: str | None = None) -> list[Champion]:
    """Every raylib_ad registered model with a champion, optionally for one dataset."""
    client = _client(uri)
    prefix = f"{PREFIX}-{dataset}-" if dataset else f"{PREFIX}-"
    champions = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
        aliases = getattr(model, "aliases", None) or {}
        if CHAMPION in aliases:
            version = client.get_model_version(model.name, str(aliases[CHAMPION]))
            champions.append(Champion(model.name, int(version.version), version.run_id, version.source))
    return sorted(champions, key=lambda c: c.name)


def download_champion(dataset: str, category: str, dst: str | os.PathLike, *,
                      uri: str | None = None) -> tuple[Path, Champion]:
    """Download the champion's model directory into `dst` (created); returns (directory, champion)."""
    import mlflow.artifacts

    champion = get_champion(dataset, category, uri=uri)
    if champion is None:
        raise ConfigError(f"no '{CHAMPION}' version of {registered_name(dataset, category)} in the registry at "
                          f"{uri or tracking_uri()}")
    Path(dst).mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(artifact_uri=champion.source, dst_path=str(dst),
                                               tracking_uri=uri or tracking_uri())
    return Path(path), champion
