"""GANomaly: anomalib's networks and defaults, the two-optimizer step (DDP-safe), a tiny fit through the
in-process runner, and the model directory round trip. Tiny widths at 32-64 px, no backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raylib_ad.artifact import read_model, write_model_dir
from raylib_ad.errors import ConfigError
from raylib_ad.models import create_model, list_models, model_class
from raylib_ad.models.ganomaly.networks import pad_nextpow2
from raylib_ad.models.recipe import Optimize

TINY = {"n_features": 8, "latent_vec_size": 16}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: extra threads only contend for the machine's cores (10x slower when it is busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Normal images: low-frequency colour gradients in [-1, 1] (4 x 4 random colours, upsampled)."""
    base = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


def noisy(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Anomalous images: the same kind of gradients plus strong pixel noise."""
    noise = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed + 1000))
    return smooth(n, seed, size) + noise


def auroc(normal: torch.Tensor, anomalous: torch.Tensor) -> float:
    return (anomalous[None, :] > normal[:, None]).float().mean().item()


def build(size: int = 32, **settings):
    return create_model("ganomaly", image_size=size, **{**TINY, **settings})


@pytest.fixture(scope="module")
def fitted():
    """A short fit through the runner: 32 smooth images, batch 8, 10 epochs (4 steps each)."""
    runner = pytest.importorskip("raylib_ad.train.in_process")
    torch.manual_seed(0)
    model = build(seed=0)
    fit = runner.fit_in_process(model, smooth(32, 0), None, batch_size=8, max_epochs=10)
    return model.eval(), fit


def test_registered_with_anomalibs_defaults_and_no_backbone():
    assert "ganomaly" in list_models()
    cls = model_class("ganomaly")
    assert cls.default_backbone is None and cls.default_layers == ()
    assert cls.produces_maps is False and cls.default_epochs == 100
    assert cls.defaults == {"n_features": 64, "latent_vec_size": 100, "extra_layers": 0,
                            "add_final_conv_layer": True, "wadv": 1, "wcon": 50, "wenc": 1, "lr": 0.0002,
                            "beta1": 0.5, "beta2": 0.999}
    config = build().config()
    # anomalib's default pre-processor normalizes with ImageNet statistics.
    assert config["backbone"] is None and config["layers"] == []
    assert config["mean"] == [0.485, 0.456, 0.406] and config["std"] == [0.229, 0.224, 0.225]
    assert set(cls.search_space) == {"lr", "latent_vec_size", "n_features", "epochs"}


@pytest.mark.parametrize("size,padded", [(32, 32), (64, 64), (48, 64), (100, 128)])
def test_shapes_and_padding_to_the_next_power_of_two(size, padded):
    model = build(size).eval()
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
        fake, latent_i, latent_o = model.generator(pad_nextpow2(images))
        pred, _ = model.discriminator(pad_nextpow2(images))
    assert out.score.shape == (3,) and torch.isfinite(out.score).all() and out.anomaly_map is None
    assert fake.shape == (3, 3, padded, padded) and fake.abs().max() <= 1  # tanh output
    assert latent_i.shape == latent_o.shape == (3, TINY["latent_vec_size"], 1, 1)
    assert pred.shape == (3,) and ((pred >= 0) & (pred <= 1)).all()
    # The score is the mean squared distance between the two latent codes.
    torch.testing.assert_close(out.score, (latent_i - latent_o).pow(2).mean(dim=(1, 2, 3)))


def test_padding_is_centred_with_the_odd_pixel_on_top_and_left():
    padded = pad_nextpow2(torch.ones(1, 1, 3, 5))
    assert padded.shape == (1, 1, 8, 8)
    rows, cols = padded[0, 0].sum(dim=1).nonzero().flatten(), padded[0, 0].sum(dim=0).nonzero().flatten()
    assert rows.tolist() == [3, 4, 5] and cols.tolist() == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("key,value", [
    ("n_features", 0), ("latent_vec_size", 1.5), ("extra_layers", -1), ("add_final_conv_layer", False),
    ("wcon", -1), ("wadv", "1"), ("lr", 0), ("beta1", 1.0), ("beta2", -0.1), ("n_features", True),
])
def test_bad_settings_raise_config_error_naming_the_setting(key, value):
    with pytest.raises(ConfigError, match=key):
        build(**{key: value})


def test_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match="batch_size"):
        build(batch_size=32)


@pytest.mark.parametrize("size", [16, 36, 65, 129])
def test_image_sizes_anomalib_cannot_handle_raise_config_error(size):
    with pytest.raises(ConfigError, match=f"image_size={size}.*nearest supported"):
        build(size)


def test_recipe_is_one_main_stage_with_an_adam_per_network():
    model = build(lr=1e-3, beta1=0.4, beta2=0.9)
    (stage,) = model.recipe()
    assert isinstance(stage, Optimize) and stage.main and stage.epochs == 100
    assert stage.modules == {"generator": model.generator, "discriminator": model.discriminator}
    specs = {spec.name: spec for spec in stage.optimizers}
    assert set(specs) == {"generator", "discriminator"}
    for name, spec in specs.items():
        assert isinstance(spec.optimizer, torch.optim.Adam) and spec.clip_grad_norm is None
        group = spec.optimizer.param_groups[0]
        assert group["lr"] == 1e-3 and group["betas"] == (0.4, 0.9)
        assert {id(p) for p in group["params"]} == {id(p) for p in stage.modules[name].parameters()}


class _Tracked(nn.Module):
    """Records that the wrapped module took part in a forward (as DDP's reducer does)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner, self.forwarded = module, False

    def forward(self, *args):
        self.forwarded = True
        return self.inner(*args)


class _RecordingContext:
    """A StepContext that checks the DDP rule at every backward: each module forwarded since the last
    backward gets a finite gradient for every parameter, and no other module gets any."""

    def __init__(self, images: torch.Tensor, stage: Optimize):
        self.batch, self.extra, self.epoch, self.step = {"image": images}, {}, 0, 0
        self.generator = torch.Generator().manual_seed(0)
        self.modules = {name: _Tracked(module) for name, module in stage.modules.items()}
        self.optimizers = {spec.name: spec.optimizer for spec in stage.optimizers}
        self.calls: list[tuple[str, set[str]]] = []
        self.logged: dict[str, float] = {}

    def optimize(self, name: str, loss: torch.Tensor, *, retain_graph: bool = False) -> float:
        for tracked in self.modules.values():
            tracked.inner.zero_grad(set_to_none=True)
        loss.backward(retain_graph=retain_graph)
        forwarded = {n for n, t in self.modules.items() if t.forwarded}
        for module_name, tracked in self.modules.items():
            for param_name, p in tracked.inner.named_parameters():
                if module_name in forwarded:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), (name, module_name, param_name)
                else:
                    assert p.grad is None, f"{name} step reached {module_name}.{param_name}"
            tracked.forwarded = False
        self.optimizers[name].step()
        self.calls.append((name, forwarded))
        return float(loss.detach())

    def log(self, **values) -> None:
        self.logged.update({k: float(v) for k, v in values.items()})


@pytest.mark.parametrize("extra_layers", [0, 1])
def test_every_parameter_gets_a_finite_gradient_in_its_step(extra_layers):
    model = build(extra_layers=extra_layers).train()
    (stage,) = model.recipe()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    ctx = _RecordingContext(smooth(4, 0), stage)
    stage.step(ctx)
    # Generator first (its loss reaches both networks), then the discriminator on the detached fake.
    assert ctx.calls == [("generator", {"generator", "discriminator"}), ("discriminator", {"discriminator"})]
    assert {"adversarial_loss", "contextual_loss", "encoder_loss"} <= set(ctx.logged)
    assert all(not torch.equal(before[k], v) for k, v in model.named_parameters())  # both stepped


def test_tiny_fit_lowers_the_generator_loss_and_separates_noisy_images(fitted):
    model, fit = fitted
    losses = [epoch["train_loss_generator"] for epoch in fit.history]
    assert len(losses) == 10 and losses[-1] < 0.95 * losses[0]
    assert all(0 < epoch["train_loss_discriminator"] < 1 for epoch in fit.history)
    with torch.no_grad():
        normal, anomalous = model(smooth(16, 5)).score, model(noisy(16, 6)).score
    assert auroc(normal, anomalous) >= 0.9


def test_model_directory_round_trip_gives_equal_scores(fitted, tmp_path):
    model, fit = fitted
    images = torch.cat([smooth(3, 7), noisy(3, 8)])
    with torch.no_grad():
        expected = model(images).score
    write_model_dir(model, tmp_path / "m")
    reloaded = read_model(tmp_path / "m")
    assert reloaded.config() == model.config()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images).score, expected, rtol=1e-5, atol=1e-7)
    if fit.model_dir is not None:  # the runner's own model directory reads back the same
        with torch.no_grad():
            torch.testing.assert_close(read_model(fit.model_dir)(images).score, expected, rtol=1e-5, atol=1e-7)


def test_training_is_deterministic_under_a_seed():
    runner = pytest.importorskip("raylib_ad.train.in_process")

    def fit(seed: int) -> torch.Tensor:
        model = build(seed=seed)
        runner.fit_in_process(model, smooth(16, 0), None, batch_size=8, max_epochs=2)
        with torch.no_grad():
            return model.eval()(noisy(4, 3)).score

    assert torch.equal(fit(0), fit(0))
    assert not torch.equal(fit(0), fit(1))
    # Initial weights come from the seed alone, not from torch's global generator.
    torch.manual_seed(123)
    first = build(seed=3).state_dict()
    torch.manual_seed(456)
    assert all(torch.equal(v, build(seed=3).state_dict()[k]) for k, v in first.items())
