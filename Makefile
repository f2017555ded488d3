# Everyday targets. Everything runs inside $(VENV), created on first use with the CPU build of torch.
PYTHON     ?= python3
VENV       ?= .venv
VPY        := $(VENV)/bin/python
TORCH_CPU  ?= torch==2.13.0
CUDA_VENV  ?= .venv-cuda
CPY        := $(CUDA_VENV)/bin/python
TORCH_CUDA ?= torch==2.14.1
# The export tests (tests/test_export.py) need setup.py's `export` extra: the same pins.
EXPORT_DEPS := onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0
TEST_DEPS  := numpy pytest pytest-benchmark expecttest ninja setuptools wheel build kornia opencv-python-headless $(EXPORT_DEPS)
DEMO_DEPS  := scikit-image tqdm matplotlib
BENCH_DEPS := kornia opencv-python-headless numba
export MAX_JOBS ?= 2

.PHONY: all build test demo bench sdist-check cuda-check clean

all: build

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q $(TORCH_CPU) $(TEST_DEPS) $(DEMO_DEPS)
	touch $@

# Editable install: compiles csrc/ into bilateral_ops/_C*.so against the venv's torch.
build: $(VENV)/.deps
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	BILATERAL_OPS_REQUIRE_COMPILED=1 $(VPY) -m pytest -q tests

demo: build
	$(VPY) -m bilateral_ops.demo --out out/demo

$(VENV)/.bench-deps: $(VENV)/.deps
	$(VPY) -m pip install -q $(BENCH_DEPS)
	touch $@

bench: build $(VENV)/.bench-deps
	BILATERAL_OPS_REQUIRE_COMPILED=1 $(VPY) -m pytest -q bench --benchmark-only \
		--benchmark-columns=min,median,mean,stddev,rounds --benchmark-sort=name

# The sdist must be complete: build it, install it into a fresh venv beside the CPU torch, and run
# every op compiled from outside the source tree.
SDIST_VENV ?= .venv-sdist
sdist-check: $(VENV)/.deps
	rm -rf dist $(SDIST_VENV)
	$(VPY) -m build --sdist --no-isolation --outdir dist . > /dev/null
	$(PYTHON) -m venv $(SDIST_VENV)
	$(SDIST_VENV)/bin/python -m pip install -q $(TORCH_CPU) numpy ninja setuptools wheel
	$(SDIST_VENV)/bin/python -m pip install -q --no-build-isolation dist/bilateral_ops-*.tar.gz
	cd /tmp && BILATERAL_OPS_REQUIRE_COMPILED=1 $(CURDIR)/$(SDIST_VENV)/bin/python $(CURDIR)/tools/sdist_smoke.py

# Compile the CUDA kernels (nothing runs: no GPU needed) against the CUDA build of torch and
# check that every bilateral_ops op has a CUDA kernel registered.
$(CUDA_VENV)/.deps:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CPY) -m pip install -q $(TORCH_CUDA) numpy ninja setuptools wheel
	touch $@

# The CUDA objects are always recompiled (ptxas only reports on what it compiles): their output,
# ptxas's resource report included, is teed to build/cuda-build.log, then tools/ptxas_report.py
# prints registers / spills / shared memory per kernel and arch and fails on spills in float
# kernels, shared memory beyond 48 KiB or registers beyond __launch_bounds__.
cuda-check: $(CUDA_VENV)/.deps
	mkdir -p build
	find build/cuda-temp -path '*csrc/cuda/*.o' -delete 2>/dev/null || true
	{ BILATERAL_OPS_PTXAS_VERBOSE=1 FORCE_CUDA=1 $(CPY) setup.py -q build_ext \
		--build-temp build/cuda-temp --build-lib build/cuda-lib 2>&1; echo $$? > build/cuda-build.rc; } \
		| tee build/cuda-build.log
	@test "$$(cat build/cuda-build.rc)" = 0 || { echo "cuda-check: the CUDA build failed"; exit 1; }
	$(CPY) tools/ptxas_report.py build/cuda-build.log --lib build/cuda-lib --require-all
	$(CPY) tools/check_cuda_build.py build/cuda-lib

clean:
	rm -rf build dist bilateral_ops/_C*.so *.egg-info out
