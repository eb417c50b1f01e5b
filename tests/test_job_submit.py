"""README.md's local `ray job submit` recipe, run line by line as a user would, on a machine where an earlier
`ray.init()` left an auth token: the job succeeds and its MLflow run lands in the submitting directory's store."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_recipe() -> list[str]:
    """The shell commands of the first bash block under "## On a Ray cluster", continuations joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## On a Ray cluster"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = re.sub(r"\\\n", "", section[start:section.index("```", start)])
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def replace_once(command: str, old: str, new: str) -> str:
    assert old in command, f"the README's recipe no longer contains {old!r}: {command}"
    return command.replace(old, new, 1)


def cluster_pids(temp_dir: str) -> list[int]:
    """Processes of the cluster started with `temp_dir`: its path is on their command line, or (for those
    that rename themselves, e.g. ray::DashboardAgent) one of their open files (logs, sockets) is under it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if temp_dir in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(entry.name))
                continue
            if any(os.readlink(fd).startswith(temp_dir) for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return pids


def kill_cluster(temp_dir: str) -> None:
    """Kill, by pid, the processes of this test's cluster. Not `ray stop`: that stops every Ray on the
    machine, the test session's own included."""
    for _ in range(3):  # a raylet may start a worker while its siblings die
        pids = cluster_pids(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not pids:
            return
        time.sleep(1)


def test_readme_job_submit_recipe_works_and_keeps_the_mlflow_run(synthetic_root, tmp_path, lite0_available):
    if not (BIN / "ray").exists():
        pytest.skip("the ray CLI is not installed next to this Python")
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to find this test's Ray processes again")
    start, submit, stop = readme_recipe()
    assert "ray start --head" in start and "ray job submit" in submit and stop == "ray stop"

    # The user's checkout, away from this repository so the job's mlflow.db cannot land here by accident.
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("raylib_ad", "jobs"):
        shutil.copytree(REPO / name, checkout / name, ignore=ignore)
    for name in ("README.md", "pyproject.toml", ".gitignore"):
        shutil.copy(REPO / name, checkout / name)

    # A token left by an earlier local ray.init(): a plain `ray start --head` would turn token auth on.
    token = tmp_path / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PWD=str(checkout), RAY_AUTH_TOKEN_PATH=str(token),
               RAY_USAGE_STATS_ENABLED="0")

    # Test-only isolation: ports and a temp dir of its own, so this cluster stays apart from any other Ray
    # on the machine (the short /tmp dir keeps Ray's unix socket paths under 108 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    dashboard_port = free_port()
    start += (f" --port={free_port()} --dashboard-port={dashboard_port} --num-cpus=2 --temp-dir={temp_dir}"
              f" --disable-usage-stats --dashboard-agent-listen-port={free_port()}"
              f" --dashboard-agent-grpc-port={free_port()} --metrics-export-port={free_port()}"
              f" --runtime-env-agent-port={free_port()}")
    out = tmp_path / "run"
    submit = replace_once(submit, "http://127.0.0.1:8265", f"http://127.0.0.1:{dashboard_port}")
    submit = replace_once(submit, "--root /tmp/datasets", f"--root {synthetic_root}")
    submit = replace_once(submit, "--out /tmp/runs/demo", f"--out {out}")
    submit += " --category widget --image-size 128 --no-progress"  # the session's small synthetic set

    def shell(command: str, timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=timeout)

    try:
        started = shell(start, 180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        for _ in range(12):  # the head's job agent can take a while to come up on a busy 2-core machine
            result = shell(submit, 600)
            if "No available agent" not in result.stdout + result.stderr:
                break
            time.sleep(5)
    finally:
        kill_cluster(temp_dir)  # stands in for the recipe's `ray stop`
        shutil.rmtree(temp_dir, ignore_errors=True)

    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Missing authentication token" not in log and "succeeded" in log.lower()
    store = f"sqlite:///{checkout}/mlflow.db"
    assert f"this job logs its run to {store}" in log  # said plainly, in the job's own output
    # A quiet console: Ray's own chatter (workers, Ray Train, Ray Data) is in the run's ray.log, not here.
    for chatter in ("Failed to query Ray Train Controller", "Running Dataset", "Setting up process group"):
        assert chatter not in log, chatter
    assert "Setting up process group" in (out / "ray.log").read_text()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.7 and (out / "model" / "weights.safetensors").is_file()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=store).get_run(metrics["mlflow_run_id"])  # in the user's store, kept
    assert run.data.metrics["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert not (REPO / "jobs" / "mlflow.db").exists()
