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


# --- any registered version by URI: models:/<name>@<alias>, models:/<name>/<version> -------------------

MODELS_SCHEME = "models:/"
LATEST = "latest"


def is_registry_uri(value) -> bool:
    return isinstance(value, str) and value.startswith(MODELS_SCHEME)


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of a registered model; `alias` is the alias it was asked for by, if any."""

    name: str
    version: int
    run_id: str | None
    source: str
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"{MODELS_SCHEME}{self.name}/{self.version}"


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` or `models:/name/latest` ->
    (name, None, "3" / "latest"). Anything else is a ConfigError saying both accepted forms."""
    body = model_uri[len(MODELS_SCHEME):] if is_registry_uri(model_uri) else ""
    name, alias, version = body, None, None
    if "@" in body:
        name, _, alias = body.partition("@")
    elif "/" in body:
        name, _, version = body.partition("/")
    valid_version = version is not None and (version.isdigit() or version == LATEST)
    if not name or "/" in name or not (alias or valid_version):
        raise ConfigError(f"model URI {model_uri!r} is invalid: expected models:/<name>@<alias> or "
                          f"models:/<name>/<version>")
    return name, alias, version


def resolve_model_uri(model_uri: str, *, uri: str | None = None) -> RegisteredVersion:
    """The version a models:/ URI names right now (an alias is looked up, not cached: it may move)."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(model_uri)
    client = _client(uri)
    try:
        if alias is not None:
            found = client.get_model_version_by_alias(name, alias)
        elif version == LATEST:
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise MlflowException(f"{name} has no versions")
            found = max(versions, key=lambda v: int(v.version))
        else:
            found = client.get_model_version(name, version)
    except MlflowException as err:
        raise ConfigError(f"{model_uri} is not in the registry at {uri or tracking_uri()}: "
                          f"{str(err).splitlines()[0]}") from None
    return RegisteredVersion(name, int(found.version), found.run_id, found.source, alias)


def model_cache_dir(uri: str | None = None) -> Path:
    """Where downloaded versions are kept: $RAYLIB_AD_CACHE/registry/<store>/ (default ~/.cache/raylib_ad),
    one folder per tracking store so that two stores' `name/1` never share a folder."""
    import hashlib

    root = Path(os.environ.get("RAYLIB_AD_CACHE", Path.home() / ".cache" / "raylib_ad"))
    store = hashlib.sha1((uri or tracking_uri()).encode()).hexdigest()[:12]
    return root / "registry" / store


def version_dir(version: RegisteredVersion, *, uri: str | None = None, cache_dir: str | os.PathLike | None = None
                ) -> Path:
    """The cache folder of one version (a registered version never changes, so it is downloaded once)."""
    return Path(cache_dir or model_cache_dir(uri)) / version.name / f"v{version.version}"


def download_model_version(model_uri: str, *, uri: str | None = None, cache_dir: str | os.PathLike | None = None
                           ) -> tuple[Path, RegisteredVersion]:
    """The model directory of the version `model_uri` names, downloaded into the cache unless it is there
    already; returns (directory, version). Treat the directory as read-only: it IS that version."""
    import shutil
    import tempfile

    import mlflow.artifacts

    version = resolve_model_uri(model_uri, uri=uri)
    target = version_dir(version, uri=uri, cache_dir=cache_dir)
    if (target / "config.json").is_file():
        return target, version
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version.version}.", dir=target.parent))
    try:
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp),
                                                            tracking_uri=uri or tracking_uri()))
        except Exception as err:
            raise ConfigError(f"{version.uri} cannot be downloaded from {version.source}: "
                              f"{type(err).__name__}: {err}") from None
        if not (path / "config.json").is_file():
            raise ConfigError(f"{version.uri} ({version.source}) is not a raylib_ad model directory: "
                              "config.json is missing")
        shutil.rmtree(target, ignore_errors=True)  # a leftover without config.json
        try:
            os.replace(path, target)
        except OSError:  # a concurrent download of the same version got there first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, version


def register_version(run_id: str, name: str, *, uri: str | None = None, artifact_path: str = "model",
                     alias: str | None = None, tags: dict[str, str] | None = None) -> int:
    """Register the run's model directory as a new version of the existing model `name`; move `alias`
    to it when given. Returns the new version number."""
    client = _client(uri)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or {})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)
