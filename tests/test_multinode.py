"""A sweep on a two-node Ray cluster on one machine: a head (`ray start --head`) and a second node that
joins it with its own resources. The trials land on both nodes, and their results equal those of the
same trials in the single-node CI sweep (tests/sweep_helpers.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port
from sweep_helpers import MODELS, REPO, ci_sweep, sweep_args

pytestmark = pytest.mark.ray
RAY = str(Path(sys.executable).parent / "ray")
CATEGORY = "alpha"


def _agent_ports() -> list[str]:
    # The test session's own Ray holds the default agent ports; each node here needs ports of its own.
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def _kill_cluster(markers: list[str]) -> None:
    """SIGKILL every process of this cluster, found by id: each names the temp dir or the GCS address on
    its command line. Not `ray stop`: that stops every Ray on the machine, the session's own included."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(marker in cmdline for marker in markers):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def two_nodes():
    if not Path(RAY).exists():
        pytest.skip("the ray CLI is not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    temp_dir = tempfile.mkdtemp(prefix="raymn", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    gcs = f"127.0.0.1:{free_port()}"
    common = ["--num-cpus=2", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={gcs.split(':')[1]}", "--include-dashboard=false",
                        *common, *_agent_ports()], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address={gcs}", *common, *_agent_ports()], env=env, check=True,
                       capture_output=True, timeout=120)
        yield gcs, env
    finally:
        _kill_cluster([temp_dir, gcs])
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_sweep_trials_run_on_both_nodes_with_single_node_results(two_nodes, ray_cluster, tmp_path_factory,
                                                                 lite0_available, tmp_path):
    single = ci_sweep(tmp_path_factory)  # the same trials, run on the session's one-node cluster
    gcs, env = two_nodes
    out = tmp_path / "out"
    args = sweep_args(single["root"], out, (CATEGORY,), "--no-mlflow")
    # 1.25 CPUs per Train worker: one trial per 2-CPU node (two would need 2.5), 0.75 left for decoding.
    args[args.index("--cpus-per-worker") + 1] = "1.25"
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "raylib_ad.cli", *args], cwd=REPO, env={**env, "RAY_ADDRESS": gcs},
                         capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    print(f"two-node sweep: {time.monotonic() - start:.0f} s")

    results = {p.parent.name: json.loads(p.read_text()) for p in (out / "trials").glob("*/result.json")}
    assert set(results) == {f"{CATEGORY}-{m}-{i}" for m in MODELS for i in range(2)}
    nodes = {r["worker_node_id"] for r in results.values()}
    assert len(nodes) == 2, f"all trials ran on {nodes}"
    for key, result in results.items():
        reference = json.loads((single["out"] / "trials" / key / "result.json").read_text())
        assert result["params"] == reference["params"]
        # Trials read their images in a fixed order (tuning/trial.py), so the fitted models should match
        # bit for bit; the pixel tolerance only covers float sums that could still run in another order.
        assert result["val_image_auroc"] == pytest.approx(reference["val_image_auroc"], abs=1e-6), key
        for metric in ("val_pixel_auroc", "val_pixel_aupro"):
            assert result[metric] == pytest.approx(reference[metric], abs=1e-3), (key, metric)
    champions = json.loads((out / "champions.json").read_text())
    assert champions[CATEGORY]["trial"] == single["champions"][CATEGORY]["trial"]
    assert champions[CATEGORY]["test"] == pytest.approx(single["champions"][CATEGORY]["test"], abs=1e-3)
    print({k: (r["val_pixel_auroc"], json.loads((single["out"] / "trials" / k / "result.json").read_text())
               ["val_pixel_auroc"]) for k, r in results.items()})
