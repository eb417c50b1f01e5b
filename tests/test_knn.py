"""Issue #26: the blocked exact kNN (same neighbours as brute force) and the sharded bank (same answer as
one bank, PatchCore's re-weighted image score included)."""

from __future__ import annotations

import pytest
import torch

from raylib_ad.models.components.nearest_neighbors import nearest_neighbors
from raylib_ad.models.components.sharded_bank import BankShard, ShardedBank, merge_neighbors


def brute(queries, bank, k):
    ref = torch.cdist(queries.double(), bank.double()).topk(min(k, bank.shape[0]), dim=1, largest=False)
    return ref.values, ref.indices


@pytest.mark.parametrize("k", [1, 2, 9])
@pytest.mark.parametrize("n_bank,bank_chunk,query_chunk", [
    (5000, 512, 300),    # many blocks, a short last one
    (5000, None, 8192),  # the defaults
    (300, 2048, 8192),   # a bank smaller than one block
    (7, 3, 5),           # k larger than a block
    (4, 2048, 64),       # k larger than the bank (k is cut to the bank)
])
def test_blocked_search_equals_brute_force(k, n_bank, bank_chunk, query_chunk):
    gen = torch.Generator().manual_seed(k * 1000 + n_bank)
    queries, bank = torch.randn(700, 24, generator=gen), torch.randn(n_bank, 24, generator=gen)
    dist, idx = nearest_neighbors(queries, bank, k, bank_chunk=bank_chunk, query_chunk=query_chunk)
    ref_d, ref_i = brute(queries, bank, k)
    assert idx.shape == ref_i.shape
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, rtol=1e-5, atol=1e-5)


def test_first_index_wins_ties_and_every_tie_is_a_true_neighbour():
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (40, 8), generator=gen).float()  # small integers: exact arithmetic
    bank = torch.cat([base, base, base[:10]])  # every row two or three times, across blocks
    queries = torch.cat([base[:25], torch.randint(-3, 4, (50, 8), generator=gen).float()])
    exact = torch.cdist(queries.double(), bank.double())
    for bank_chunk in (7, 40, 2048):
        dist, idx = nearest_neighbors(queries, bank, 1, bank_chunk=bank_chunk, query_chunk=16)
        best = exact.min(1).values
        torch.testing.assert_close(dist[:, 0].double(), best, rtol=0, atol=1e-6)
        # ties: the lowest index among the equally near rows, whatever the blocking
        assert torch.equal(idx[:, 0], (exact == best[:, None]).int().argmax(1))
        for k in (3, 5):
            dist, idx = nearest_neighbors(queries, bank, k, bank_chunk=bank_chunk, query_chunk=16)
            ref = exact.topk(k, dim=1, largest=False).values
            torch.testing.assert_close(dist.double(), ref, rtol=0, atol=1e-6)
            # each returned index is at its reported distance, and no index twice
            torch.testing.assert_close(exact.gather(1, idx), ref, rtol=0, atol=1e-6)
            assert all(len(set(row.tolist())) == k for row in idx)


def test_squared_and_offset():
    gen = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(50, 8, generator=gen), torch.randn(90, 8, generator=gen)
    d, i = nearest_neighbors(queries, bank, 3)
    d2, i2 = nearest_neighbors(queries, bank, 3, squared=True, index_offset=1000)
    assert torch.equal(i2, i + 1000)
    torch.testing.assert_close(d2, d.pow(2))


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
@pytest.mark.parametrize("k", [1, 9])
def test_sharded_search_equals_single_bank(shards, k):
    gen = torch.Generator().manual_seed(shards)
    queries, bank = torch.randn(400, 16, generator=gen), torch.randn(3001, 16, generator=gen)
    single = BankShard(bank)
    sharded = ShardedBank.split(bank, shards)
    d1, i1 = single.search(queries, k)
    d2, i2 = sharded.search(queries, k)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2, rtol=1e-6, atol=1e-6)
    picks = torch.tensor([0, 5, 3000, 1500, 2999, 1])
    assert torch.equal(sharded.rows(picks), bank[picks])
    assert torch.equal(sharded.rows(i2[:3]), bank[i2[:3]])


def test_sharded_ties_resolve_to_the_lowest_global_index():
    row = torch.ones(1, 4)
    bank = torch.cat([torch.zeros(5, 4) + 5, row, torch.zeros(5, 4) + 5, row, row])  # row at 5, 11, 12
    single = BankShard(bank).search(row, 1)
    for shards in (2, 3, 4):
        merged = ShardedBank.split(bank, shards).search(row, 1)
        assert merged[1].item() == single[1].item() == 5


def test_merge_neighbors_keeps_the_k_best():
    a = (torch.tensor([[1.0, 4.0]]), torch.tensor([[0, 1]]))
    b = (torch.tensor([[2.0, 3.0]]), torch.tensor([[10, 11]]))
    d, i = merge_neighbors([a, b], 3)
    assert d.tolist() == [[1.0, 2.0, 3.0]] and i.tolist() == [[0, 10, 11]]


def test_sharded_bank_needs_contiguous_shards():
    bank = torch.randn(10, 3)
    with pytest.raises(ValueError):
        ShardedBank([BankShard(bank[:5]), BankShard(bank[5:], offset=6)])


def test_patchcore_score_with_a_sharded_bank_equals_the_single_bank():
    from raylib_ad.models import create_model

    torch.manual_seed(0)
    model = create_model("patchcore", backbone="resnet18", layers=["layer2", "layer3"], image_size=64,
                         pretrained=False, coreset_sampling_ratio=0.5, num_neighbors=9)
    model.eval()
    with torch.no_grad():
        model.fit([torch.randn(4, 3, 64, 64)])
        images = torch.randn(3, 3, 64, 64)
        single = model(images)
        patches, grid = model.embed(images)
        for shards in (2, 5):
            out = model.score_patches(patches, grid, ShardedBank.split(model.memory_bank, shards))
            torch.testing.assert_close(out.score, single.score, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out.anomaly_map, single.anomaly_map, rtol=1e-6, atol=1e-6)
        # the re-weighting really ran (k = 9): the image score is not the raw max patch distance
        dist, _ = nearest_neighbors(patches.flatten(0, 1), model.memory_bank, 1)
        assert not torch.allclose(single.score, dist.view(3, -1).max(1).values)


def test_query_slices_on_several_threads_give_the_same_answer_and_restore_the_thread_count(monkeypatch):
    from raylib_ad.models.components import nearest_neighbors as knn

    gen = torch.Generator().manual_seed(3)
    queries, bank = torch.randn(1000, 16, generator=gen), torch.randn(900, 16, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for k in (1, 9):
            monkeypatch.setattr(knn, "PARALLEL_QUERY_SLICES", False)
            one = nearest_neighbors(queries, bank, k, query_chunk=256, bank_chunk=128)
            monkeypatch.setattr(knn, "PARALLEL_QUERY_SLICES", True)
            sliced = nearest_neighbors(queries, bank, k, query_chunk=256, bank_chunk=128)
            assert torch.equal(one[1], sliced[1])
            torch.testing.assert_close(one[0], sliced[0], rtol=0, atol=1e-6)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
