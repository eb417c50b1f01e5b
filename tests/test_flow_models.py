"""C-Flow, CS-Flow, U-Flow and CFA: the contract the runner relies on, on tiny randomly initialised
backbones (resnet18 / tf_efficientnet_lite0, pretrained=False, 64 px) with small flow settings: shapes,
every trainable parameter of a DDP module gets a gradient in each backward it takes part in, a tiny fit
lowers the loss, exact memory / calibration reductions over 2 workers, U-Flow's label-free NFA threshold,
an end-to-end fit through the runner and its model directory, and clear errors for unusable backbones/layers."""

from __future__ import annotations

import math
import multiprocessing

import pytest
import torch

from conftest import free_port
from raylib_ad.artifact import read_model
from raylib_ad.errors import ConfigError
from raylib_ad.models import create_model, list_models
from raylib_ad.models.base import default_layers_for
from raylib_ad.models.recipe import Optimize
from raylib_ad.models.uflow import nfa
from raylib_ad.train.in_process import fit_in_process
from raylib_ad.train.step_context import RunnerStepContext

SIZE = 64
NAMES = ["cflow", "csflow", "uflow", "cfa"]
# Small settings, and ResNet-named layers translated by stride to the backbone (as the defaults are).
CONFIGS = {
    "cflow": ({"condition_vector": 8, "coupling_blocks": 2, "fiber_batch_size": 16}, ("layer1", "layer2", "layer3")),
    "csflow": ({"cross_conv_hidden_channels": 16, "n_coupling_blocks": 2}, ("layer2",)),
    "uflow": ({"flow_steps": 2, "affine_subnet_channels_ratio": 0.5}, ("layer1", "layer2", "layer3")),
    # lr 1e-4: with a random backbone's large features, Adam's first sign-like steps at anomalib's 1e-3
    # overshoot for a few steps before the loss falls
    "cfa": ({"lr": 1e-4}, ("layer1", "layer2", "layer3")),
}


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: extra threads only contend for the machine's cores (10x slower when it is busy).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def build(name: str, backbone: str = "resnet18", seed: int = 0, **overrides):
    settings, layers = CONFIGS[name]
    return create_model(name, backbone=backbone, layers=default_layers_for(backbone, layers), pretrained=False,
                        image_size=SIZE, seed=seed, **{**settings, **overrides})


class RecordingContext(RunnerStepContext):
    """The runner's step context, noting after each optimizer step which DDP modules got gradients."""

    def __init__(self, stage: Optimize, batch, seed: int = 0):
        super().__init__(batch=batch, modules=stage.modules, optimizers={s.name: s for s in stage.optimizers},
                         extra={}, epoch=0, step=0, generator=torch.Generator().manual_seed(seed), weight=1.0,
                         use_amp=False)
        self.calls: list[dict[str, str]] = []

    def optimize(self, optimizer, loss, *, retain_graph=False):
        value = super().optimize(optimizer, loss, retain_graph=retain_graph)
        record = {}
        for name, module in self.modules.items():
            got = [p.grad is not None and bool(torch.isfinite(p.grad).all())
                   for p in module.parameters() if p.requires_grad]
            record[name] = "all" if all(got) else "none" if not any(got) else "some"
        self.calls.append(record)
        return value


def prepare(model, data: torch.Tensor) -> Optimize:
    """Run the Collect stages before the Optimize stage (CFA's memory); return the Optimize stage."""
    stages = model.recipe()
    model.eval()
    for stage in stages:
        if isinstance(stage, Optimize):
            return stage
        stage.run(iter([data[:1], data[1:]]), False)
    raise AssertionError("no Optimize stage")


def train(model, stage: Optimize, data: torch.Tensor, steps: int, cached: bool = False) -> list[RecordingContext]:
    model.eval()
    for module in stage.modules.values():
        module.train()
    contexts = []
    for step in range(steps):
        batch = {"image": data}
        if cached:
            with torch.no_grad():
                batch = {"image": None, "frozen": stage.frozen_features(data)}
        ctx = RecordingContext(stage, batch, seed=step)
        stage.step(ctx)
        contexts.append(ctx)
    return contexts


def whole_batch_loss(model, data: torch.Tensor) -> float:
    model.train()
    with torch.no_grad():
        return float(model(data)["loss"])


def test_models_are_registered_with_recipes_and_search_spaces():
    assert set(NAMES) <= set(list_models())
    kinds = {}
    for name in NAMES:
        model = build(name)
        stages = model.recipe()
        kinds[name] = [stage.kind for stage in stages]
        assert model.has_frozen_part and not model.needs_images_with_frozen
        assert model.search_space and 2 <= len(model.search_space) <= 3
        assert set(model.search_space) <= set(model.defaults) | {"layers", "epochs"}
    assert kinds == {"cflow": ["optimize", "calibrate"], "csflow": ["optimize"], "uflow": ["optimize"],
                     "cfa": ["collect", "optimize"]}


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0"])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_the_ddp_gradient_rule(name, backbone):
    model = build(name, backbone)
    data = images(2)
    stage = prepare(model, data)
    # The frozen part is frozen and stays out of every DDP module.
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    for module in stage.modules.values():
        assert not any(p is q for p in module.parameters() for q in model.feature_extractor.parameters())
    contexts = train(model, stage, data, steps=1)
    calls = contexts[0].calls
    assert calls and math.isfinite(contexts[0].logged["loss"])
    # DDP rule: a module gets a gradient for all or none of its parameters in each backward, and each
    # module takes part in at least one.
    assert all(state in ("all", "none") for call in calls for state in call.values()), calls
    assert all(any(call[m] == "all" for call in calls) for m in stage.modules)
    # Every trainable parameter is in exactly one DDP module and in the optimizer.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_modules = [id(p) for m in stage.modules.values() for p in m.parameters() if p.requires_grad]
    assert sorted(in_modules) == sorted(trainable)
    optimized = {id(p) for spec in stage.optimizers for g in spec.optimizer.param_groups for p in g["params"]}
    assert optimized == trainable

    model.eval()
    test = images(3, seed=1)
    with torch.no_grad():
        out = model(test)
        cached = model(None, frozen=model.frozen_features(test))
    assert out.score.shape == (3,) and out.anomaly_map.shape == (3, SIZE, SIZE)
    assert torch.isfinite(out.score).all() and torch.isfinite(out.anomaly_map).all()
    torch.testing.assert_close(cached.anomaly_map, out.anomaly_map)  # the cacheable frozen path is the same


def test_cflow_takes_one_optimizer_step_per_fiber_batch_on_one_decoder():
    model = build("cflow")  # resnet18 layer1..3 at 64 px: 16x16, 8x8, 4x4 positions per image
    stage = prepare(model, images(2))
    calls = train(model, stage, images(2), steps=1)[0].calls
    # 2 images: 512 / 16, 128 / 16, 32 / 16 fiber batches (fiber_batch_size 16)
    used = [next(m for m, state in call.items() if state == "all") for call in calls]
    assert used == ["decoder0"] * 32 + ["decoder1"] * 8 + ["decoder2"] * 2
    assert all(list(call.values()).count("all") == 1 for call in calls)


@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_fit_lowers_the_loss(name):
    model = build(name)
    data = images(2, seed=3)
    stage = prepare(model, data)
    before = whole_batch_loss(model, data)
    train(model, stage, data, steps={"cflow": 2}.get(name, 6), cached=True)
    after = whole_batch_loss(model, data)
    assert math.isfinite(before) and after < before, (before, after)


def test_schedules_and_clipping_follow_anomalib():
    csflow = next(s for s in build("csflow").recipe() if isinstance(s, Optimize))
    assert csflow.optimizers[0].clip_grad_norm == 1.0 and csflow.epochs == 240
    uflow_model = build("uflow")
    uflow = prepare(uflow_model, images(2))
    spec = uflow.optimizers[0]
    assert spec.interval == "step" and uflow.epochs == 200
    train(uflow_model, uflow, images(2), steps=2)
    assert spec.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 0.6 * 2 / 25000))


def test_cfa_memory_is_the_mean_descriptor_per_position():
    model = build("cfa")
    data = images(5, seed=2)
    model.eval()
    model.init_memory(iter([data[:2], data[2:]]))
    with torch.no_grad():
        direct = model.descriptor(model.frozen_features(data)).mean(dim=0)  # (C', h, w)
    assert model.memory_bank.shape == (direct.shape[1] * direct.shape[2], direct.shape[0])  # (positions, C')
    torch.testing.assert_close(model.memory_bank, direct.flatten(1).T, rtol=1e-5, atol=1e-6)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        data = images(5, seed=2)
        shard = [data[:3]] if rank == 0 else [data[3:]]  # unequal shards
        build("cfa")  # warm timm's cached layer probe, which also draws from the global RNG
        torch.manual_seed(0)  # the same random (pretrained=False) backbone as the single process's
        cfa = build("cfa")
        cfa.eval()
        cfa.init_memory(iter(shard))
        cflow = build("cflow")
        stage = next(s for s in cflow.recipe() if isinstance(s, Optimize))
        stage.modules = {k: torch.nn.parallel.DistributedDataParallel(m) for k, m in stage.modules.items()}
        # Unequal worker batches give unequal fiber counts: the workers must still agree on the number of
        # backward passes, or DDP hangs; an unused parameter would raise on the second step.
        steps = [len(c.calls) for c in train(cflow, stage, shard[0], steps=2)]
        cflow.calibrate(iter(shard))
        torch.save((cfa.memory_bank, steps, cflow.log_prob_max), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_reduce_exactly_and_agree_on_fiber_steps(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)  # a disagreement on the number of backward passes would hang DDP
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)}
    build("cfa")
    torch.manual_seed(0)
    single = build("cfa")
    single.eval()
    single.init_memory(iter([images(5, seed=2)]))
    for memory, _, _ in results.values():
        torch.testing.assert_close(memory, single.memory_bank, rtol=1e-5, atol=1e-6)
    steps0, steps1 = results[0][1], results[1][1]
    assert steps0 == steps1  # the same number of optimizer steps on both workers
    torch.testing.assert_close(results[0][2], results[1][2])  # calibration maxima agree


def _planted(seed: int, blob: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latents = [torch.randn(1, 16, 32 // 2**s, 32 // 2**s, generator=gen) for s in range(3)]
    if blob:
        for s, z in enumerate(latents):
            lo, hi = 8 // 2**s, 16 // 2**s  # the same image region, rows/cols 16..32 of 64
            z[:, :, lo:hi, lo:hi] *= 4
    return latents


def test_nfa_threshold_finds_a_planted_blob_and_nothing_in_noise():
    assert nfa.nfa_threshold(1.0) == 0.0 and nfa.nfa_threshold(0.01) == pytest.approx(2.0)
    for seed in range(3):
        noise = nfa.decide(nfa.minus_log10_nfa(_planted(seed, blob=False), SIZE))
        assert not noise.is_anomalous.any() and not noise.mask.any()
        found = nfa.decide(nfa.minus_log10_nfa(_planted(seed, blob=True), SIZE))
        assert found.is_anomalous.all()
        inside = found.mask[0, 16:32, 16:32].float().mean()
        outside = torch.cat([found.mask[0, :, :8].flatten(), found.mask[0, :, 40:].flatten()]).float().mean()
        assert inside > 0.9 and outside == 0, (float(inside), float(outside))


def test_nfa_binomial_tail_is_exact():
    table = nfa.log10_binomial_tail(4, 0.5)
    expected = [1.0, 15 / 16, 11 / 16, 5 / 16, 1 / 16]
    torch.testing.assert_close(10 ** table[:5], torch.tensor(expected, dtype=torch.float64))
    assert table[5] == -math.inf
    assert nfa.candidate_threshold(0.5) == pytest.approx(0.4549364, rel=1e-5)  # chi2(1).ppf(0.5)


def test_uflow_nfa_mode_gives_label_free_maps_and_threshold():
    likelihood, nfa_model = build("uflow"), build("uflow", anomaly_map_mode="nfa")
    assert likelihood.label_free_threshold() is None and nfa_model.label_free_threshold() == 0.0
    nfa_model.eval()
    data = images(2)
    with torch.no_grad():
        out = nfa_model(data)
    decision = nfa_model.segment(data)
    assert out.anomaly_map.shape == decision.mask.shape == (2, SIZE, SIZE)
    torch.testing.assert_close(decision.mask, out.anomaly_map > 0)


@pytest.mark.parametrize("name", NAMES)
def test_fit_in_process_writes_a_model_directory_that_reloads_identically(name):
    model = build(name, seed=5)
    fit = fit_in_process(model, images(4, seed=4), None, batch_size=2, max_epochs=1)
    assert fit.metrics["stages"] == [f"{s.kind}:{s.name}" for s in model.recipe()]
    assert len(fit.history) == 1 and math.isfinite(fit.history[0]["train_loss"])
    reloaded = read_model(fit.model_dir)
    assert reloaded.config() == model.config()
    if name == "cflow":  # the Calibrate stage ran and its result travels with the model
        assert reloaded.log_prob_max.shape == (len(model.layers),)
    test = images(2, seed=6)
    with torch.no_grad():
        expected, again = model.eval()(test), reloaded(test)
    torch.testing.assert_close(again.score, expected.score)
    torch.testing.assert_close(again.anomaly_map, expected.anomaly_map)


@pytest.mark.parametrize("name", NAMES)
def test_the_seed_alone_decides_the_initial_weights(name):
    def state(seed):
        torch.manual_seed(seed * 31 + 1)  # the global random state must not matter
        return {k: v.clone() for k, v in build(name, seed=seed).state_dict().items()
                if not k.startswith("feature_extractor")}

    first, second, other = state(7), state(7), state(8)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize("name,kwargs,words", [
    ("cflow", {"backbone": "resnet18", "layers": ["layer9"]}, ["resnet18", "layer9", "cflow needs"]),
    ("cfa", {"backbone": "tf_efficientnet_lite0", "layers": ["layer1"]}, ["tf_efficientnet_lite0", "blocks.1"]),
    ("csflow", {"backbone": "resnet18", "layers": ["layer2", "layer3"]}, ["resnet18", "exactly one"]),
    ("csflow", {"backbone": "resnet18", "layers": ["layer3"], "image_size": 32}, ["resnet18", "layer3", "sides"]),
    ("uflow", {"backbone": "resnet18", "layers": ["layer1", "layer3"]}, ["resnet18", "layer3", "halve"]),
    ("uflow", {"backbone": "resnet18", "layers": ["layer1", "layer2"], "image_size": 60}, ["image_size 60"]),
    ("cfa", {"backbone": "resnet18", "layers": ["layer2", "layer3"], "image_size": 16}, ["resnet18", "2x2"]),
    ("uflow", {"backbone": "no_such_net"}, ["no_such_net"]),
])
def test_unusable_backbones_and_layers_fail_at_construction(name, kwargs, words):
    kwargs = {"pretrained": False, "image_size": SIZE, **kwargs}
    with pytest.raises(ConfigError) as err:
        create_model(name, **kwargs)
    for word in words:
        assert word in str(err.value), str(err.value)


@pytest.mark.parametrize("name,key,value", [
    ("cflow", "condition_vector", 6), ("cflow", "decoder", "glow"), ("cflow", "fiber_batch_size", 0),
    ("csflow", "n_coupling_blocks", 0), ("csflow", "num_channels", 1),
    ("uflow", "anomaly_map_mode", "max"), ("uflow", "affine_clamp", -1),
    ("cfa", "gamma_d", 0), ("cfa", "num_nearest_neighbors", 1.5),
])
def test_bad_settings_name_the_key_and_value(name, key, value):
    with pytest.raises(ConfigError) as err:
        build(name, **{key: value})
    assert key in str(err.value) and repr(value) in str(err.value)


# -- speed-only rewrites give the results of the plain computation (components/fast_flow.py, CFA) -------
@pytest.mark.parametrize("rank_shape", [(5, 12), (2, 12, 3, 3)])
def test_gather_permutation_equals_freia_matrix_permutation(rank_shape):
    from FrEIA.modules import AllInOneBlock

    from raylib_ad.models.components.fast_flow import PermutingAllInOneBlock
    from raylib_ad.models.components.flow_utils import seeded

    channels, rest = rank_shape[1], list(rank_shape[2:])

    def subnet(cin, cout):
        return torch.nn.Conv2d(cin, cout, 1) if rest else torch.nn.Linear(cin, cout)

    blocks = []
    for cls in (AllInOneBlock, PermutingAllInOneBlock):
        with seeded(3):
            blocks.append(cls([(channels, *rest)], subnet_constructor=subnet, reverse_permutation=True))
    plain, fast = blocks
    assert plain.state_dict().keys() == fast.state_dict().keys()
    x = torch.randn(*rank_shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (y_plain,), jac_plain = plain([x])
    (y_fast,), jac_fast = fast([x])
    torch.testing.assert_close(y_fast, y_plain, rtol=0, atol=0)  # a gather is the matrix product exactly
    torch.testing.assert_close(jac_fast, jac_plain, rtol=0, atol=0)
    (g_plain,) = torch.autograd.grad(y_plain.square().sum(), x)
    (g_fast,) = torch.autograd.grad(y_fast.square().sum(), x)
    torch.testing.assert_close(g_fast, g_plain)
    (x_back,), _ = fast([y_fast.detach()], rev=True)
    torch.testing.assert_close(x_back, x.detach(), rtol=1e-5, atol=1e-5)


def test_fused_adam_takes_the_plain_adam_steps():
    from raylib_ad.models.components.fast_flow import adam

    for decoupled, kwargs in ((False, {"lr": 1e-2, "eps": 1e-4, "weight_decay": 1e-5, "betas": (0.5, 0.9)}),
                              (True, {"lr": 1e-2, "weight_decay": 5e-4, "amsgrad": True})):
        start = torch.randn(50, generator=torch.Generator().manual_seed(0))
        plain_p, fast_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        plain = (torch.optim.AdamW if decoupled else torch.optim.Adam)([plain_p], **kwargs)
        fast = adam([fast_p], decoupled=decoupled, **kwargs)
        assert fast.defaults["fused"]
        for step in range(5):
            grad = torch.randn(50, generator=torch.Generator().manual_seed(step + 1))
            for p, opt in ((plain_p, plain), (fast_p, fast)):
                p.grad = grad.clone()
                opt.step()
        torch.testing.assert_close(fast_p, plain_p, rtol=1e-6, atol=1e-7)


def test_cfa_selected_distances_give_the_full_matrix_loss_and_gradient():
    model = build("cfa")
    prepare(model, images(2))
    with torch.no_grad():
        features = model.frozen_features(images(2, seed=1))
    descriptors = model.descriptor(features).detach().requires_grad_(True)
    k, j = model.settings["num_nearest_neighbors"], model.settings["num_hard_negative_features"]
    # The plain computation: all squared distances in autograd, anomalib's expression and topk.
    patches = descriptors.flatten(2).transpose(1, 2)
    full = patches.pow(2).sum(2, keepdim=True) + model.memory_bank.pow(2).sum(1) - 2 * patches @ model.memory_bank.T
    plain = model.loss(full)
    (plain_grad,) = torch.autograd.grad(plain, descriptors)
    fast = model.descriptor_loss(descriptors)
    (fast_grad,) = torch.autograd.grad(fast, descriptors)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-4 * float(plain_grad.abs().max()))
    torch.testing.assert_close(model.distances(descriptors), full)
    assert model.nearest_distances(descriptors, k + j).shape == (*full.shape[:2], k + j)
