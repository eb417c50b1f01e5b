"""--out is never reused by surprise: refused when non-empty, cleared only with --overwrite."""

import pytest

from raylib_ad.errors import ConfigError
from raylib_ad.outdir import MARKER, prepare_out_dir


def earlier_run(out):
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    (out / "metrics.json").write_text('{"image_auroc": 0.9}')
    (out / "heatmaps.png").write_bytes(b"png")
    return out


def test_new_or_empty_directory_is_created_and_marked(tmp_path):
    out = prepare_out_dir(tmp_path / "runs" / "a", overwrite=False)
    assert out == tmp_path / "runs" / "a" and out.is_absolute() and (out / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    assert prepare_out_dir(tmp_path / "empty", False) == tmp_path / "empty"
    # A run that died before writing anything leaves only the marker: reusing it loses nothing.
    assert prepare_out_dir(out, False) == out


def test_an_earlier_run_is_refused_in_one_line_naming_the_directory_and_the_flag(tmp_path):
    out = earlier_run(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        prepare_out_dir(out, overwrite=False)
    message = str(info.value)
    assert "\n" not in message and str(out) in message and "--overwrite" in message
    assert "metrics.json" in message
    assert (out / "metrics.json").read_text() == '{"image_auroc": 0.9}'  # untouched


def test_overwrite_replaces_the_earlier_run_entirely(tmp_path):
    out = earlier_run(tmp_path / "run")
    outside = tmp_path / "keep.txt"
    outside.write_text("mine")
    (out / "link").symlink_to(outside)
    assert prepare_out_dir(out, overwrite=True) == out
    assert sorted(p.name for p in out.iterdir()) == [MARKER]  # no stale heatmaps next to new numbers
    assert outside.read_text() == "mine"  # a link is removed, not what it points to


def test_overwrite_never_clears_a_folder_raylib_ad_did_not_write(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not written by raylib_ad"):
        prepare_out_dir(tmp_path / "photos", overwrite=True)
    assert (tmp_path / "photos" / "holiday.jpg").exists()


def test_a_file_is_not_an_output_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_out_dir(tmp_path / "f", overwrite=True)


def test_the_same_command_resumes_an_interrupted_run_and_other_options_are_refused(tmp_path):
    from raylib_ad.outdir import mark_finished, mark_unfinished, unfinished_fit

    out = prepare_out_dir(tmp_path / "run")
    checkpoint = out / "ray_results" / "fit-1" / "checkpoint_2026-12-08_01-00-00"
    checkpoint.mkdir(parents=True)
    (out / "ray.log").write_text("...")
    mark_unfinished(out, "same-options", "fit-1")  # a run killed or stalled after its first checkpoint
    assert prepare_out_dir(out, resume_fingerprint="same-options") == out  # kept, not refused or cleared
    assert unfinished_fit(out, "same-options") == "fit-1" and checkpoint.is_dir()
    with pytest.raises(ConfigError, match="--overwrite"):  # another command must still say --overwrite
        prepare_out_dir(out, resume_fingerprint="other-options")
    mark_finished(out)  # a finished run is never resumed
    assert unfinished_fit(out, "same-options") is None
