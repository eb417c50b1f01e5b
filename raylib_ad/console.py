"""A quiet console for runs on Ray: the user sees one bar per phase, the split, warnings meant for them and
the summary; everything Ray prints goes to a log file in the output directory instead.

Ray forwards every worker's stdout/stderr to the driver (log_to_driver) and prints it there, along with
its own driver-side loggers. `RayConsole` replaces that printer with one that
- draws the progress bars the workers relay (raylib_ad/progress.py marker lines) with tqdm,
- passes worker lines that start with "[raylib_ad]" (messages meant for the user) to stderr,
- writes every other line, and what Ray's Python loggers and warnings print on the driver, to the log file.
`verbose=True` keeps Ray's own printing as well. On failure `tail()` gives the last lines of the log.

Both hooks are Ray internals (the worker stdstream dispatcher, the PlainRayHandler class); where one is
missing (another Ray version), that part of Ray's output is printed as it always was. Lines that Ray's C++
core writes straight to the driver's stderr cannot be caught this way.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from raylib_ad.progress import parse_marker, progress_enabled

_HANDLER_NAME = "raylib_ad_console"
_RAY_PRINTER = "ray_print_logs"
_USER_PREFIX = "[raylib_ad]"
_current: "RayConsole | None" = None
# Lines Ray repeats every few seconds, harmless here: kept once in the log, with why.
_REPEATED_NOISE = {
    "Failed to query Ray Train Controller actor state": "Ray Train's PlacementGroupCleaner asks the State API, "
    "which the private local Ray (started without its dashboard, to save memory and start-up time) does not "
    "serve; harmless. Further repeats are left out of this log.",
}
_LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


class RayConsole:
    def __init__(self, log_file: str | Path, *, verbose: bool = False, progress: bool = True):
        self.log_file = Path(log_file)
        self.verbose = verbose
        self.progress = progress and progress_enabled()
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}
        self._recent: deque[str] = deque(maxlen=200)
        self._stream = None
        self._patched = None
        self._noise_seen: set[str] = set()
        self._data_bars: bool | None = None
        self._ray_printer = None
        self._showwarning = None

    # --- lifecycle ---------------------------------------------------------------------------------
    def install(self) -> "RayConsole":
        global _current
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(self.log_file, "a", buffering=1, encoding="utf-8")
        self._redirect_loggers()
        self._redirect_warnings()
        _current = self
        return self

    def attach_ray(self) -> None:
        """Take over the printing of worker output; call once Ray is initialised (ray.init installs
        its printer). Idempotent."""
        if getattr(self, "_dispatcher", None) is None:
            self._hook_worker_output()
        if not self.verbose and self._data_bars is None:
            # Ray Data's per-operator bars, redrawn every second per dataset: the phases' own bars replace
            # them. Datasets take the driver's DataContext with them, into the Ray Train workers too.
            from ray.data import DataContext

            context = DataContext.get_current()
            self._data_bars = context.enable_progress_bars
            context.enable_progress_bars = False

    def close(self) -> None:
        global _current
        self._unhook_worker_output()
        if self._showwarning is not None:
            warnings.showwarning = self._showwarning
            self._showwarning = None
        if self._data_bars is not None:
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = self._data_bars
            self._data_bars = None
        if self._patched is not None:
            cls, original = self._patched
            cls.emit = original
            self._patched = None
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if _current is self:
            _current = None

    def __enter__(self) -> "RayConsole":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()

    def tail(self, lines: int = 40) -> str:
        with self._lock:
            return "\n".join(list(self._recent)[-lines:])

    # --- Ray's Python loggers and warnings ---------------------------------------------------------
    def _redirect_loggers(self) -> None:
        """Ray's loggers ("ray", "ray.data", ...) print through PlainRayHandler, which Ray re-creates as it
        (re)configures logging (at ray.init, per Ray Data execution): so the class is patched, not its
        instances, while this console is installed."""
        try:
            from ray._private.log import PlainRayHandler
        except ImportError:  # another Ray version: its loggers keep printing
            return
        console, original = self, PlainRayHandler.emit

        def emit(handler, record):
            if console.verbose or _current is not console:
                original(handler, record)
            else:
                console._write(_LOG_FORMAT.format(record))

        self._patched = (PlainRayHandler, original)
        PlainRayHandler.emit = emit

    def _redirect_warnings(self) -> None:
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "/ray/" in str(filename).replace("\\", "/") and not self.verbose:
                self._write(f"{category.__name__}: {message} ({filename}:{lineno})")
                return
            original(message, category, filename, lineno, file, line)

        self._showwarning = original
        warnings.showwarning = show

    # --- worker output ----------------------------------------------------------------------------
    def _hook_worker_output(self) -> None:
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # another Ray version: it keeps printing as it does
            return
        self._dispatcher = dispatcher
        with dispatcher._lock:
            printers = [pair for pair in dispatcher.handlers if pair[0] == _RAY_PRINTER]
        if printers and not self.verbose:
            self._ray_printer = printers[0]
            dispatcher.remove_handler(_RAY_PRINTER)
        dispatcher.add_handler(_HANDLER_NAME, self.on_worker_output)

    def _unhook_worker_output(self) -> None:
        dispatcher = getattr(self, "_dispatcher", None)
        if dispatcher is None:
            return
        dispatcher.remove_handler(_HANDLER_NAME)
        if self._ray_printer is not None:
            with dispatcher._lock:
                if not any(name == _RAY_PRINTER for name, _ in dispatcher.handlers):
                    dispatcher.handlers.append(self._ray_printer)
            self._ray_printer = None

    def on_worker_output(self, data: dict[str, Any]) -> None:
        """One batch of lines from one worker process (Ray's log monitor record)."""
        if data.get("pid") == "autoscaler" and not self.verbose:
            return  # the autoscaler's status table every 5 s: Ray itself shows only its events
        origin = data.get("actor_name") or data.get("task_name") or "worker"
        origin = f"({origin} pid={data.get('pid')})"
        for line in data.get("lines", []):
            record = parse_marker(line)
            if record is not None:
                self._draw(record)
                continue
            noise = next((key for key in _REPEATED_NOISE if key in line), None)
            if noise is not None:
                if noise in self._noise_seen:
                    continue
                self._noise_seen.add(noise)
                line = f"{line} [raylib_ad: {_REPEATED_NOISE[noise]}]"
            self._write(f"{time.strftime('%H:%M:%S')} {origin} {line}")
            if not self.verbose and line.lstrip().startswith(_USER_PREFIX):
                self._print_user(line.strip())

    # --- output --------------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        with self._lock:
            self._recent.append(text)
            if self._stream is not None:
                try:
                    self._stream.write(text.rstrip("\n") + "\n")
                except ValueError:  # closed under us at shutdown
                    pass

    def _print_user(self, line: str) -> None:
        with self._lock:
            from tqdm.auto import tqdm

            tqdm.write(line, file=sys.stderr)

    def _draw(self, record: dict[str, Any]) -> None:
        if not self.progress:
            return
        from tqdm.auto import tqdm

        desc, total = str(record["desc"]), record.get("total")
        with self._lock:
            bar = self._bars.get(desc)
            if bar is None:
                # Phases follow one another: a new bar closes the ones before it. One that did not finish (its
                # worker's last record is yet to come, or another worker's phase came in between) is
                # cleared rather than left on screen at `0/1`; a record still to come draws it again.
                for other in self._bars.values():
                    if other.total is not None and other.n < other.total:
                        other.leave = False
                    other.close()
                self._bars.clear()
                bar = tqdm(desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, leave=True)
                self._bars[desc] = bar
            if total is not None and bar.total != total:
                bar.total = total
            if record.get("postfix"):
                bar.set_postfix(record["postfix"], refresh=False)
            bar.update(max(0, int(record.get("n", 0)) - bar.n))
            if record.get("done"):
                bar.close()
                del self._bars[desc]


def current() -> RayConsole | None:
    """The console installed by this process's run, if any (for printing the log tail on failure)."""
    return _current


def install_console(log_file: str | Path, *, verbose: bool = False, progress: bool = True) -> RayConsole:
    """Install a console writing Ray's output to `log_file` (before ray.init, so that Ray's start-up lines
    go there too; then `attach_ray()`). A second call replaces the installed console."""
    if _current is not None:
        _current.close()
    return RayConsole(log_file, verbose=verbose, progress=progress).install()
