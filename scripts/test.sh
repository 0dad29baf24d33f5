#!/usr/bin/env bash
# The test command: set up .venv (torch, build, test extras) and run the whole suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" test,plots,images,track
cd "$ROOT"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
exec "${PYFLOWMAP_VENV:-$ROOT/.venv}/bin/python" -m pytest tests -q "$@"
