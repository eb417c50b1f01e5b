"""The anomalib virtual environment the parity harness runs anomalib in (never a dependency of raylib_ad).

Pins: torch 2.14.1 / torchvision 0.29.1 first (the versions this project's CI serves), then anomalib 2.7.0,
whose own requirements cover every torch model the harness builds (no extras needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_VENV = Path(os.environ.get("RAYLIB_AD_ANOMALIB_VENV", "/work/anomalib_venv"))
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
ANOMALIB_PIN = "anomalib==2.7.0"
ANOMALIB_VERSION = "2.7.0"


class AnomalibVenvError(RuntimeError):
    pass


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def anomalib_version(venv: Path) -> str | None:
    python = venv_python(venv)
    if not python.is_file():
        return None
    probe = subprocess.run([str(python), "-c", "import anomalib, torch; print(anomalib.__version__)"],
                           capture_output=True, text=True, timeout=300)
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_venv(venv: Path = DEFAULT_VENV, create: bool = True, log=print) -> tuple[Path, dict]:
    """Return (python, info) of a venv holding anomalib 2.7.0: reuse it, or create it from PyPI when
    `create`. Raises AnomalibVenvError with what was tried and how to fix it."""
    venv = Path(venv)
    found = anomalib_version(venv)
    if found == ANOMALIB_VERSION:
        return venv_python(venv), {"venv": str(venv), "created": False, "anomalib": found}
    if found is not None:
        raise AnomalibVenvError(f"{venv} holds anomalib {found}, the harness needs {ANOMALIB_VERSION}: "
                                f"remove it or pass --anomalib-venv to a new path")
    if not create:
        raise AnomalibVenvError(f"no anomalib {ANOMALIB_VERSION} venv at {venv} (and creation was not asked "
                                f"for): create it with `python3 -m venv {venv} && {venv}/bin/pip install "
                                f"{' '.join(TORCH_PINS)} && {venv}/bin/pip install {ANOMALIB_PIN}`")
    timings = {}
    steps = [
        ("venv", [sys.executable, "-m", "venv", str(venv)]),
        ("torch", [str(venv_python(venv)), "-m", "pip", "install", "-q", *TORCH_PINS]),
        ("anomalib", [str(venv_python(venv)), "-m", "pip", "install", "-q", ANOMALIB_PIN]),
    ]
    for name, cmd in steps:
        log(f"[parity] creating the anomalib venv: {' '.join(cmd)}")
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        timings[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise AnomalibVenvError(f"could not create the anomalib venv at {venv}: `{' '.join(cmd)}` failed "
                                    f"(exit {done.returncode}):\n{tail}\nIt needs PyPI (or a mirror) for "
                                    f"{' '.join(TORCH_PINS)} and {ANOMALIB_PIN}.")
    found = anomalib_version(venv)
    if found != ANOMALIB_VERSION:
        raise AnomalibVenvError(f"created {venv}, but `import anomalib` there gives {found!r}")
    return venv_python(venv), {"venv": str(venv), "created": True, "anomalib": found, **timings}
