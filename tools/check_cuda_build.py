"""Assert that a CUDA build of the extension registers a CUDA kernel for every bilateral_ops op.

Usage: python tools/check_cuda_build.py BUILD_LIB_DIR
Loading the library needs no GPU: only the CUDA runtime libraries that ship with torch.
"""

import glob
import os
import sys

import torch


def main() -> int:
    lib_dir = sys.argv[1]
    libs = glob.glob(os.path.join(lib_dir, "bilateral_ops", "_C*.so"))
    if len(libs) != 1:
        print(f"expected one bilateral_ops/_C*.so under {lib_dir}, found {libs}")
        return 1
    torch.ops.load_library(libs[0])
    ops = sorted(
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("bilateral_ops::")
    )
    if not ops:
        print("no bilateral_ops ops registered")
        return 1
    missing = [
        op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bilateral_ops::{op}", "CUDA")
    ]
    for op in ops:
        print(f"  bilateral_ops::{op}: {'MISSING' if op in missing else 'cuda kernel ok'}")
    if missing:
        print(f"FAILED: {len(missing)} op(s) without a CUDA kernel: {missing}")
        return 1
    print(f"cuda-check: all {len(ops)} bilateral_ops ops have CUDA kernels (torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
