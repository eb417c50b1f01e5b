"""Entry point for `ray job submit --working-dir . -- python jobs/sweep.py --model patchcore,padim ...`.

Same arguments as `raylib-ad sweep`; under `ray job submit` RAY_ADDRESS points at the cluster and the
sweep's trials are spread over its nodes. --out and the dataset root must be on storage every node sees."""

import sys

from raylib_ad.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
