#!/usr/bin/env bash
# Creates .venv/ at the repo root and installs raylib_ad with its test extras.
# torch goes first: on this project's CI machines pip serves torch<=2.14.1 from local disk.
# Elsewhere, TORCH_SPEC="torch torchvision" (or a CUDA index of your choice) takes current releases.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install -q -e ".[test]"
