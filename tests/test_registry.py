"""The MLflow registry convention shared by sweeps (which register champions) and Serve (which loads them)."""

import json

import pytest

from raylib_ad.errors import ConfigError
from raylib_ad.tracking.registry import (download_champion, get_champion, list_champions, register_champion,
                                         registered_name)


def _logged_run(uri, tmp_path, marker: str) -> str:
    import mlflow

    model_dir = tmp_path / f"model_{marker}"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"marker": marker}))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    return run.info.run_id


def test_champion_alias_moves_and_earlier_versions_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert get_champion("synthetic", "widget", uri=uri) is None
    first = register_champion(_logged_run(uri, tmp_path, "a"), "synthetic", "widget", uri=uri)
    second = register_champion(_logged_run(uri, tmp_path, "b"), "synthetic", "widget", uri=uri)
    register_champion(_logged_run(uri, tmp_path, "c"), "synthetic", "gadget", uri=uri)
    assert (first, second) == (1, 2)
    assert get_champion("synthetic", "widget", uri=uri).version == 2
    directory, champion = download_champion("synthetic", "widget", tmp_path / "dl", uri=uri)
    assert json.loads((directory / "config.json").read_text()) == {"marker": "b"}
    assert [c.name for c in list_champions(uri=uri)] == ["raylib_ad-synthetic-gadget", "raylib_ad-synthetic-widget"]
    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri=uri).search_model_versions("name='raylib_ad-synthetic-widget'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_names_refuse_separators():
    assert registered_name("mvtec", "bottle") == "raylib_ad-mvtec-bottle"
    with pytest.raises(ConfigError, match="category 'a/b'"):
        registered_name("mvtec", "a/b")
