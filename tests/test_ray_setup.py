"""ensure_ray beside a running `ray start --head` cluster: join it (one line naming it), or start a
private one when asked. One head node serves both tests; it lives in its own temp dir (RAY_TMPDIR), so
neither the developer's /tmp/ray cluster nor any other test's Ray is seen or touched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raylib_ad.train import ray_setup

MARKER = "raylib_ad_test_head"  # a custom resource only the `ray start` cluster has


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_cli() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"


@pytest.fixture(scope="module")
def head_cluster():
    # Short path: Ray's unix sockets live under it, and socket paths are limited to ~107 bytes.
    temp = tempfile.mkdtemp(prefix="rlad")
    port = _free_port()
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [_ray_cli(), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
               f'--resources={{"{MARKER}": 1}}', "--include-dashboard=false", "--disable-usage-stats"]
    # Own session: the head's processes share its process group, which the teardown ends (never `ray stop`,
    # which stops every Ray on the machine).
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    address_file = Path(temp) / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 120
        while not address_file.is_file() or not address_file.read_text().strip():
            if proc.poll() is not None:
                pytest.fail(f"`ray start --head` exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("`ray start --head` wrote no address file within 120 s")
            time.sleep(0.5)
        yield {"address": address_file.read_text().strip(), "temp": temp, "port": port}
    finally:
        _stop_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(1)  # the leader is gone; the next round SIGKILLs whatever of its group remains


# Each check runs in a fresh driver process, as the CLI does: the session-wide Ray of other tests
# (conftest's ray_cluster) may already be initialized in this one.
DRIVER = """
import json, os, sys
import ray
from raylib_ad.train.ray_setup import ensure_ray
session = ensure_ray(num_cpus=1, local=sys.argv[1] == "local")
print("RESULT", json.dumps({"joined": session.joined, "address": session.address,
                  "gcs_address": ray.get_runtime_context().gcs_address,
                  "marker": ray.cluster_resources().get(sys.argv[2]),
                  "answer": ray.get(ray.remote(lambda: 41 + 1).remote()),
                  "env_address": os.environ.get("RAY_ADDRESS")}))
ray.shutdown()
"""


def _drive(head: dict, mode: str, **env_extra) -> tuple[dict, str]:
    env = {**os.environ, "RAY_TMPDIR": head["temp"], **env_extra}
    if "RAY_ADDRESS" not in env_extra:
        env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", DRIVER, mode, MARKER], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), done.stderr


@pytest.mark.ray
def test_joins_the_running_cluster_and_says_so(head_cluster, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", head_cluster["temp"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_setup.running_cluster_address() == head_cluster["address"]
    # The plain call used to crash here: object_store_memory is refused when joining.
    result, stderr = _drive(head_cluster, "default")
    assert result["joined"] and result["address"] == head_cluster["address"]
    assert result["gcs_address"] == head_cluster["address"] and result["marker"] == 1.0
    assert result["answer"] == 42
    lines = [line for line in stderr.splitlines() if "[raylib_ad]" in line]
    assert len(lines) == 1 and "joined" in lines[0] and head_cluster["address"] in lines[0]
    assert "1 CPU" in lines[0]


@pytest.mark.ray
def test_local_ray_starts_a_private_cluster_beside_it(head_cluster):
    # Even RAY_ADDRESS naming the running cluster does not override an explicit request for a private one.
    result, _ = _drive(head_cluster, "local", RAY_ADDRESS=head_cluster["address"])
    assert not result["joined"] and result["marker"] is None
    assert result["gcs_address"] != head_cluster["address"]
    assert result["answer"] == 42
    assert result["env_address"] == head_cluster["address"]  # restored for whatever runs next


def test_a_stale_address_file_is_not_joined(tmp_path, monkeypatch):
    """A cluster killed without `ray stop` leaves its address file; joining it would hang."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
    assert ray_setup.running_cluster_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert ray_setup.running_cluster_address() == "10.1.2.3:6379"


def test_resources_line_names_nodes_cpus_gpus_and_store():
    text = ray_setup.describe_resources({"CPU": 8.0, "GPU": 1.0, "object_store_memory": 2 * 2**30,
                                         "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0})
    assert text == "1 node, 8 CPU, 1 GPU, 2.0 GiB object store"
