#!/usr/bin/env bash
# Everything that needs a GPU, in one call of a lent machine (torch 2.11+cu130, nvcc 13.0, no
# registry access), in under 9 minutes on an H100:
#   1. build with CUDA for this GPU only (ptxas resource report checked by tools/ptxas_report.py)
#   2. the whole test suite, CUDA tests included (tests/test_cuda.py: slice, slice_apply,
#      grid_splat, grid_blur, bilateral_grid_filter, curve_guide), without -x: one crash must not hide the rest
#   3. compute-sanitizer memcheck, racecheck, synccheck (and initcheck, reported only) on
#      bench/sanitize_cuda.py, with the caching allocator off so that out-of-bounds accesses
#      inside pooled blocks are seen
#   4. the GPU benchmarks of bench/ (their CUDA cases: test ids containing "cuda"), curve_guide's
#      and bilagrid's first, HDRNet's inference last; pytest-benchmark JSON in $OUT/bench-*.json
# bilateral_filter's CUDA tests (tests/test_cuda.py -k filter) run in step 2 and its kernels are in
# the sanitizer workload of step 3.
# Every step runs whatever happened before; a summary table ends the run; the exit status is
# non-zero if any required step failed. Logs go to $OUT (default out/gpu).
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BILATERAL_OPS_REQUIRE_COMPILED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
# The in-place build is imported from the checkout (bench/sanitize_cuda.py runs with bench/ as
# its script directory).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

find_sanitizer() {
  if command -v compute-sanitizer > /dev/null; then command -v compute-sanitizer; return; fi
  local nvcc_dir
  nvcc_dir=$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")
  for d in "$nvcc_dir/.." "${CUDA_HOME:-/nonexistent}" /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/compute-sanitizer" ]; then echo "$d/bin/compute-sanitizer"; return; fi
  done
  echo compute-sanitizer
}
SANITIZER=${SANITIZER:-$(find_sanitizer)}

# The whole run stays within BUDGET seconds (the lent machine's 8 minutes, less start-up): each
# step is cut at its own cap or at what is left of the budget, whichever comes first.
BUDGET=${GPU_CHECK_BUDGET_S:-540}
names=() results=() seconds=() logs=()
failed=0

# run NAME REQUIRED(1|0) CAP_S LOG -- command...: records status and duration.
run() {
  local name=$1 required=$2 cap=$3 log=$4
  shift 5
  echo "== $name"
  local t0=$SECONDS rc status=ok
  local limit=$((BUDGET - SECONDS))
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 5 ]; then
    status="SKIPPED(no time left)"
    echo "skipped: the ${BUDGET}s budget is spent" > "$log"
    [ "$required" = 1 ] && failed=1
  else
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then
      if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT(${limit}s)"; else status="FAIL(rc=$rc)"; fi
      [ "$required" = 1 ] || status="$status,optional"
      [ "$required" = 1 ] && failed=1
    fi
  fi
  tail -n 6 "$log" | sed 's/^/    /'
  names+=("$name") results+=("$status") seconds+=($((SECONDS - t0))) logs+=("$log")
}

echo "== device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/device.txt"
nvcc --version 2>&1 | tail -2 | tee -a "$OUT/device.txt"
echo "compute-sanitizer: $SANITIZER" | tee -a "$OUT/device.txt"

# 1. Build in place (bilateral_ops/_C*.so), with ptxas's report in the log.
run build 1 180 "$OUT/build.log" -- env FORCE_CUDA=1 BILATERAL_OPS_PTXAS_VERBOSE=1 \
  $PY setup.py build_ext --inplace --force
run ptxas-report 1 40 "$OUT/ptxas-report.log" -- $PY tools/ptxas_report.py "$OUT/build.log" --lib . --require-all
run cuda-kernels-registered 1 40 "$OUT/check-cuda-build.log" -- $PY tools/check_cuda_build.py .

# 2. curve_guide's CUDA tests first, on their own (a quick verdict on the newest kernels even if
# the whole suite runs out of time), then the whole suite; the junit XML gives the counts.
run curve-guide-tests 1 60 "$OUT/curve-guide-tests.log" -- $PY -m pytest -q tests/test_cuda.py -k curve_guide \
  -p no:cacheprovider -rfE
# The radiance-field ops likewise (bilateral_slice_apply_points, grid_tv_loss, align_corners).
run bilagrid-tests 1 60 "$OUT/bilagrid-tests.log" -- $PY -m pytest -q tests/test_cuda.py \
  -k "points or tv_loss or align_corners or bilagrid" -p no:cacheprovider -rfE

run tests 1 200 "$OUT/tests.log" -- $PY -m pytest -q tests -p no:cacheprovider -rfE --durations=15 \
  --junitxml="$OUT/tests.xml"
$PY - "$OUT/tests.xml" <<'EOF' | tee "$OUT/tests-summary.txt"
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as exc:  # no XML: pytest crashed before writing it
    print(f"tests: no junit report ({exc})")
    sys.exit(0)
suites = [root] if root.tag == "testsuite" else list(root)
tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
print(f"tests: {passed} passed, {tot['failures']} failed, {tot['errors']} errors, {tot['skipped']} skipped")
for s in suites:
    for case in s.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            print(f"  FAILED {case.get('classname')}::{case.get('name')}")
EOF

# 3. compute-sanitizer. Without the caching allocator every tensor is its own cudaMalloc, so an
# access past a tensor's end is an access outside any allocation.
sanitize() {
  local tool=$1 required=$2 limit=$3
  shift 3
  run "sanitizer-$tool" "$required" "$limit" "$OUT/sanitizer-$tool.log" -- \
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 9 \
    --print-limit 20 "$@" $PY bench/sanitize_cuda.py ${SANITIZE_ARGS:-}
}
sanitize memcheck 1 120
SANITIZE_ARGS="--quick --dtypes float32,float64" sanitize racecheck 1 90 --racecheck-report all
SANITIZE_ARGS="--quick --dtypes float32" sanitize synccheck 1 60
SANITIZE_ARGS="--quick --dtypes float32" sanitize initcheck 0 45

# 4. Benchmarks: curve_guide's on their own first, then the others (pytest bench -k cuda).
run bench-curve-guide 1 60 "$OUT/bench-curve-guide.log" -- $PY -m pytest -q bench/test_bench_curve_guide.py \
  -k cuda --benchmark-only --benchmark-json "$OUT/bench-curve-guide.json" \
  --benchmark-columns=min,median,mean,rounds -p no:cacheprovider
run bench-bilagrid 1 60 "$OUT/bench-bilagrid.log" -- $PY -m pytest -q bench/test_bench_bilagrid.py \
  -k cuda --benchmark-only --benchmark-json "$OUT/bench-bilagrid.json" \
  --benchmark-columns=min,median,mean,rounds -p no:cacheprovider
run bench 1 120 "$OUT/bench.log" -- $PY -m pytest -q bench -k "cuda and not curve_guide and not bilagrid and not hdrnet" --benchmark-only \
  --benchmark-json "$OUT/bench-gpu.json" --benchmark-columns=min,median,mean,rounds -p no:cacheprovider
# HDRNet inference last (its compiled case spends most of its time compiling); optional, so that
# a slow compile never fails the kernels' verdict.
run bench-hdrnet 0 100 "$OUT/bench-hdrnet.log" -- $PY -m pytest -q bench/test_bench_hdrnet.py -k cuda \
  --benchmark-only --benchmark-json "$OUT/bench-hdrnet.json" --benchmark-columns=min,median,rounds -p no:cacheprovider

echo
echo "== summary ($OUT)"
printf '  %-26s %-26s %6s  %s\n' step status seconds log
for i in "${!names[@]}"; do
  printf '  %-26s %-26s %6s  %s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}" "${logs[$i]}"
done
[ -f "$OUT/tests-summary.txt" ] && sed 's/^/  /' "$OUT/tests-summary.txt" | head -40
echo "  total ${SECONDS}s"
if [ $failed -ne 0 ]; then
  echo "gpu_check: FAILED"
  exit 1
fi
echo "gpu_check: all required steps passed"
