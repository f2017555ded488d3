#!/usr/bin/env bash
# Everything that needs a GPU, in one call of a lent machine (torch 2.11+cu130, nvcc 13.0, no
# registry access): build with CUDA, run the whole test suite (CUDA tests included), run
# compute-sanitizer on the CUDA kernels, then the GPU benchmarks. Logs go to $OUT (or out/gpu).
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 BILATERAL_OPS_REQUIRE_COMPILED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PY:-python3}
status=0

echo "== device"; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/device.txt"

echo "== build"
FORCE_CUDA=1 $PY setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }

echo "== tests"
$PY -m pytest -q tests -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer (memcheck, racecheck)"
for tool in memcheck racecheck; do
  compute-sanitizer --tool $tool --error-exitcode 9 $PY bench/sanitize_cuda.py > "$OUT/sanitizer-$tool.log" 2>&1
  rc=$?; echo "$tool rc=$rc"; tail -3 "$OUT/sanitizer-$tool.log"; [ $rc -eq 0 ] || status=1
done

echo "== benchmarks"
$PY -m pytest -q bench -k cuda --benchmark-only --benchmark-json "$OUT/bench-gpu.json" \
  --benchmark-columns=min,median,mean,rounds -p no:cacheprovider 2>&1 | tee "$OUT/bench.log" | tail -30
exit $status
