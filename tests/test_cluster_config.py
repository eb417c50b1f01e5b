"""cluster.yaml is what `ray up` reads: check it against Ray's own launcher schema (offline, as `ray up`
validates before it creates anything) and check the promises README.md makes about it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_up_would_accept_it(config):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # the launcher's schema and node-type checks


def test_a_cpu_only_head_and_autoscaling_gpu_workers(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing trains on the head
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu_workers = [t for t in workers if re.match(r"(g[4-6]|p[3-5])", t["node_config"]["InstanceType"])]
    assert gpu_workers, "no GPU instance type among the worker node types"
    for worker in gpu_workers:
        assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]  # scales from zero
    assert config["idle_timeout_minutes"] > 0


def test_every_node_installs_this_project_and_runs_ray_from_that_install(config):
    target = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    remote_dir = target.replace("/home/ubuntu", "~")
    installs = [c for c in config["setup_commands"] if "pip install" in c and remote_dir in c]
    assert installs, f"setup_commands never pip-install {target}"
    venv = installs[0].split("/bin/pip")[0]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        ray_starts = [c for c in config[key] if " start " in c and "/bin/ray" in c]
        assert ray_starts and all(c.startswith(venv) for c in ray_starts), key
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--autoscaling-config" in head_start
    assert "$RAY_HEAD_IP" in " ".join(config["worker_start_ray_commands"])


def test_the_head_serves_mlflow_on_shared_storage(config):
    head_start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_start and "--port 5000" in head_start
    assert "/mnt/shared" in head_start  # the registry outlives the head's disk
