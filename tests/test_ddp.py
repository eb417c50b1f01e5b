"""DDP correctness for the gradient loop's step: 2 workers x batch b == 1 worker x batch 2b after one step,
and no parameter is left unused (DDP without find_unused_parameters fails on the second step if one is).

Two things would make the comparison fail for reasons that are not DDP's:
- BatchNorm in train mode normalizes by each worker's own batch (b images, not 2b). CPU DDP has no
  SyncBatchNorm (the loop converts to it on GPU), so the test runs BatchNorm on its running statistics.
- Adam's first step is lr * sign(grad): float noise in a near-zero gradient becomes a full step. Plain
  SGD shows the gradients themselves, which is what DDP is responsible for.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import free_port
from raylib_ad.models import create_model
from recipe_helpers import training_step

SIZE = 64
MODELS = ["stfpm", "reverse_distillation", "fastflow"]


def data() -> torch.Tensor:
    return torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def trainable(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def build(name: str):
    model = create_model(name, backbone="tf_efficientnet_lite0", image_size=SIZE, seed=0)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, optimizer


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for name in MODELS:
            model, optimizer = build(name)
            ddp = DistributedDataParallel(model)  # find_unused_parameters=False, as Ray's prepare_model
            images = data()[rank * 2 : rank * 2 + 2]
            training_step(ddp, model, optimizer, images, world_size=2)
            results[name] = trainable(model)
            training_step(ddp, model, optimizer, images, world_size=2)  # raises if a parameter went unused
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, lite0_available):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", MODELS)
def test_two_workers_batch_b_equal_one_worker_batch_2b(ddp_results, name):
    model, optimizer = build(name)
    before = trainable(model)
    training_step(model, model, optimizer, data(), world_size=1)
    single = trainable(model)
    for rank_result in ddp_results:
        assert rank_result[name].keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(rank_result[name][key], value, rtol=1e-4, atol=1e-6, msg=f"{name}.{key}")
    assert any(not torch.equal(before[k], single[k]) for k in single)  # the step did move the weights
