#!/usr/bin/env bash
# Everything that needs a GPU, in one call of a lent machine (torch 2.11+cu130, nvcc 13.0, no
# registry access), in under 9 minutes on an H100, most valuable first (a budget cut loses the tail):
#   1. build with CUDA for this GPU only (ptxas resource report checked by tools/ptxas_report.py);
#      fused-bilagrid, the radiance-field peer, builds beside it when its source is in .peers/
#   2. the CUDA tests (test ids containing "cuda": tests/test_cuda.py and every device-parametrised
#      case), spread over pytest-xdist workers when it is installed, without -x: one crash must not
#      hide the rest. GPU_CHECK_TESTS=all runs the whole suite (CI runs the CPU tests anyway)
#   3. compute-sanitizer memcheck on bench/sanitize_cuda.py, with the caching allocator off so that
#      out-of-bounds accesses inside pooled blocks are seen
#   4. the GPU benchmarks of bench/ (their CUDA cases: test ids containing "cuda"), curve_guide's
#      and bilagrid's first; pytest-benchmark JSON in $OUT/bench-*.json
#   then bench/profile_cuda.py: each case's wall time against its kernels' time (optional)
#   5. compute-sanitizer racecheck, synccheck (and initcheck, reported only), quick workloads
#   6. HDRNet's inference benchmark (optional: its compiled case spends most of its time compiling)
# Peers the machine lacks travel with the call (bench/gpu_prepare.sh puts them there): wheels in
# .whl/ (kornia, for the exact filter's tests and benchmark) are installed to /tmp/site;
# fused-bilagrid's source in .peers/fused-bilagrid is built in place.
# Every step runs whatever happened before; a summary table ends the run, then the open issues'
# GPU goals as measured (bench/gpu_goals.py, also in $OUT/goals.txt); the exit status is non-zero
# if any required step failed. Logs go to $OUT (default out/gpu).
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

# Carried peers: wheels first (nothing can be fetched there), then fused-bilagrid's build in the
# background, on a few of the cores, while ours builds.
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  tail -n 3 "$OUT/wheels.log"
fi
peer_pid=
if [ -f .peers/fused-bilagrid/setup.py ]; then
  (cd .peers/fused-bilagrid && MAX_JOBS=6 $PY setup.py build_ext --inplace) > "$OUT/fused-bilagrid-build.log" 2>&1 &
  peer_pid=$!
  export PYTHONPATH="$PYTHONPATH:$PWD/.peers/fused-bilagrid"
fi
wait_peer() {
  if [ -n "$peer_pid" ]; then
    wait "$peer_pid"
    echo "fused-bilagrid build: rc=$?" | tee -a "$OUT/fused-bilagrid-build.log"
    peer_pid=
  fi
}

# 1. Build in place (bilateral_ops/_C*.so), with ptxas's report in the log. ninja rebuilds only what
# changed, whatever --force says, so a second call on a warm machine would leave the log without
# the report: the CUDA objects go first (the CPU ones may stay).
find build -path '*csrc/cuda/*.o' -delete 2> /dev/null
run build 1 200 "$OUT/build.log" -- env FORCE_CUDA=1 BILATERAL_OPS_PTXAS_VERBOSE=1 \
  $PY setup.py build_ext --inplace --force
run ptxas-report 1 40 "$OUT/ptxas-report.log" -- $PY tools/ptxas_report.py "$OUT/build.log" --lib . --require-all
run cuda-kernels-registered 1 40 "$OUT/check-cuda-build.log" -- $PY tools/check_cuda_build.py .

# 2. The tests; the junit XML gives the counts. Each xdist worker keeps to two CPU threads so that
# the CPU sides of the CUDA-vs-CPU comparisons do not fight over the cores.
select=(-k cuda)
[ "${GPU_CHECK_TESTS:-cuda}" = all ] && select=()
workers=()
$PY -c "import xdist" 2> /dev/null && workers=(-n "${GPU_CHECK_WORKERS:-8}")
run tests 1 200 "$OUT/tests.log" -- env OMP_NUM_THREADS=2 $PY -m pytest -q tests "${select[@]}" "${workers[@]}" \
  -p no:cacheprovider -rfE --durations=15 --junitxml="$OUT/tests.xml"
$PY - "$OUT/tests.xml" <<'PYEOF' | tee "$OUT/tests-summary.txt"
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
PYEOF

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

# 4. Benchmarks: curve_guide's on their own first, then the radiance-field grids (against
# fused-bilagrid when it built), then the others (pytest bench -k cuda).
bench_step() {
  local name=$1 cap=$2 json=$3
  shift 3
  run "$name" 1 "$cap" "$OUT/$name.log" -- $PY -m pytest -q "$@" --benchmark-only --benchmark-json "$OUT/$json" \
    --benchmark-columns=min,median,mean,rounds -p no:cacheprovider
}
bench_step bench-curve-guide 60 bench-curve-guide.json bench/test_bench_curve_guide.py -k cuda
wait_peer
bench_step bench-bilagrid 60 bench-bilagrid.json bench/test_bench_bilagrid.py -k cuda
bench_step bench 120 bench-gpu.json bench -k "cuda and not curve_guide and not bilagrid and not hdrnet"

# Where the time goes: per case, the wall time of a call against its kernels' (optional).
run profile 0 90 "$OUT/profile.log" -- $PY bench/profile_cuda.py

# 5. The other sanitizers, on the quick workload.
SANITIZE_ARGS="--quick --dtypes float32,float64" sanitize racecheck 1 90 --racecheck-report all
SANITIZE_ARGS="--quick --dtypes float32" sanitize synccheck 1 60
SANITIZE_ARGS="--quick --dtypes float32" sanitize initcheck 0 45

# 6. HDRNet inference last; optional, so that a slow compile never fails the kernels' verdict.
run bench-hdrnet 0 100 "$OUT/bench-hdrnet.log" -- $PY -m pytest -q bench/test_bench_hdrnet.py -k cuda \
  --benchmark-only --benchmark-json "$OUT/bench-hdrnet.json" --benchmark-columns=min,median,rounds -p no:cacheprovider
wait_peer

echo
echo "== summary ($OUT)"
printf '  %-26s %-26s %6s  %s\n' step status seconds log
for i in "${!names[@]}"; do
  printf '  %-26s %-26s %6s  %s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}" "${logs[$i]}"
done
[ -f "$OUT/tests-summary.txt" ] && sed 's/^/  /' "$OUT/tests-summary.txt" | head -40
# The open issues' GPU goals, from the bench JSON files.
$PY bench/gpu_goals.py "$OUT" 2>&1 | tee "$OUT/goals.txt" | sed 's/^/  /'
echo "  total ${SECONDS}s"
if [ $failed -ne 0 ]; then
  echo "gpu_check: FAILED"
  exit 1
fi
echo "gpu_check: all required steps passed"
