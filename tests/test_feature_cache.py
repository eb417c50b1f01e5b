"""The frozen-feature cache: training from cached frozen features is the same training, and the cache
returns every image once per epoch, reshuffled, and gives up cleanly past its memory budget."""

from __future__ import annotations

import pytest
import torch

from raylib_ad.models import create_model
from raylib_ad.train.feature_cache import FrozenFeatureCache
from recipe_helpers import optimize_stage, training_step

SIZE = 64


@pytest.mark.parametrize("name", ["stfpm", "reverse_distillation", "fastflow"])
def test_a_step_on_cached_frozen_features_equals_a_step_on_images(name, lite0_available):
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    results = []
    for cached in (False, True):
        model = create_model(name, backbone="tf_efficientnet_lite0", image_size=SIZE, seed=0).train()
        optimizer, _ = model.configure_optimizers()
        frozen = model.frozen_features(images) if cached else None
        assert cached is False or frozen is not None
        inputs = None if cached and not optimize_stage(model).needs_images_with_frozen else images
        loss = training_step(model, model, optimizer, inputs, frozen=frozen)
        results.append((loss, {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for key in params_a:
        torch.testing.assert_close(params_a[key], params_b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_memory_bank_models_have_no_frozen_part():
    model = create_model("padim", backbone="resnet18", pretrained=False, image_size=SIZE)
    assert model.frozen_features(torch.zeros(1, 3, SIZE, SIZE)) is None


def _fill(cache: FrozenFeatureCache, n: int, batch: int) -> None:
    for start in range(0, n, batch):
        ids = torch.arange(start, min(n, start + batch), dtype=torch.float32)
        cache.add(ids[:, None, None, None].expand(-1, 3, 2, 2).clone(), {"layer": ids[:, None] * 10})
    cache.seal()


def test_every_image_once_per_epoch_in_a_new_order_with_its_own_features():
    cache = FrozenFeatureCache(budget_bytes=2**20)
    _fill(cache, n=10, batch=4)
    assert cache.ready and len(cache) == 10
    orders = []
    for epoch in range(2):
        batches = list(cache.batches(4, torch.Generator().manual_seed(epoch)))
        assert [len(f["layer"]) for _, f in batches] == [4, 4, 2]  # as many steps as the streamed epoch
        ids = torch.cat([images[:, 0, 0, 0] for images, _ in batches])
        features = torch.cat([f["layer"][:, 0] for _, f in batches])
        torch.testing.assert_close(features, ids * 10)  # each image keeps its own frozen features
        assert sorted(ids.tolist()) == list(range(10))
        orders.append(ids.tolist())
    assert orders[0] != orders[1]


def test_a_shard_over_the_budget_is_not_cached_at_all():
    cache = FrozenFeatureCache(budget_bytes=300)  # room for about two of the ten images
    _fill(cache, n=10, batch=2)
    assert cache.overflowed and not cache.ready and cache.nbytes == 0


def test_images_are_not_kept_when_the_model_does_not_need_them():
    cache = FrozenFeatureCache(budget_bytes=2**20, keep_images=False)
    _fill(cache, n=3, batch=2)
    images, frozen = next(cache.batches(3, torch.Generator().manual_seed(0)))
    assert images is None and len(frozen["layer"]) == 3
