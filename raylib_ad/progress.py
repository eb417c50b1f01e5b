"""Progress bars that stay quiet where nobody is watching (CI, tests, non-rank-0 workers).

Inside a Ray Train worker nobody watches the worker's stderr: there the bars are relayed instead. A bar
prints a marker line (`[raylib_ad:progress] {json}`) at most once a second; Ray forwards worker output to
the driver, where raylib_ad/console.py draws one bar per phase from those lines and sends everything else
Ray prints to the run's log file. `RAYLIB_AD_PROGRESS_RELAY=1` selects the relay (set by the Ray glue).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")
RELAY_ENV = "RAYLIB_AD_PROGRESS_RELAY"
MARKER = "[raylib_ad:progress] "


def progress_enabled() -> bool:
    if os.environ.get("RAYLIB_AD_PROGRESS", "").lower() in {"0", "false", "no"}:
        return False
    return True


def relaying() -> bool:
    return os.environ.get(RELAY_ENV) == "1"


def progress_bar(iterable: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterable[T]:
    if not (enabled and progress_enabled()):
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if relaying():
        return _relayed(iterable, desc, total)
    from tqdm.auto import tqdm

    # mininterval keeps log files from filling with bar redraws when stderr is not a terminal. leave=True: a
    # bar ends drawn at its final count (a cleared bar leaves its first drawing, `0/1`, in a log file).
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10.0,
                leave=True, dynamic_ncols=True)


class ProgressCounter:
    """A bar advanced by hand (epochs of a stage): tqdm here, marker lines inside a relaying worker."""

    def __init__(self, desc: str, total: int | None, enabled: bool = True, unit: str = "it"):
        self.desc, self.total, self.n = desc, total, 0
        self._on = enabled and progress_enabled()
        self._relay = self._on and relaying()
        self._bar = None
        if self._on and not self._relay:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True)
        self._emitter = _Emitter(desc, total) if self._relay else None

    def update(self, n: int = 1, *, force: bool = False, **postfix: Any) -> None:
        """Advance by n; a relayed update is sent at most once a second unless `force`."""
        self.n += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif self._emitter is not None:
            self._emitter.emit(self.n, postfix, force=force)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._emitter is not None:
            self._emitter.emit(self.n, {}, force=True, done=True)


class _Emitter:
    def __init__(self, desc: str, total: int | None, min_interval_s: float = 1.0):
        self.desc, self.total, self.min_interval_s = desc, total, min_interval_s
        self._last = 0.0

    def emit(self, n: int, postfix: dict[str, Any] | None = None, *, force: bool = False, done: bool = False) -> None:
        now = time.monotonic()
        if not (force or done) and now - self._last < self.min_interval_s:
            return
        self._last = now
        record = {"desc": self.desc, "n": n, "total": self.total}
        if postfix:
            record["postfix"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in postfix.items()}
        if done:
            record["done"] = True
        # One write per line: Ray forwards worker stdout line by line.
        sys.stdout.write(MARKER + json.dumps(record) + "\n")
        sys.stdout.flush()


def _relayed(iterable: Iterable[T], desc: str, total: int | None) -> Iterator[T]:
    emitter = _Emitter(desc, total)
    n = 0
    emitter.emit(0, force=True)
    for item in iterable:
        yield item
        n += 1
        emitter.emit(n)
    emitter.emit(n, done=True)


def parse_marker(line: str) -> dict[str, Any] | None:
    """The record of a relayed progress line, or None for any other line."""
    start = line.find(MARKER)
    if start < 0:
        return None
    try:
        record = json.loads(line[start + len(MARKER):])
    except ValueError:
        return None
    return record if isinstance(record, dict) and "desc" in record else None
