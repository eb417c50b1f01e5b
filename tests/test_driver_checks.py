"""Every option and model setting is checked on the driver, before Ray starts (no Ray is started, so it
takes seconds, not a worker retry loop): one line naming the option or setting and what is valid; nothing
in --out is touched."""

from __future__ import annotations

import pytest

from raylib_ad.cli import main


def train(root, tmp_path, *extra):
    return ["train", "--model", "padim", "--data", "synthetic", "--root", str(root), "--category", "widget",
            "--backbone", "resnet18", "--set", "pretrained=false", "--out", str(tmp_path / "run"), "--no-mlflow",
            *extra]


@pytest.mark.parametrize("extra, words", [
    (["--set", "nonsense=1"], ["nonsense", "valid"]),
    (["--workers", "0"], ["--workers", ">= 1"]),
    (["--image-size", "7"], ["--image-size", "[32, 4096]"]),
    (["--batch-size", "1", "--workers", "2"], ["--batch-size", ">= --workers"]),
    (["--val-fraction", "1.5"], ["--val-fraction", "(0, 1)"]),
    (["--max-epochs", "0"], ["--max-epochs", ">= 1"]),
    (["--workers", "1000"], ["--workers 1000", "at most"]),
    (["--set", "n_features=100000"], ["n_features", "[1,"]),
])
def test_bad_options_fail_in_one_line_before_ray(synthetic_root, tmp_path, capsys, monkeypatch, extra, words):
    import ray

    from raylib_ad.train import ray_setup

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run that bad options should have stopped")

    monkeypatch.setattr(ray_setup, "ensure_ray", no_ray)
    was_up = ray.is_initialized()  # another test module may hold the session's Ray cluster
    code = main(train(synthetic_root, tmp_path, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    message = next(line for line in err if "error" in line.lower())
    for word in words:
        assert word in message, message
    assert not (tmp_path / "run").exists()  # nothing written, no earlier run touched
    assert ray.is_initialized() == was_up
