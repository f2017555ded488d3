# Everyday targets. Everything runs inside $(VENV), created on first use with the CPU build of torch.
PYTHON     ?= python3
VENV       ?= .venv
VPY        := $(VENV)/bin/python
TORCH_CPU  ?= torch==2.13.0
CUDA_VENV  ?= .venv-cuda
CPY        := $(CUDA_VENV)/bin/python
TORCH_CUDA ?= torch==2.14.1
TEST_DEPS  := numpy pytest pytest-benchmark expecttest ninja setuptools wheel build
DEMO_DEPS  := scikit-image
BENCH_DEPS := kornia opencv-python-headless
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

cuda-check: $(CUDA_VENV)/.deps
	FORCE_CUDA=1 $(CPY) setup.py -q build_ext --build-temp build/cuda-temp --build-lib build/cuda-lib
	$(CPY) tools/check_cuda_build.py build/cuda-lib

clean:
	rm -rf build dist bilateral_ops/_C*.so *.egg-info out
