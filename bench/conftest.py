"""Fixtures of the bilateral_ops benchmarks (pytest-benchmark). Run with ``make bench`` or

    BILATERAL_OPS_REQUIRE_COMPILED=1 python -m pytest -q bench --benchmark-only

``pytest bench -k cuda`` runs the GPU benchmarks only (skipped without a CUDA device).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# bench_common.py sits next to this file; make it importable whatever the import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The benches must never time the pure-torch fallback by accident.
os.environ.setdefault("BILATERAL_OPS_REQUIRE_COMPILED", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


@pytest.fixture
def requires_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
