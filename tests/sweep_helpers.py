"""The CI sweep, run once per test session and shared by tests/test_sweep.py and tests/test_multinode.py
(a sweep costs ~25 s per trial on 2 cores; the multi-node test compares its trials with these).

It is run the hard way: a first `raylib-ad sweep` process joins the session's Ray, is killed (SIGKILL)
once some trials have finished, and the same command then resumes the sweep in this process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("alpha", "beta", "gamma")
MODELS = ("padim", "dfm")
KILL_AFTER = 3  # finished trials before the first sweep process is killed


def sweep_args(root: Path, out: Path, categories=CATEGORIES, *extra: str) -> list[str]:
    return ["sweep", "--model", ",".join(MODELS), "--data", "synthetic", "--root", str(root), "--categories",
            ",".join(categories), "--num-samples", "2", "--backbone", "tf_efficientnet_lite0", "--image-size", "64",
            "--batch-size", "16", "--cpus-per-worker", "0.5", "--out", str(out), "--no-progress", *extra]


def finished_trials(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((out / "trials").glob("*/result.json"))}


_CACHE: dict[str, dict] = {}


def ci_sweep(tmp_path_factory) -> dict:
    """Run (once) the interrupted-then-resumed CI sweep; returns paths and what the interruption left."""
    if "result" in _CACHE:
        return _CACHE["result"]
    import ray

    from raylib_ad.cli import main

    base = tmp_path_factory.mktemp("ci_sweep")
    root, out = base / "data", base / "out"
    uri = f"sqlite:///{base / 'mlflow.db'}"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": uri,
           # save Tune's experiment state at every step, so the kill below loses no finished trial
           "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    log = open(base / "first_run.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "raylib_ad.cli", *sweep_args(root, out)], cwd=REPO, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while len(finished_trials(out)) < KILL_AFTER and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # let Tune write its experiment state after the last report
        before_kill = finished_trials(out)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    assert len(before_kill) >= KILL_AFTER, (base / "first_run.log").read_text()[-3000:]
    assert len(before_kill) < len(CATEGORIES) * len(MODELS) * 2, "the first run finished before it was killed"

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        start = time.perf_counter()
        code = main(sweep_args(root, out))
        resume_seconds = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    assert code == 0
    _CACHE["result"] = {"root": root, "out": out, "uri": uri, "before_kill": before_kill,
                        "resume_seconds": resume_seconds,
                        "champions": json.loads((out / "champions.json").read_text())}
    return _CACHE["result"]
