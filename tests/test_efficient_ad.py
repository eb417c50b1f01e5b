"""EfficientAD: networks and shapes, the hard-feature loss against anomalib's definition, the recipe end
to end in one process, gradients for every trainable parameter (DDP needs them), determinism, teacher
files, the model directory round trip, and exact statistics / quantiles / gradients on 2 workers.

Tiny: 64 px images (the unpadded PDN needs >= 33 px; anomalib's autoencoder needs >= 256 px, ours
zero-pads below that), 8 teacher channels, randomly initialised networks (pretrained=False).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import free_port, write_image
from raylib_ad.artifact import read_model, write_model_dir
from raylib_ad.errors import ConfigError
from raylib_ad.models import create_model
from raylib_ad.models.efficient_ad import model as ead
from raylib_ad.models.recipe import Optimize
from raylib_ad.train.step_context import RunnerStepContext

SIZE, CHANNELS = 64, 8


def build(**settings):
    kwargs = dict(image_size=SIZE, pretrained=False, seed=0, teacher_out_channels=CHANNELS,
                  distill_steps=2, distill_stats_steps=1, no_penalty="penalty_dir" not in settings)  # offline: no Imagenette
    kwargs.update(settings)
    return create_model("efficient_ad", **kwargs)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def stage(model, name: str) -> Optimize:
    return next(s for s in model.recipe() if s.name == name)


def step(model, train: Optimize, batch, *, step_index=0, extra=None, weight=1.0, seed=0,
         dropout=True) -> RunnerStepContext:
    ctx = RunnerStepContext(batch={"image": batch}, modules=train.modules,
                            optimizers={s.name: s for s in train.optimizers}, extra=extra or {}, epoch=0,
                            step=step_index, generator=torch.Generator().manual_seed(seed), weight=weight,
                            use_amp=False)
    for module in train.modules.values():
        module.train()
    if not dropout:
        model.ae.decoder.dropouts.eval()
    train.step(ctx)
    return ctx


def anomalib_hard_loss(distance: torch.Tensor) -> torch.Tensor:
    d_hard = torch.quantile(distance.flatten(), 0.999)
    return distance[distance >= d_hard].mean()


def test_hard_feature_loss_is_anomalibs_per_image_and_averaged_over_the_batch():
    distance = torch.rand(3, 8, 20, 20, generator=torch.Generator().manual_seed(1)) ** 3
    for i in range(3):
        assert torch.allclose(ead.hard_feature_loss(distance[i : i + 1]), anomalib_hard_loss(distance[i]), rtol=1e-6)
    per_image = torch.stack([anomalib_hard_loss(d) for d in distance]).mean()
    assert torch.allclose(ead.hard_feature_loss(distance), per_image, rtol=1e-6)


@pytest.mark.parametrize("size", ["small", "medium"])
def test_networks_and_output_shapes(size):
    torch.set_num_threads(1)
    model = build(model_size=size).eval()
    x = images(2)
    assert model.student(x).shape == (2, 2 * CHANNELS, 8, 8)  # 64 px, unpadded: 8 x 8 features
    assert model.ae(x).shape == (2, CHANNELS, 8, 8)
    with pytest.raises(RuntimeError, match="not trained"):
        model(x)
    model.fit_teacher_statistics([x])
    with torch.no_grad():
        out = model(x)
    assert out.score.shape == (2,) and out.anomaly_map.shape == (2, SIZE, SIZE)
    assert torch.equal(out.score, out.anomaly_map.amax(dim=(1, 2)))


@pytest.mark.parametrize("key, value", [("model_size", "large"), ("lr", -1.0), ("padding", "no"),
                                        ("distill_steps", 0), ("teacher_out_channels", 0), ("penalty_dir", "")])
def test_bad_settings_raise_config_error_naming_the_setting(key, value):
    with pytest.raises(ConfigError, match=key):
        build(**{key: value})


def test_too_small_images_are_refused():
    with pytest.raises(ConfigError, match="image_size"):
        create_model("efficient_ad", image_size=32, pretrained=False)


def test_teacher_statistics_are_the_channel_mean_and_population_std():
    model = build().eval()
    x = images(3)
    model.fit_teacher_statistics([x[:2], x[2:]])
    with torch.no_grad():
        out = model.teacher(x).double()
    assert torch.allclose(model.teacher_mean.flatten().double(), out.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(model.teacher_std.flatten().double(), out.permute(1, 0, 2, 3).flatten(1).std(1, unbiased=False),
                          rtol=1e-4)


def test_train_step_reaches_every_trainable_parameter_and_the_loss_decreases(tmp_path):
    torch.set_num_threads(1)
    for i in range(2):
        write_image(tmp_path / "penalty" / f"{i}.png", size=(80, 80), value=60 + 100 * i)
    model = build(penalty_dir=str(tmp_path / "penalty")).eval()
    x = images(1)
    model.fit_teacher_statistics([x])
    train = stage(model, "train")
    assert train.main and train.loss_reduction == "mean" and len(model._penalty.paths) == 2  # read by the model (penalty.py)
    penalty = iter(lambda: images(1, seed=9), None)  # stands in for the runner's decoded stream
    hard = []
    for i in range(5):
        ctx = step(model, train, x, step_index=i, extra={"penalty": penalty}, seed=i)
        if i == 0:
            missing = [n for n, p in list(model.student.named_parameters()) + list(model.ae.named_parameters())
                       if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing
            assert all(p.grad is None for p in model.teacher.parameters())
            assert ctx.logged["loss_penalty"] > 0
        hard.append(ctx.logged["loss_hard"])
    # the student learns the teacher's hardest features of the normal image (the other terms depend on
    # the step's random augmentation)
    assert hard[-1] < 0.95 * hard[0]


def test_train_step_is_deterministic_under_a_seed():
    states = []
    for _ in range(2):
        model = build().eval()
        x = images(1)
        model.fit_teacher_statistics([x])
        train = stage(model, "train")
        for i in range(2):
            step(model, train, x, step_index=i, seed=i)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_distill_step_collects_target_statistics_then_trains_the_teacher():
    torch.set_num_threads(1)
    model = build(distill_stats_steps=2).eval()
    distill = stage(model, "distill")
    assert distill.steps == 2 + 2 and not distill.validate
    x = images(2)
    before = [p.detach().clone() for p in model.teacher.parameters()]
    for i in range(2):
        step(model, distill, x, step_index=i, seed=i)
    assert model.distill_moments.shape == (3, CHANNELS) and model.distill_moments[0, 0] == 2 * 2 * 16 * 16
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))  # statistics only
    ctx = step(model, distill, x, step_index=2)
    assert all(p.grad is not None for p in model.teacher.parameters()) and math.isfinite(ctx.logged["loss"])
    assert not all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    assert "_distill_target" not in "".join(model.state_dict())  # the backbone is not saved


def test_teacher_files_skip_the_distillation(tmp_path, monkeypatch):
    source = build(seed=3)
    saved = source.save_teacher(tmp_path / "teacher.safetensors")
    loaded = build(pretrained=True, teacher=str(saved))
    assert [s.name for s in loaded.recipe()] == ["teacher_statistics", "train", "map_quantiles"]
    assert all(torch.equal(a, b) for a, b in zip(source.teacher.state_dict().values(),
                                                  loaded.teacher.state_dict().values()))
    # anomalib's file, where anomalib's download would put it, loads as is (a torch state dict)
    folder = tmp_path / "weights" / "efficientad_pretrained_weights"
    folder.mkdir(parents=True)
    torch.save(source.teacher.state_dict(), folder / "pretrained_teacher_small.pth")
    monkeypatch.setenv("RAYLIB_AD_WEIGHTS_DIR", str(tmp_path / "weights"))
    from_env = build(pretrained=True)
    assert from_env.teacher_source.endswith("pretrained_teacher_small.pth")
    assert torch.equal(from_env.teacher.conv4.weight, source.teacher.conv4.weight)
    with pytest.raises(ConfigError, match="medium"):
        build(pretrained=True, weights=str(saved), model_size="medium")


def test_fit_in_process_runs_every_stage_and_round_trips_through_the_model_directory(tmp_path):
    torch.set_num_threads(1)
    from raylib_ad.train.in_process import fit_in_process

    for i in range(2):
        write_image(tmp_path / "penalty" / f"{i}.png", size=(70, 70), value=40 + 120 * i)
    model = build(penalty_dir=str(tmp_path / "penalty"), distill_steps=1)
    x = images(3)
    fit = fit_in_process(model, x, batch_size=2, max_steps=1)
    assert fit.metrics["stages"] == ["optimize:distill", "collect:teacher_statistics", "optimize:train",
                                     "calibrate:map_quantiles"]
    qa_st, qb_st, qa_ae, qb_ae = model.map_quantiles.tolist()
    assert qa_st <= qb_st and qa_ae <= qb_ae
    model.eval()
    with torch.no_grad():
        expected = model(x)
    # quantiles of the raw maps over the training images, as torch.quantile would give
    with torch.no_grad():
        map_st, _ = model.maps(x)
    assert torch.allclose(model.map_quantiles[:2], torch.quantile(map_st.flatten(), torch.tensor([0.9, 0.995])),
                          rtol=1e-5)
    loaded = read_model(write_model_dir(model, tmp_path / "model"))
    with torch.no_grad():
        got = loaded(x)
    assert torch.allclose(got.score, expected.score) and torch.allclose(got.anomaly_map, expected.anomaly_map)


# --- 2 workers ---------------------------------------------------------------------------------------


def _prepared(x, setattr_=setattr):
    """A model and its train stage with the per-image augmentations and the dropout off: they are drawn
    per worker, and the exactness check is about the arithmetic of the reduction."""
    setattr_(ead, "random_color_jitter", lambda batch, generator: batch)
    setattr_(ead, "random_grayscale", lambda batch, p, generator: batch)
    model = build().eval()
    model.fit_teacher_statistics([x])
    return model, stage(model, "train")


def _grads(model):
    return {n: p.grad.clone() for n, p in list(model.student.named_parameters()) + list(model.ae.named_parameters())}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, penalty = images(5), images(2, seed=7)
        shard = x[:3] if rank == 0 else x[3:]  # unequal shards
        model = build().eval()
        model.fit_teacher_statistics([shard[:2], shard[2:]])
        model.fit_map_quantiles([shard])
        stats = {"mean": model.teacher_mean, "std": model.teacher_std, "quantiles": model.map_quantiles}
        # one DDP step of the train stage, one image per worker, twice (an unused parameter fails the 2nd)
        model, train = _prepared(x)
        modules = {k: DistributedDataParallel(m) for k, m in train.modules.items()}
        train = Optimize("train", modules=modules, optimizers=train.optimizers, step=train.step, steps=2)
        extra = {"penalty": iter([penalty[rank : rank + 1]] * 2)}
        step(model, train, x[rank : rank + 1], extra=extra, dropout=False)
        grads = _grads(model)
        step(model, train, x[rank : rank + 1], step_index=1, extra=extra, dropout=False)
        torch.save({"stats": stats, "grads": grads}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_equal_one_process(tmp_path, monkeypatch):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.set_num_threads(1)
    x, penalty = images(5), images(2, seed=7)
    model = build().eval()
    model.fit_teacher_statistics([x])
    model.fit_map_quantiles([x])
    for result in ranks:
        assert torch.allclose(result["stats"]["mean"], model.teacher_mean, atol=1e-6)
        assert torch.allclose(result["stats"]["std"], model.teacher_std, rtol=1e-5)
        assert torch.allclose(result["stats"]["quantiles"], model.map_quantiles, rtol=1e-5)
    model, train = _prepared(x, monkeypatch.setattr)
    step(model, train, x[:2], extra={"penalty": iter([penalty[:1], penalty[1:]])}, dropout=False)
    single = _grads(model)
    scale = torch.cat([g.flatten() for g in single.values()]).norm()
    for name, grad in single.items():
        for result in ranks:
            # batched and single-image convolutions round differently (and a few gradients are ~1e-9)
            assert (result["grads"][name] - grad).norm() <= 1e-4 * grad.norm() + 1e-6 * scale, name
