"""`ray job submit` of jobs/train.py to a local `ray start --head` cluster, as users run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def head_node():
    if not Path(RAY).exists():
        pytest.skip("the ray CLI is not installed next to this Python")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    gcs_port, dashboard_port = free_port(), free_port()
    # A separate, short temp dir (Ray's unix socket paths must stay under 108 bytes) keeps this cluster
    # apart from the test session's in-process Ray.
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    start = [RAY, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
             "--disable-usage-stats",
             # The session's own Ray already holds the default agent ports; the job agent of a second
             # cluster on the same machine never comes up unless it gets ports of its own.
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env, gcs_port
    finally:
        # Not `ray stop`: that stops every Ray on the machine, the test session's own cluster included.
        # Every process of this cluster names its temp dir on its command line.
        subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True, timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_a_model(head_node, synthetic_root, tmp_path, lite0_available):
    address, env, _ = head_node
    out = tmp_path / "run"
    entrypoint = [sys.executable, "jobs/train.py", "--model", "dfm", "--data", "synthetic", "--root",
                  str(synthetic_root), "--category", "widget", "--backbone", "tf_efficientnet_lite0",
                  "--image-size", "128", "--workers", "2", "--out", str(out), "--no-progress", "--no-mlflow"]
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *entrypoint]
    for _ in range(12):  # the head's job agent can take a while to come up on a busy 2-core machine
        result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.7
    assert (out / "model" / "weights.safetensors").is_file()
