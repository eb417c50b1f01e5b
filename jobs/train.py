"""Entry point for `ray job submit --working-dir . -- python jobs/train.py --model patchcore ...`.

Same arguments as `raylib-ad train`; under `ray job submit` RAY_ADDRESS points at the cluster and the
run joins it instead of starting a local Ray."""

import sys

from raylib_ad.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
