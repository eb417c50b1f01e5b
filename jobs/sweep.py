"""Entry point for `ray job submit --working-dir . -- python jobs/sweep.py --model patchcore,padim ...`.

Same arguments as `raylib-ad sweep`; under `ray job submit` RAY_ADDRESS points at the cluster and the
sweep's trials are spread over its nodes. --out and the dataset root must be on storage every node sees.
The sweep's MLflow runs are logged by this driver: like jobs/train.py it resolves the tracking store once
(an absolute MLFLOW_TRACKING_URI from the runtime env, or one relative to $RAYLIB_AD_SUBMIT_DIR) and says
where the runs go."""

import os
import sys

from raylib_ad.cli import main
from raylib_ad.tracking.mlflow_run import job_tracking_uri


def run(args: list[str]) -> int:
    if "--no-mlflow" not in args:
        uri, warning = job_tracking_uri()
        os.environ["MLFLOW_TRACKING_URI"] = uri
        print(f"[raylib_ad] MLflow: this sweep logs its runs to {uri}", file=sys.stderr, flush=True)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    return main(["sweep", *args])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
