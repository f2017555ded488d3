#!/usr/bin/env bash
# Prepares, on a machine with registry access, what bench/gpu_check.sh needs on a GPU machine
# that has none: the peers' packages, in two folders git ignores (carry them with the working
# tree, e.g. the device tool's `carry: [".whl", ".peers"]`).
#   .whl/                   kornia and kornia_rs wheels for the GPU machine's Python (3.12 by
#                           default): the exact filter's tests and benchmarks compare with kornia
#   .peers/fused-bilagrid/  fused-bilagrid's source (its package and setup.py), which
#                           gpu_check.sh builds on the GPU machine for the radiance-field benches
#
#   bash bench/gpu_prepare.sh FUSED_BILAGRID_REPO [PYTHON_VERSION]
#
# FUSED_BILAGRID_REPO: a clone (or bare git directory) of github.com/harry7557558/fused-bilagrid;
# its HEAD is exported.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=${1:?usage: bench/gpu_prepare.sh FUSED_BILAGRID_REPO [PYTHON_VERSION]}
pyver=${2:-3.12}
for d in .whl .peers; do
  grep -qxF "/$d/" .git/info/exclude 2> /dev/null || grep -qxF "/$d/" .gitignore || echo "/$d/" >> .git/info/exclude
done
mkdir -p .whl .peers/fused-bilagrid
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl kornia==0.9.0 kornia_rs==0.2.0
git -C "$repo" archive HEAD fused_bilagrid setup.py LICENSE | tar -x -C .peers/fused-bilagrid
echo "gpu_prepare: $(ls .whl | wc -l) wheels in .whl, fused-bilagrid $(git -C "$repo" rev-parse --short HEAD) in .peers"
