#!/usr/bin/env bash
# The main job: set up .venv, train a flow map on the 2D checkerboard (LSD, CPU-sized), sample
# it with 1, 2, 4 and 8 steps, write runs/demo/samples.png and metrics.json, print the table.
#   bash scripts/demo.sh [pyflowmap demo args, e.g. --objective psd-m --steps 1000]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" plots
cd "$ROOT"
exec "${PYFLOWMAP_VENV:-$ROOT/.venv}/bin/python" -m pyflowmap demo "$@"
