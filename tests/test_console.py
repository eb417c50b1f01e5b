"""The quiet console: Ray's output goes to the run's log file, the user sees bars, their own warnings and
the summary. Fed with records shaped like Ray's log monitor's, so no Ray cluster is needed."""

from __future__ import annotations

import logging

import pytest

from raylib_ad.console import install_console
from raylib_ad.progress import MARKER, RELAY_ENV, ProgressCounter, parse_marker, progress_bar


def record(*lines: str, actor: str = "RayTrainWorker", pid: int = 123) -> dict:
    return {"lines": list(lines), "pid": pid, "actor_name": actor, "task_name": "", "is_err": False, "ip": "x"}


def test_worker_lines_go_to_the_log_and_user_messages_to_the_console(tmp_path, capsys):
    console = install_console(tmp_path / "ray.log")
    try:
        console.on_worker_output(record("Setting up process group for: env:// [rank=0, world_size=2]",
                                        "[raylib_ad] warning: 3 images are smaller than --image-size"))
        for _ in range(5):
            console.on_worker_output(record("Failed to query Ray Train Controller actor state. State API may be "
                                            "temporarily unavailable.", actor="PlacementGroupCleaner"))
        console.on_worker_output({**record("autoscaler status table"), "pid": "autoscaler"})
    finally:
        console.close()
    err = capsys.readouterr().err
    assert "[raylib_ad] warning: 3 images" in err
    assert "process group" not in err and "State API" not in err
    log = (tmp_path / "ray.log").read_text()
    assert "(RayTrainWorker pid=123) Setting up process group" in log
    assert log.count("Failed to query Ray Train Controller") == 1  # kept once, with why
    assert "autoscaler status table" not in log
    assert "process group" in console.tail(5)


def test_relayed_progress_draws_one_bar_per_phase(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAYLIB_AD_PROGRESS", raising=False)
    monkeypatch.setenv(RELAY_ENV, "1")
    items = list(progress_bar(range(7), desc="padim features"))  # the worker side: marker lines on stdout
    counter = ProgressCounter("train epochs", total=3)
    counter.update(1, force=True, loss=0.5)
    counter.close()
    assert items == list(range(7))
    printed = capsys.readouterr().out.splitlines()
    records = [parse_marker(line) for line in printed]
    assert all(r is not None for r in records) and all(line.startswith(MARKER) for line in printed)
    assert records[-3]["desc"] == "padim features" and records[-3]["n"] == 7 and records[-3].get("done")
    assert records[-2] == {"desc": "train epochs", "n": 1, "total": 3, "postfix": {"loss": 0.5}}

    monkeypatch.delenv(RELAY_ENV)
    console = install_console(tmp_path / "ray.log")  # the driver side draws them
    try:
        console.on_worker_output(record(*printed))
    finally:
        console.close()
    err = capsys.readouterr().err
    assert "padim features" in err and "7/7" in err and "train epochs" in err
    assert MARKER not in (tmp_path / "ray.log").read_text()  # markers are drawn, not logged


def test_rays_driver_loggers_write_to_the_log_while_installed(tmp_path, capsys):
    ray_log = pytest.importorskip("ray._private.log")
    logger = logging.getLogger("ray.test_console")
    handler = ray_log.PlainRayHandler()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        console = install_console(tmp_path / "ray.log")
        logger.warning("Token authentication is enabled")
        console.close()
        logger.warning("after the run")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Token authentication" not in err and "after the run" in err
    assert "Token authentication is enabled" in (tmp_path / "ray.log").read_text()


def test_verbose_keeps_rays_printing(tmp_path, capsys):
    console = install_console(tmp_path / "ray.log", verbose=True)
    try:
        console.on_worker_output(record("[raylib_ad] hello"))
    finally:
        console.close()
    assert "hello" in (tmp_path / "ray.log").read_text()
