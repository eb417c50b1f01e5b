"""The output directory of a run: never reused by surprise.

A second run with the same ``--out`` would replace the first one's model and metrics without a
word, and files only the first run wrote (heatmaps, training curves) would stay next to the
second run's numbers. So a non-empty ``--out`` is refused unless ``--overwrite`` is given; then
the old contents are removed first, so the directory holds one run only. ``--overwrite`` only
clears directories a raylib_ad run wrote (marker file, or a model/metrics.json), never some other
folder given by mistake.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from raylib_ad.errors import ConfigError

__all__ = ["MARKER", "prepare_out_dir"]

MARKER = ".raylib_ad_run"  # written into every output directory this module hands out


def _looks_like_a_run(out: Path) -> bool:
    # Directories written before the marker existed are recognised by what train always wrote.
    return (out / MARKER).is_file() or (out / "metrics.json").is_file() or (out / "model" / "config.json").is_file()


def _clear(out: Path) -> None:
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()  # a link is removed, never what it points to


RESUME_FILE = ".raylib_ad_resume.json"  # the options of a training run that has not finished yet


def unfinished_fit(out: Path, fingerprint: str | None) -> str | None:
    """The name of the Ray Train run an interrupted (killed, stalled) training left in ``out`` for the
    same options, so that the same command resumes it from its latest checkpoint; None otherwise."""
    try:
        saved = json.loads((out / RESUME_FILE).read_text())
    except (OSError, ValueError):
        return None
    if fingerprint is None or saved.get("fingerprint") != fingerprint or (out / "metrics.json").exists():
        return None
    fit = out / "ray_results" / str(saved.get("fit", ""))
    return fit.name if fit.is_dir() and any(fit.glob("checkpoint_*")) else None


def mark_unfinished(out: Path, fingerprint: str, fit: str) -> None:
    (out / RESUME_FILE).write_text(json.dumps({"fingerprint": fingerprint, "fit": fit}))


def mark_finished(out: Path) -> None:
    (out / RESUME_FILE).unlink(missing_ok=True)


def prepare_out_dir(out: str | Path, overwrite: bool = False, *, resume_fingerprint: str | None = None) -> Path:
    """Create ``out`` (or accept it when empty) and return it as an absolute path, marked as a run.

    Non-empty ``out``: ConfigError naming it and ``--overwrite``, unless ``overwrite``; with
    ``overwrite`` its contents are removed first, if it is a raylib_ad output directory. A training
    run that was interrupted in ``out`` with the same options (``resume_fingerprint``) is kept: the
    same command resumes it.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose a directory path")
    contents = [p for p in out.iterdir() if p.name != MARKER] if out.is_dir() else []
    if contents and not overwrite and unfinished_fit(out, resume_fingerprint):
        return out
    if contents:
        if not overwrite:
            raise ConfigError(f"--out {out} is not empty (it holds {_sample(contents)}); pass --overwrite "
                              f"to replace it, or choose a new directory")
        if not _looks_like_a_run(out):
            raise ConfigError(f"--out {out} is not empty and was not written by raylib_ad (no {MARKER}, "
                              f"metrics.json or model/); --overwrite clears only run directories: choose "
                              f"a new directory")
        _clear(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("written by raylib_ad; --overwrite may clear this directory\n")
    except OSError as exc:
        raise ConfigError(f"--out {out} cannot be created or written: {exc.strerror or exc}") from exc
    return out


def _sample(contents: list[Path], shown: int = 3) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in contents)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def link_tree(source: str | Path, target: str | Path) -> Path:
    """`target` as a copy of the directory `source` made of hard links (one copy of the bytes on disk),
    file by file falling back to a real copy where links cannot be made (another file system)."""
    import os

    source, target = Path(source), Path(target)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for path in source.rglob("*"):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
    return target
