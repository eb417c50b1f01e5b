"""Every registered model, tiny and offline, through the same checks: a valid recipe, one fit through the
stage runner, the output contract, a model-directory round trip with equal scores, a declared search
space the sweep accepts, and unknown settings refused. A new model is tested here without editing a list."""

from __future__ import annotations

import pytest
import torch

from raylib_ad.artifact import read_model, write_model_dir
from raylib_ad.errors import ConfigError
from raylib_ad.models import create_model, list_models, model_class
from raylib_ad.models.recipe import Collect, Optimize, describe
from raylib_ad.train.in_process import fit_in_process

SIZE = 64
# The package's models (a test module may register its own test-only models in the same registry).
ZOO = [name for name in list_models() if model_class(name).__module__.startswith("raylib_ad.")]


def tiny_kwargs(name: str) -> dict:
    cls = model_class(name)
    base = {"pretrained": False, "image_size": SIZE}
    if cls.default_backbone is not None:
        base["backbone"] = "resnet18"
    return {**base, **cls.test_preset}


def images(n: int, seed: int, clip_length: int | None = None) -> torch.Tensor:
    """Images (n, 3, S, S), or for a video model clips (n, T, 3, S, S) of T frames."""
    shape = (n, 3, SIZE, SIZE) if clip_length is None else (n, clip_length, 3, SIZE, SIZE)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.fixture(scope="module", params=ZOO)
def fitted(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    model = create_model(name, **tiny_kwargs(name))
    clips = model_class(name).clip_length
    val = {"image": images(4, 2, clips), "label": torch.tensor([0, 0, 1, 1]), "mask": torch.zeros(4, SIZE, SIZE)}
    fit = fit_in_process(model, images(6, 1, clips), val, batch_size=2, max_epochs=1, max_steps=2)
    directory = write_model_dir(model, tmp_path_factory.mktemp(name) / "model")
    return name, model, fit, directory


def test_recipe_is_a_list_of_known_stages(fitted):
    name, model, _, _ = fitted
    recipe = model.recipe()
    assert all(isinstance(stage, (Collect, Optimize)) for stage in recipe), describe(recipe)
    if model_class(name).trains_by_gradient():
        assert any(isinstance(stage, Optimize) for stage in recipe)


def test_fit_and_output_contract(fitted):
    name, model, fit, _ = fitted
    assert fit.metrics["final"] and fit.model_dir is not None and fit.model_dir.is_dir()
    if model_class(name).trains_by_gradient():
        assert fit.history and all(h["train_images"] > 0 for h in fit.history)
    model.eval()
    with torch.no_grad():
        out = model(images(3, 5, model.clip_length))
    assert out.score.shape == (3,) and torch.isfinite(out.score).all()
    if model.produces_maps:
        assert out.anomaly_map.shape == (3, SIZE, SIZE) and torch.isfinite(out.anomaly_map).all()
    else:
        assert out.anomaly_map is None


def test_model_directory_round_trip_gives_equal_scores(fitted):
    _, model, fit, directory = fitted
    batch = images(2, 7, model.clip_length)
    with torch.no_grad():
        expected = model.eval()(batch).score
        for path in (directory, fit.model_dir):
            torch.testing.assert_close(read_model(path)(batch).score, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ZOO)
def test_search_space_is_accepted_by_the_sweep(name):
    from raylib_ad.tuning.space import check_space, default_space

    assert model_class(name).search_space, f"{name} declares no search space"
    check_space(name, default_space(name), "default")


@pytest.mark.parametrize("name", ZOO)
def test_unknown_settings_are_refused(name):
    with pytest.raises(ConfigError, match="nonsense"):
        create_model(name, **tiny_kwargs(name), nonsense=1)
