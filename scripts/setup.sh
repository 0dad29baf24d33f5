#!/usr/bin/env bash
# Create (or reuse) the project virtual environment and install pyflowmap into it, editable.
#   scripts/setup.sh [extras]        e.g. scripts/setup.sh test,plots
# Environment: PYFLOWMAP_VENV (default ./.venv), PYTHON (default python3),
#              TORCH_SPEC (default torch==2.13.0, the CPU wheel on these machines; a CUDA user
#              passes e.g. "torch==2.11.0" with their index), PYFLOWMAP_CUDA=AUTO|ON|OFF.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PYFLOWMAP_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
# torch is not a build requirement (build isolation would pull another torch), so the build
# tools live in the venv and the package is built against the torch installed above.
"${PIP[@]}" install "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.24"
target="$ROOT"
[ -n "$EXTRAS" ] && target="$ROOT[$EXTRAS]"
echo "[setup] building pyflowmap (first build ~1 minute on 2 cores)"
"${PIP[@]}" install --no-build-isolation -e "$target"
# SETUP_PRELOAD: the sanitizer runtimes an ASan build needs loaded first (scripts/asan_check.sh)
LD_PRELOAD="${SETUP_PRELOAD:-}" "$VENV/bin/python" -c "import pyflowmap; print('[setup] pyflowmap', pyflowmap.__version__, pyflowmap.build_info())"
