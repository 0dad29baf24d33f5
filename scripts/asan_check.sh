#!/usr/bin/env bash
# The C++ ops under AddressSanitizer + UndefinedBehaviorSanitizer (CPU): a separate venv and
# build directory with PYFLOWMAP_ASAN=ON, then the hostile-input fuzzing and the op tests with
# libasan preloaded into Python. Any heap overflow, use-after-free or UB in a kernel or its
# checks aborts the run with a report.
#   bash scripts/asan_check.sh [pytest args]      (default: the hostile-input and op tests)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYFLOWMAP_VENV="${PYFLOWMAP_VENV_ASAN:-$ROOT/.venv-asan}"
export PYFLOWMAP_ASAN=ON PYFLOWMAP_CUDA=OFF
# its own build tree: the normal build must never pick up the sanitizer flags from a cache
export SKBUILD_BUILD_DIR="$ROOT/build/asan"
libasan="$(gcc -print-file-name=libasan.so)"
libubsan="$(gcc -print-file-name=libubsan.so)"
[ -f "$libasan" ] || { echo "[asan] libasan not found (gcc -print-file-name=libasan.so)"; exit 1; }
# Python and torch keep allocations alive at exit by design: leak checking would only report them
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
SETUP_PRELOAD="$libasan $libubsan" bash scripts/setup.sh test
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-sanitizer}"
if [ $# -eq 0 ]; then
  set -- tests/test_hostile_inputs.py tests/test_ops_sampler.py tests/test_ops_dual_act.py tests/test_ops_dual_norm.py \
         tests/test_ops_dual_linear.py tests/test_ops_losses.py tests/test_ops_dual_attention.py
fi
# an ASan build refuses to load without the runtime first: proof that the sanitizer is in
if "$PYFLOWMAP_VENV/bin/python" -c "import pyflowmap" 2>/dev/null; then
  echo "[asan] the build in $PYFLOWMAP_VENV is not instrumented"; exit 1
fi
LD_PRELOAD="$libasan $libubsan" "$PYFLOWMAP_VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
echo "[asan] clean: no AddressSanitizer or UBSan report"
