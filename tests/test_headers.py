"""The headers that need no torch compile on their own in C++17.

torch's extension builder picks the language standard: C++20 with the torch this machine builds
against, C++17 with older ones (2.11, as on the lent GPU machines). GCC accepts an undeclared
name followed by `<` as a template in C++20 (P0846) but not in C++17, so a header that leans on
an include it does not make builds here and fails there. Each header is compiled alone, in
C++17, so that it names everything it uses.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
# Fragments included inside a namespace or a target pragma by design (isa_copies.h says how),
# and headers that need ATen, are compiled by the build itself.
FRAGMENTS = {"curve_pointwise.h", "isa_vec.h", "isa_copies.h", "bilateral_filter_kernels.h", "curve_guide_kernels.h",
             "bilateral_filter_copy.h"}


def _standalone_headers() -> list[pathlib.Path]:
    found = sorted((CSRC / "include" / "bilateral_ops").glob("*.h")) + sorted((CSRC / "cpu").glob("*.h"))
    keep = []
    for h in found:
        if h.name in FRAGMENTS:
            continue
        text = h.read_text()
        if "#include <ATen" in text or "#include <c10" in text:
            continue
        keep.append(h)
    return keep


HEADERS = _standalone_headers()
CXX = shutil.which("g++") or shutil.which("c++")


def test_the_list_is_not_empty():
    names = {h.name for h in HEADERS}
    assert {"simd.h", "grid_coords.h", "curve_guide.h", "bilateral_filter.h"} <= names


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("header", HEADERS, ids=lambda h: str(h.relative_to(CSRC)))
def test_header_compiles_alone_in_cxx17(header, tmp_path):
    rel = header.relative_to(CSRC / "include") if header.is_relative_to(CSRC / "include") else header.relative_to(CSRC)
    src = tmp_path / "one.cpp"
    src.write_text(f'#include "{rel.as_posix()}"\n')
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-I{CSRC}", f"-I{CSRC / 'include'}", str(src)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
