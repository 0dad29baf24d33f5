#!/usr/bin/env bash
# One device call: build with CUDA, run the suite (CPU + CUDA cases), compute-sanitizer over the
# CUDA op tests, and the GPU benchmarks. Logs go to $OUT (the device tool) or ./runs/gpu.
#   bash scripts/gpu_check.sh            (on a machine with nvcc and a CUDA torch)
# FAST=1 (a short device budget, ~5 minutes on an H200): the CUDA op tests only, memcheck only
# over the smallest shapes, and the headline benchmarks (fused losses, attention at N = 4k/8k,
# the DiT and sCM steps); the other knobs below still override it. The full run adds the
# bf16 / fp16 autocast tests on CUDA and benchmarks/test_bench_precision.py (fp32 vs bf16, dual
# vs jvp, eager vs compiled; its compiles take a few minutes).
# Knobs for a short device budget: SANITIZERS="memcheck" (default both), SKIP_BENCH=1,
# SANITIZE_TESTS="tests/test_ops_dual_attention.py" (default: sampler + attention op tests),
# BENCH="benchmarks/test_bench_attention.py" (default: every CUDA benchmark file).
# Comparator wheels (jvp-flash-attention): run `bash scripts/fetch_bench_wheels.sh` on a machine
# with network first and carry .whl; they are installed into /tmp/site here when present.
# Expected: build ~1 min, tests ~2 min, sanitizers ~2-3 min, benchmarks ~3-4 min on an H100/H200.
set -uo pipefail
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ -n "${FAST:-}" ]; then
  SANITIZERS="${SANITIZERS:-memcheck}"
  SANITIZE_TESTS="${SANITIZE_TESTS:-tests/test_ops_sampler.py}"
  TESTS="${TESTS:-tests/test_ops_cuda.py tests/test_ops_sampler.py tests/test_ops_dual_attention.py tests/test_ops_losses.py tests/test_sampling.py tests/test_scm.py tests/test_autocast.py}"
  BENCH="${BENCH:-benchmarks/test_bench_cuda.py benchmarks/test_bench_attention.py benchmarks/test_bench_transformer.py benchmarks/test_bench_scm.py}"
  BENCH_K="${BENCH_K:-not 16384 and not 1024}"
fi
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; nvcc --version | tail -2;
  "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/machine.txt"

step "build (PYFLOWMAP_CUDA=ON)"
PYFLOWMAP_CUDA=ON MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . -v > "$OUT/build.log" 2>&1
rc=$?; tail -5 "$OUT/build.log"; grep -E "pyflowmap:" "$OUT/build.log"
[ $rc -eq 0 ] || { echo "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
"$PY" -c "import pyflowmap; print(pyflowmap.build_info())" | tee -a "$OUT/machine.txt"

step "environment details"
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/machine.txt"
import torch, pybind11, subprocess
print("cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI, "pybind11", pybind11.__version__)
print("\n".join(torch.__config__.show().splitlines()[:6]))
PYEOF

step "toolchain: is libstdc++ linked statically into the extension?"
so=$("$PY" -c "import pyflowmap._C as m; print(m.__file__)")
echo "$so"; ldd "$so" | grep -E "stdc|gcc_s" || true
echo "ostream<long> instantiations inside the .so: $(nm -C "$so" 2>/dev/null | grep -c '_M_insert<long>')"
g++ -dumpspecs 2>/dev/null | grep -n -i "static-libstdc\|static-libgcc" | head -5; ls -la /usr/bin/g++* 2>/dev/null | head -3

step "smoke: every bad-input case must raise, not crash (each in its own process)"
smoke_fail=0
for case in "x, x[:2], 0.0, 1.0" "x, x.double(), 0.0, 1.0" "x.int(), x.int(), 0, 1" "x[0, 0], x[0, 0], 0.0, 1.0"; do
  "$PY" -X faulthandler -c "import torch, pyflowmap
x = torch.randn(4, 3)
try:
    pyflowmap.ops.flowmap_step($case)
except RuntimeError as e:
    print('raised:', str(e).splitlines()[0])" > "$OUT/smoke.log" 2>&1
  rc=$?; echo "rc=$rc  $case  $(head -1 "$OUT/smoke.log")"
  if [ $rc -ne 0 ]; then smoke_fail=1; tail -30 "$OUT/smoke.log"; fi
done
if [ $smoke_fail -ne 0 ] && command -v cuda-gdb >/dev/null; then
  printf 'import torch, pyflowmap\nx = torch.randn(4, 3)\npyflowmap.ops.flowmap_step(x, x[:2], 0.0, 1.0)\n' > /tmp/crash.py
  cuda-gdb -batch -ex run -ex bt --args "$PY" /tmp/crash.py > "$OUT/gdb.log" 2>&1; grep -A25 "SIGSEGV" "$OUT/gdb.log" | head -40
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  step "comparator wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && ls /tmp/site
fi

step "tests (cpu + cuda)"
"$PY" -m pytest ${TESTS:-tests} -q -p no:cacheprovider -x --timeout=600 2>&1 | tee "$OUT/tests.log" | tail -25

step "compute-sanitizer memcheck + racecheck over the CUDA op tests"
for tool in ${SANITIZERS:-memcheck racecheck}; do
  PYFLOWMAP_TEST_DEVICES=cuda HYPOTHESIS_PROFILE=sanitizer compute-sanitizer --tool $tool --error-exitcode 9 \
    --target-processes all "$PY" -m pytest ${SANITIZE_TESTS:-tests/test_ops_sampler.py tests/test_ops_dual_attention.py} -q -p no:cacheprovider \
    -k "not compile and not opcheck" > "$OUT/sanitizer_$tool.log" 2>&1
  echo "$tool exit $?: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer_$tool.log" | tr '\n' ' ')"
done

[ -n "${SKIP_BENCH:-}" ] && exit 0
step "benchmarks (cuda)"
PYFLOWMAP_BENCH_DEVICES=cuda "$PY" -m pytest ${BENCH:-benchmarks/test_bench_flowmap_step.py benchmarks/test_bench_cuda.py benchmarks/test_bench_attention.py benchmarks/test_bench_guidance.py benchmarks/test_bench_transformer.py benchmarks/test_bench_scm.py benchmarks/test_bench_precision.py} \
  ${BENCH_K:+-k "$BENCH_K"} -q -p no:cacheprovider --benchmark-json "$OUT/bench_cuda.json" --benchmark-columns=median,iqr > "$OUT/bench.log" 2>&1
echo "bench exit $?"; tail -3 "$OUT/bench.log"
"$PY" benchmarks/report.py "$OUT/bench_cuda.json" | tee "$OUT/bench_cuda.md"
