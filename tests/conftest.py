"""Shared pytest setup.

The suite must never pass against the pure-torch reference by accident: the environment variable
``BILATERAL_OPS_REQUIRE_COMPILED`` is set before ``bilateral_ops`` is imported (so a missing kernel
raises instead of silently falling back), and the session aborts if the compiled library did not
load or has no CPU kernel for an op.
"""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("BILATERAL_OPS_REQUIRE_COMPILED", "1")

# torch.compile's on-disk caches (FX graph, AOTAutograd) are not keyed on the ops' fake kernels or
# the extension binary: a stale cache could hide (or fake) a failure after a rebuild. Each session
# compiles into its own fresh directory unless the caller chose one.
_OWN_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="bilateral_ops_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_INDUCTOR_CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

import bilateral_ops  # noqa: E402
import bilateral_ops._library as lib  # noqa: E402
from helpers import deterministic  # noqa: E402


def _compiled_library_problem() -> str | None:
    if lib.LOAD_ERROR is not None:
        return f"the compiled extension failed to load: {lib.LOAD_ERROR!r}"
    if not lib.OPS:
        return "no bilateral_ops op is registered"
    missing = [op for op in lib.OPS if "cpu" not in bilateral_ops.compiled_devices(op)]
    if missing:
        return f"no compiled CPU kernel for {missing}"
    return None


def pytest_sessionstart(session: pytest.Session) -> None:
    problem = _compiled_library_problem()
    if problem is not None:
        pytest.exit(
            f"bilateral_ops tests need the compiled library: {problem}. Build it first (make build).",
            returncode=1,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_INDUCTOR_CACHE is not None:
        shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["rows", "pixels"])
def cpu_slice_path(request: pytest.FixtureRequest):
    """Runs a test once per path of the CPU slice ops (csrc/cpu/slice_path.h): the row engine
    and the per-pixel gathers, whatever sizes the test takes (by default the sizes choose)."""
    from bilateral_ops import _C

    before = _C.slice_path(request.param)
    yield request.param
    _C.slice_path(before)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator for tests that draw their own random tensors."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def bitwise():
    """Deterministic mode for a test that compares two runs bitwise: on CUDA the default grid
    gradients (and grid_splat) add with atomics, in no fixed order; the deterministic paths gather
    in a fixed order. The CPU kernels are deterministic either way."""
    with deterministic(True):
        yield


@pytest.fixture
def restore_num_threads():
    n = torch.get_num_threads()
    yield n
    torch.set_num_threads(n)
