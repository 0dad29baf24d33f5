#!/usr/bin/env bash
# One device call: build with CUDA, run the suite (CPU + CUDA cases), compute-sanitizer over the
# CUDA op tests, and the GPU benchmarks. Logs go to $OUT (the device tool) or ./runs/gpu.
#   bash scripts/gpu_check.sh            (on a machine with nvcc and a CUDA torch)
set -uo pipefail
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; nvcc --version | tail -2;
  "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/machine.txt"

step "build (PYFLOWMAP_CUDA=ON)"
PYFLOWMAP_CUDA=ON MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -v > "$OUT/build.log" 2>&1
rc=$?; tail -5 "$OUT/build.log"; grep -E "pyflowmap:" "$OUT/build.log"
[ $rc -eq 0 ] || { echo "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
"$PY" -c "import pyflowmap; print(pyflowmap.build_info())" | tee -a "$OUT/machine.txt"

step "tests (cpu + cuda)"
"$PY" -m pytest tests -q -p no:cacheprovider -x --timeout=600 2>&1 | tee "$OUT/tests.log" | tail -25

step "compute-sanitizer memcheck + racecheck over the CUDA op tests"
for tool in memcheck racecheck; do
  PYFLOWMAP_TEST_DEVICES=cuda HYPOTHESIS_PROFILE=ci compute-sanitizer --tool $tool --error-exitcode 9 \
    --target-processes all "$PY" -m pytest tests/test_ops_sampler.py -q -p no:cacheprovider \
    -k "not compile and not opcheck" > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool exit $?: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer_$tool.log" | tr '\n' ' ')"
done

step "benchmarks (cuda)"
PYFLOWMAP_BENCH_DEVICES=cuda "$PY" -m pytest benchmarks/test_bench_flowmap_step.py -q -p no:cacheprovider \
  --benchmark-json "$OUT/bench_step.json" --benchmark-columns=median,iqr > "$OUT/bench.log" 2>&1
echo "bench exit $?"
"$PY" benchmarks/report.py "$OUT/bench_step.json" | tee "$OUT/bench_step.md"
