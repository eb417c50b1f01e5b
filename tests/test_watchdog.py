"""A run never waits silently (issue #27): a run whose workers cannot start, or stop making progress,
ends with one message saying on what it waited; a worker killed for memory is said as such; and the
data pipeline of a training worker can always start (no CPU asked of Ray's autoscaling coordinator)."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from raylib_ad.data import build_manifest
from raylib_ad.train.watchdog import Stall, find_stall, memory_kill, stall_seconds

SIZE = 32


def test_a_stall_is_the_newest_sign_of_life_older_than_the_limit():
    snapshot = {"now": 100.0, "attempt_start": 10.0, "beats": {0: (95.0, "training batch 3", 0), 1: (40.0, "x", 0)}}
    assert find_stall(snapshot, 10.0) is None  # rank 0 beat 5 s ago: the run moves
    stall = find_stall(snapshot, 4.0)
    assert isinstance(stall, Stall) and stall.idle_s == pytest.approx(5.0)
    # Before any worker beat, the attempt's start counts: a run waiting for its workers stalls too.
    assert find_stall({"now": 100.0, "attempt_start": 10.0, "beats": {}}, 60.0).idle_s == pytest.approx(90.0)


def test_the_stall_limit_comes_from_the_setting_or_the_environment(monkeypatch):
    monkeypatch.setenv("RAYLIB_AD_STALL_MINUTES", "3")
    assert stall_seconds() == 180.0 and stall_seconds(0.5) == 30.0
    monkeypatch.setenv("RAYLIB_AD_STALL_MINUTES", "soon")
    with pytest.raises(ValueError, match="RAYLIB_AD_STALL_MINUTES='soon'"):
        stall_seconds()


def test_a_worker_killed_by_rays_memory_monitor_is_said_as_such():
    from ray.exceptions import ActorDiedError, OutOfMemoryError

    oom = OutOfMemoryError("Task was killed due to the node running low on memory. Memory on the node was "
                           "22.9GB / 24GB (0.96), which exceeds the memory usage threshold of 0.95.")
    said = memory_kill(oom, None)
    assert said.startswith("killed for memory by Ray's memory monitor") and "GiB in use" in said
    wrapped = RuntimeError("A worker health check failed.")
    wrapped.__cause__ = oom
    assert memory_kill(wrapped, None).startswith("killed for memory")
    assert memory_kill(ActorDiedError(), None) is None  # an ordinary death is not called a memory kill

    from raylib_ad.train.ray_train import _lost_worker

    class Failed(Exception):
        worker_failures = {0: RuntimeError("connection closed by peer"), 1: oom}

    # rank 0's error is the model's (a user exception); rank 1 was killed for memory: the death wins.
    lost = _lost_worker(Failed(), None)
    assert lost.startswith("rank 1 was killed for memory")


def _rows(synthetic_root, n=8):
    table = build_manifest("synthetic", synthetic_root, "widget")
    return table.filter(pc.equal(table.column("split"), "train")).slice(0, n)


def _fit(synthetic_root, tmp_path, **kwargs):
    from raylib_ad.train.ray_train import fit_on_ray
    from raylib_ad.train.runner import RunnerConfig

    config = RunnerConfig(image_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=4)
    return fit_on_ray("padim", {"backbone": "tf_efficientnet_lite0", "image_size": SIZE}, _rows(synthetic_root),
                      None, config, workers=2, cpus_per_worker=0.5, gpus_per_worker=0, storage_path=str(tmp_path),
                      run_name="run", **kwargs)


@pytest.mark.ray
def test_a_run_whose_workers_cannot_start_stops_saying_what_it_waited_for(ray_cluster, synthetic_root, tmp_path,
                                                                          lite0_available):
    from ray.util.placement_group import placement_group, remove_placement_group

    from raylib_ad.train.watchdog import RunStalledError

    neighbour = placement_group([{"CPU": 1.75}])  # another run holding the CPUs these workers need
    ray_cluster.get(neighbour.ready(), timeout=60)
    try:
        with pytest.raises(RunStalledError) as stalled:
            _fit(synthetic_root, tmp_path, stall_minutes=0.25)
    finally:
        remove_placement_group(neighbour)
    message = str(stalled.value)
    assert "waited for its 2 training worker(s) to start, each asking for 0.5 CPU" in message
    assert "1 placement group(s) of other runs holding 1.75 CPU" in message
    assert "run the same command again to resume" in message and str(tmp_path) in message


@pytest.mark.ray
def test_a_worker_that_stops_making_progress_stops_the_run_with_its_last_step(ray_cluster, synthetic_root,
                                                                              tmp_path, lite0_available):
    from raylib_ad.train.watchdog import RunStalledError

    marker = tmp_path / "hung"
    with pytest.raises(RunStalledError) as stalled:
        # A minute: longer than the workers take to start on a busy machine, so only the hang stalls.
        _fit(synthetic_root, tmp_path, stall_minutes=1.0,
             faults={"at": "pass", "count": 1, "batch": 1, "rank": 1, "action": "hang", "marker": str(marker)})
    assert marker.exists()
    message = str(stalled.value)
    assert "rank 1: last '" in message and "rank 0: last '" in message and "GiB resident" in message
    assert "waited for their data or for each other" in message


_KILLED_FOR_MEMORY = r'''
import os, sys
import ray, psutil  # Ray first: it brings psutil
mem = psutil.virtual_memory()
# Ray's memory monitor kills a worker once the node's memory in use passes this fraction: 4 GiB above what is
# in use now (room for this run's own processes); the hogging worker takes 6 GiB.
os.environ["RAY_memory_usage_threshold"] = f"{(mem.total - mem.available + 4 * 2**30) / mem.total:.4f}"
os.environ["RAY_memory_monitor_refresh_ms"] = "100"
import pyarrow.compute as pc
ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
from raylib_ad.data import build_manifest
from raylib_ad.train.ray_train import fit_on_ray
from raylib_ad.train.runner import RunnerConfig
table = build_manifest("synthetic", sys.argv[1], "widget")
rows = table.filter(pc.equal(table.column("split"), "train")).slice(0, 8)
config = RunnerConfig(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, batch_size=4)
fit = fit_on_ray("padim", {"backbone": "tf_efficientnet_lite0", "image_size": 32}, rows, None, config, workers=2,
                 cpus_per_worker=0.5, gpus_per_worker=0, storage_path=sys.argv[2], run_name="run",
                 faults={"at": "pass", "count": 1, "batch": 1, "rank": 1, "action": "hog", "hog_gib": 6,
                         "marker": sys.argv[2] + "/hogged"})
print("restarts", fit.restarts)
'''


@pytest.mark.ray
def test_a_worker_killed_by_rays_memory_monitor_is_said_as_such_and_the_run_finishes(synthetic_root, tmp_path,
                                                                                    lite0_available):
    """Ray's real memory monitor, on a private Ray whose threshold sits just above what the machine uses:
    the worker that takes 6 GiB is killed, the run says so with the figures and what to change, restarts
    and finishes."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", _KILLED_FOR_MEMORY, str(synthetic_root), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    said = run.stdout + run.stderr
    assert run.returncode == 0, said[-3000:]
    assert (tmp_path / "hogged").exists()
    assert "was killed for memory by Ray's memory monitor (this node:" in said, said[-3000:]
    assert "use fewer --workers, a smaller --batch-size or a smaller --image-size" in said
