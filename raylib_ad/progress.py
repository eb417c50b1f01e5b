"""Progress bars that stay quiet where nobody is watching (CI, tests, non-rank-0 workers)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    if os.environ.get("RAYLIB_AD_PROGRESS", "").lower() in {"0", "false", "no"}:
        return False
    return True


def progress_bar(iterable: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterable[T]:
    if not (enabled and progress_enabled()):
        return iterable
    from tqdm.auto import tqdm

    # mininterval keeps log files from filling with bar redraws when stderr is not a terminal.
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10.0,
                leave=False, dynamic_ncols=True)
