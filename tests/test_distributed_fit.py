"""A distributed fit equals the single-process fit: two torch.distributed (gloo) processes, each with
half of the images, against one process with all of them. Ray Train runs exactly this code in its
workers (tests/test_ray_train.py covers the Ray path end to end)."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from raylib_ad.models import create_model
from raylib_ad.models.components.coreset import covering_radius

SIZE = 64
MODELS = {
    "padim": {"n_features": 8},
    "dfm": {},
    "dfm_gather": {"moments_max_dim": 1},
    "dfkde": {"n_pca_components": 4},
    "patchcore": {"coreset_sampling_ratio": 0.1},
    "patchcore_tworound": {"coreset_sampling_ratio": 0.1, "coreset_projection_dim": 0, "coreset_mode": "two_round"},
}


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, SIZE, SIZE, generator=gen) for _ in range(4)]


def build(key: str):
    name = key.split("_")[0]
    return create_model(name, backbone="tf_efficientnet_lite0", image_size=SIZE, **MODELS[key])


def fitted_states(shard: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    states = {}
    for key in MODELS:
        model = build(key)
        model.fit(shard)
        states[key] = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("feature_extractor")}
    return states


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        shard = batches()[rank * 2 : rank * 2 + 2]
        torch.save(fitted_states(shard), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory, lite0_available):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return fitted_states(batches()), ranks


@pytest.mark.parametrize("key", ["padim", "dfm", "dfm_gather", "dfkde"])
def test_exact_reductions_equal_the_single_process_fit(results, key):
    single, ranks = results
    for state in ranks:
        assert state[key].keys() == single[key].keys()
        for name, value in single[key].items():
            torch.testing.assert_close(state[key][name], value, rtol=1e-4, atol=1e-4, msg=f"{key}.{name}")


def test_patchcore_exact_bank_equals_the_single_process_bank(results):
    single, ranks = results
    bank0, bank1 = ranks[0]["patchcore"]["memory_bank"], ranks[1]["patchcore"]["memory_bank"]
    assert torch.equal(bank0, bank1)  # identical on every worker, not one half each
    torch.testing.assert_close(bank0, single["patchcore"]["memory_bank"])  # and the one a single process picks


def test_patchcore_two_round_bank_is_whole_identical_and_a_provable_approximation(results):
    single, ranks = results
    bank0, bank1 = ranks[0]["patchcore_tworound"]["memory_bank"], ranks[1]["patchcore_tworound"]["memory_bank"]
    assert torch.equal(bank0, bank1)
    assert bank0.shape == single["patchcore_tworound"]["memory_bank"].shape  # the requested size, whole
    # Two-round k-center greedy is a 4-approximation of the optimal radius, which the single-process
    # greedy radius bounds from above: r_two_round <= 4 * OPT <= 4 * r_single.
    model = build("patchcore_tworound")
    with torch.no_grad():
        points = torch.cat([model.embed(b)[0].flatten(0, 1) for b in batches()])
    r_single = covering_radius(points, single["patchcore_tworound"]["memory_bank"])
    r_two = covering_radius(points, bank0)
    assert r_two <= 4 * r_single
    # Every bank row is a real training patch (the coreset selects, it never averages).
    assert torch.cdist(bank0.double(), points.double()).min(1).values.max() < 1e-3
