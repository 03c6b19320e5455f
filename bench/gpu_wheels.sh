#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, lightning, transformers and peft, but not diffusers), saved to
# .whl/ (git-ignored) for bench/gpu_check.sh; run where pip reaches PyPI, then carry .whl with the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata
ls -l .whl
