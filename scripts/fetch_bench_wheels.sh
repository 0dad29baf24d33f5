#!/usr/bin/env bash
# Download the comparator packages the GPU benchmarks measure against into .whl/ (for the
# offline GPU machine: carry .whl; scripts/gpu_check.sh installs them). Needs network.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "jvp-flash-attention==0.14.0"
ls -la .whl
