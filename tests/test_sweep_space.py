"""Sweep planning without Ray: search spaces, YAML overrides and their errors, the deterministic plan,
and how trials are ranked."""

from __future__ import annotations

import math

import pytest

from raylib_ad.errors import ConfigError
from raylib_ad.options import TrainOptions
from raylib_ad.tuning.space import check_space, default_space, load_space_file, plan_trials
from raylib_ad.tuning.sweep import SweepOptions, _rank, make_plan, resolve_categories
from raylib_ad.tuning.trial import trial_options


def _opts(tmp_path, **kw):
    base = TrainOptions(model="padim", data="synthetic", root=str(tmp_path), backbone="tf_efficientnet_lite0",
                        settings=kw.pop("settings", {}))
    return SweepOptions(models=kw.pop("models", ["padim", "dfm"]), base=base, categories=["a", "b"],
                        num_samples=3, **kw)


def test_every_required_model_declares_a_valid_default_space():
    for model in ("patchcore", "padim", "dfm", "stfpm", "reverse_distillation", "fastflow"):
        space = default_space(model)
        check_space(model, space, "default")
    assert {"coreset_sampling_ratio", "num_neighbors", "layers"} <= set(default_space("patchcore"))
    assert {"n_features", "layers"} <= set(default_space("padim"))
    assert {"pca_level", "score_type"} <= set(default_space("dfm"))
    for model in ("stfpm", "reverse_distillation", "fastflow"):
        assert {"lr", "epochs", "layers"} <= set(default_space(model))


def test_plan_is_deterministic_starts_with_defaults_and_translates_layers(tmp_path):
    _, categories, trials, plan = make_plan(_opts(tmp_path))
    _, _, again, plan_again = make_plan(_opts(tmp_path))
    assert plan == plan_again and [t.to_dict() for t in trials] == [t.to_dict() for t in again]
    assert len(trials) == 2 * 2 * 3 and categories == ["a", "b"]
    assert [t.key for t in trials[:3]] == ["a-padim-0", "a-padim-1", "a-padim-2"]
    assert all(t.params == {} for t in trials if t.index == 0)  # sample 0 = the model's defaults
    sampled = [t for t in trials if t.index > 0 and t.model == "padim"]
    assert all(t.params["n_features"] in (50, 100, 150) for t in sampled)
    # ResNet names become tf_efficientnet_lite0 modules (stride 4/8/16 -> blocks.1/2/4)
    assert all(set(t.params["layers"]) <= {"blocks.1", "blocks.2", "blocks.4"} for t in sampled)
    # each (category, model) has its own generator: category b does not repeat category a's draws
    a = [t.params for t in trials if t.category == "a" and t.index > 0]
    b = [t.params for t in trials if t.category == "b" and t.index > 0]
    assert a != b


def test_yaml_file_overrides_the_default_space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("dfm:\n  pca_level: {uniform: [0.5, 0.6]}\n  score_type: nll\n")
    _, _, trials, plan = make_plan(_opts(tmp_path, search_space=str(path)))
    dfm = [t for t in trials if t.model == "dfm" and t.index > 0]
    assert all(0.5 <= t.params["pca_level"] <= 0.6 and t.params["score_type"] == "nll" for t in dfm)
    assert plan["spaces"]["padim"] == default_space("padim")  # models not in the file keep their own


@pytest.mark.parametrize("text, fragment", [
    ("dfm: [unclosed", "not valid YAML"),
    ("dfm:\n  not_a_setting: {choice: [1, 2]}\n", "dfm.not_a_setting"),
    ("dfm:\n  pca_level: {normal: [0, 1]}\n", "dfm.pca_level"),
    ("dfm:\n  pca_level: {uniform: [0.9]}\n", "dfm.pca_level"),
    ("dfm:\n  pca_level: {loguniform: [0, 1]}\n", "low > 0"),
    ("padim:\n  layers: {choice: [layer2]}\n", "padim.layers"),
    ("padim:\n  layers: {choice: [[layer9]]}\n", "padim.layers"),
    ("nosuchmodel:\n  lr: 0.1\n", "unknown model"),
])
def test_bad_search_space_files_name_the_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        make_plan(_opts(tmp_path, search_space=str(path)))
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_bad_sweep_arguments_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no swept model"):
        make_plan(_opts(tmp_path, settings={"coreset_sampling_ratio": 0.1}))
    with pytest.raises(ConfigError, match="num-samples"):
        plan_trials(["dfm"], ["a"], 0, seed=0, spaces={"dfm": {}}, backbone=None, fixed_epochs=None,
                    where={"dfm": "x"})
    with pytest.raises(ConfigError, match="scheduler"):
        make_plan(_opts(tmp_path, scheduler="hyperband"))
    with pytest.raises(ConfigError, match="unknown model"):
        make_plan(_opts(tmp_path, models=["padim", "nosuch"]))
    with pytest.raises(ConfigError, match="missing.yaml: cannot read it"):
        load_space_file(tmp_path / "missing.yaml")


def test_categories_all_is_the_15_mvtec_categories():
    assert len(resolve_categories(["all"], "mvtec")) == 15
    assert resolve_categories(None, "magnetic_tile") == ["magnetic_tile"]
    with pytest.raises(ConfigError):
        resolve_categories(["all"], "folder")


def test_trial_options_apply_sampled_params_and_only_known_settings(tmp_path):
    base = TrainOptions(model="padim", settings={"n_features": 100, "pretrained": False, "pca_level": 0.9},
                        max_epochs=None)
    trial = {"key": "a-stfpm-1", "category": "a", "model": "stfpm", "params": {"lr": 0.05, "epochs": 4,
                                                                              "layers": ["layer2"]}}
    options = trial_options(base, trial, tmp_path)
    assert options.model == "stfpm" and options.category == "a" and options.max_epochs == 4
    assert options.layers == ["layer2"] and options.settings == {"pretrained": False, "lr": 0.05}
    assert options.out == str(tmp_path / "trials" / "a-stfpm-1") and not options.mlflow
    padim = trial_options(base, {**trial, "model": "padim", "params": {}}, tmp_path)
    assert padim.settings == {"n_features": 100, "pretrained": False}


def test_ranking_uses_validation_auroc_then_aupro_and_puts_nan_last():
    rows = [{"val_image_auroc": 0.9, "val_pixel_aupro": 0.5}, {"val_image_auroc": 0.9, "val_pixel_aupro": 0.7},
            {"val_image_auroc": math.nan, "val_pixel_aupro": 0.99}, {"val_image_auroc": 0.8}]
    assert max(rows, key=_rank) is rows[1]
    assert sorted(rows, key=_rank)[0] is rows[2]


def test_asha_compares_gradient_trials_only_within_their_category_and_model():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from raylib_ad.tuning.scheduler import GroupedASHA

    scheduler = GroupedASHA(metric="val_image_auroc", mode="max", max_t=9, grace_period=2,
                            gradient_models=("stfpm", "fastflow"))
    trials = {name: SimpleNamespace(trial_id=name, config={"trial": {"category": cat, "model": model}})
              for name, cat, model in [("a1", "a", "stfpm"), ("a2", "a", "stfpm"), ("b1", "b", "stfpm"),
                                       ("a3", "a", "fastflow"), ("m1", "a", "padim")]}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def report(name, value, iteration=2):
        return scheduler.on_trial_result(None, trials[name], {"training_iteration": iteration,
                                                              "val_image_auroc": value})

    assert report("a1", 0.9) == TrialScheduler.CONTINUE
    assert report("a2", 0.5) == TrialScheduler.STOP        # weaker than a1 at the same rung: stopped
    assert report("b1", 0.5) == TrialScheduler.CONTINUE    # another category: not compared with a1
    assert report("a3", 0.5) == TrialScheduler.CONTINUE    # another model: not compared with a1
    assert report("m1", 0.1, iteration=1) == TrialScheduler.CONTINUE  # memory-bank trials are never stopped
    assert "3 (category, model) groups, 1 trials stopped early" in scheduler.debug_string()
