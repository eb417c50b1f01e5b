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


def test_a_phase_interrupted_by_another_is_not_left_on_screen_unfinished(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAYLIB_AD_PROGRESS", raising=False)
    console = install_console(tmp_path / "ray.log")
    try:  # two sweep trials: one starts scoring, the other's epochs come in before it ends
        console.on_worker_output(record(MARKER + '{"desc": "scoring", "n": 0, "total": 1}'))
        console.on_worker_output(record(MARKER + '{"desc": "main epochs", "n": 1, "total": 2}', pid=124))
        console.on_worker_output(record(MARKER + '{"desc": "main epochs", "n": 2, "total": 2, "done": true}',
                                        pid=124))
        console.on_worker_output(record(MARKER + '{"desc": "scoring", "n": 1, "total": 1, "done": true}'))
    finally:
        console.close()
    err = capsys.readouterr().err  # what stays on screen: each line's last redraw after a carriage return
    final = [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.strip()]
    assert not any("0/1" in line for line in final)  # nothing ends drawn at 0/1
    assert any("scoring" in line and "1/1" in line for line in final)


def test_collect_stages_have_a_total_and_gradient_bars_move_with_every_batch(monkeypatch, capsys):
    """A Collect stage's bar knows how many batches come (`patchcore features: 3/3`, with an ETA); an
    epoch-budget bar advances per step (9 steps of 3 epochs), not once per epoch."""
    import torch

    from raylib_ad.train.in_process import fit_in_process
    from tests.test_runner import Toy, images

    monkeypatch.delenv("RAYLIB_AD_PROGRESS", raising=False)
    monkeypatch.setenv(RELAY_ENV, "1")
    seen = {}

    class Counted(Toy):
        def collect(self, batches, progress):
            seen["len"] = len(batches)
            for _ in progress_bar(batches, desc="toy features", enabled=progress):
                pass
            self.center = torch.zeros(3)

    fit_in_process(Counted(image_size=32), images(7), batch_size=3, progress=True)
    records = [parse_marker(line) for line in capsys.readouterr().out.splitlines()]
    records = [r for r in records if r]
    assert seen["len"] == 3
    collect = [r for r in records if r["desc"] == "toy features"]
    assert collect[0]["total"] == 3 and collect[-1]["n"] == 3 and collect[-1].get("done")
    train = [r for r in records if r["desc"] == "train epochs"]
    assert {r["total"] for r in train} == {9}
    assert train[-1]["n"] == 9 and train[-1].get("done")
    assert len({r["n"] for r in train}) >= 4  # it moved inside epochs, not only at their ends
    assert any(r.get("postfix", {}).get("epoch") == "2/3" for r in train)  # the epoch is in the postfix


def test_evaluate_counts_images_as_train_does(monkeypatch, capsys):
    from raylib_ad.evaluation import _score_split_in_process
    from tests.test_runner import Toy

    import pyarrow as pa

    monkeypatch.delenv("RAYLIB_AD_PROGRESS", raising=False)
    monkeypatch.setenv(RELAY_ENV, "1")
    monkeypatch.setattr("raylib_ad.evaluation.decode_all", lambda table, size, mean, std, batch_size: iter(
        [{"index": [0, 1, 2], "image": __import__("numpy").zeros((3, 3, 32, 32), "float32"),
          "mask": __import__("numpy").zeros((3, 32, 32), "uint8")},
         {"index": [3, 4], "image": __import__("numpy").zeros((2, 3, 32, 32), "float32"),
          "mask": __import__("numpy").zeros((2, 32, 32), "uint8")}]))
    table = pa.table({"label": [0, 1, 0, 1, 0]})
    _score_split_in_process(Toy(image_size=32), table, batch_size=3, progress=True)
    records = [r for r in map(parse_marker, capsys.readouterr().out.splitlines()) if r]
    assert records[-1] == {"desc": "scoring", "n": 5, "total": 5, "done": True}


def test_ctrl_c_prints_one_line_and_no_traceback(monkeypatch, capsys, tmp_path):
    from raylib_ad import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_predict", interrupted)
    image = tmp_path / "a.png"
    assert cli.main(["predict", "--model", str(tmp_path), str(image), "--out", str(tmp_path / "s.parquet")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "interrupted" in err and "s.parquet" in err
