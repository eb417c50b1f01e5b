"""CPUs per Ray Train worker: the machine used (a worker's torch threads follow its whole CPUs), a CPU left
for decoding, workers that fit on a node, and sweeps that keep trials side by side."""

from __future__ import annotations

import pytest

from raylib_ad.train.resources import cpus_per_worker


@pytest.mark.parametrize(("total", "workers", "expected"), [
    (8, 1, 7.0),   # a laptop: one worker trains on 7 threads, one CPU decodes
    (8, 2, 3.0),   # 7 / 2 -> 3 whole CPUs each
    (8, 7, 1.0),
    (2, 1, 1.0),   # a 2-core machine: one CPU trains, one decodes
    (2, 2, 0.5),   # fewer CPUs than workers + 1: fractional shares, decoding still gets its CPU
    (2, 4, 0.25),
])
def test_training_workers_share_every_cpu_but_the_decode_reserve(total, workers, expected):
    share = cpus_per_worker(total, workers)
    assert share == expected
    assert workers * share <= total - 1  # never a dataset that waits forever for a CPU


def test_a_worker_fits_on_the_largest_node():
    # 2 nodes of 16 CPUs: one worker may not ask for 31 (no node has them) and leaves its node a CPU.
    assert cpus_per_worker(32, 1, largest_node_cpus=16) == 15.0
    assert cpus_per_worker(32, 2, largest_node_cpus=16) == 15.0


def test_sweeps_keep_one_cpu_per_worker_and_a_request_wins():
    assert cpus_per_worker(8, 1, spread=False) == 1.0  # trials run side by side
    assert cpus_per_worker(8, 1, requested=2.5) == 2.5
    assert cpus_per_worker(2, 2, spread=False) == 0.5
