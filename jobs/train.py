"""Entry point for `ray job submit --working-dir . -- python jobs/train.py --model patchcore ...`.

Same arguments as `raylib-ad train`; under `ray job submit` RAY_ADDRESS points at the cluster and the
run joins it instead of starting a local Ray.

A submitted job runs in Ray's temporary copy of the working directory, deleted with the Ray session,
so the default MLflow store (./mlflow.db) would vanish with it. The README passes an absolute
MLFLOW_TRACKING_URI in the runtime env; a relative sqlite URI (or the default) is taken relative to
$RAYLIB_AD_SUBMIT_DIR when that is passed instead. Either way the job says where its run goes.
"""

import os
import sys
from pathlib import Path

from raylib_ad.cli import main
from raylib_ad.tracking.mlflow_run import SUBMIT_DIR_ENV, in_ray_job_copy, job_tracking_uri


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: list[str]) -> int:
    uri = None
    if "--no-mlflow" not in args:
        uri, warning = job_tracking_uri()
        os.environ["MLFLOW_TRACKING_URI"] = uri  # what the training run logs to, resolved once here
        _say(f"[raylib_ad] MLflow: this job logs its run to {uri}")
        if warning:
            _say(warning)
    out = _option(args, "--out") or "runs/latest"
    if in_ray_job_copy() and not Path(out).is_absolute():
        base = os.environ.get(SUBMIT_DIR_ENV)
        if base:
            args = [*args, "--out", str(Path(base) / out)]  # the last --out wins in argparse
        else:
            _say(f"[raylib_ad] WARNING: --out {out} is relative, so it lies in Ray's temporary copy of the "
                 f"working directory ({Path(out).resolve()}) and is deleted with the Ray session; "
                 f"pass an absolute --out on storage you keep.")
    code = main(["train", *args])
    if uri is not None and code == 0:
        _say(f"[raylib_ad] MLflow: the run is in {uri} (mlflow ui --backend-store-uri {uri})")
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
