"""Build of the bilateral_ops extension.

CPU kernels are always built. CUDA kernels are built when torch has CUDA and nvcc is found, or
when FORCE_CUDA=1 (then a missing toolchain is an error, never a silent CPU-only build).
TORCH_CUDA_ARCH_LIST is honoured; it defaults to sm_80, sm_86, sm_89 and sm_90 plus PTX.
"""

import glob
import os
import re
import shutil
import site
import subprocess
import sysconfig
import tempfile


def locate_cuda_home():
    """Set CUDA_HOME from nvcc itself when nvcc on PATH is a wrapper script.

    torch guesses CUDA_HOME as the parent of nvcc's folder; for a wrapper such as
    /usr/local/bin/nvcc that is /usr/local, which has no lib64/libcudart. nvcc's dry run names
    the real toolkit (TOP=...).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run(
                [nvcc, "-dryrun", "-c", src], capture_output=True, text=True, timeout=60, cwd=tmp
            )
        except (OSError, subprocess.SubprocessError):
            return
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        top = os.path.normpath(match.group(1).strip())
        if os.path.exists(os.path.join(top, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = top


locate_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    """The version, written once in bilateral_ops/_version.py (read as text: importing the package
    would need the extension built)."""
    with open(os.path.join(ROOT, "bilateral_ops", "_version.py")) as f:
        match = re.search(r'^__version__ = "([^"]+)"', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("no __version__ in bilateral_ops/_version.py")
    return match.group(1)
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
# The `export` extra; the Makefile's EXPORT_DEPS lists the same pins for CI.
EXPORT_DEPS = ["onnx==1.23.2", "onnxscript==0.7.2", "onnxruntime==1.32.0"]


def want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if torch.version.cuda is None:
            raise RuntimeError(
                f"FORCE_CUDA=1 but torch {torch.__version__} was built without CUDA; "
                "install a CUDA build of torch"
            )
        if CUDA_HOME is None:
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolkit was found: put nvcc on PATH or set CUDA_HOME"
            )
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def nvidia_wheel_includes():
    """Header folders of pip's nvidia-* wheels (cuSPARSE, cuBLAS, ...), which torch's CUDA headers
    include but a bare nvcc toolkit may lack: nvidia/cu13/include (CUDA 13 wheels) or
    nvidia/<lib>/include (CUDA 12 wheels)."""
    roots = {sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(torch.__file__))}
    roots.update(site.getsitepackages())
    found = []
    for root in sorted(roots):
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if inc not in found:
                found.append(inc)
    return found


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for is an inline template that only runs in parallel when the
    # extension itself is compiled with OpenMP.
    # -g0: Python's own flags ask for debug information, which for these heavily inlined kernels
    # took a fifth of the compile time and nine tenths of the objects' size (bilateral_filter.cpp:
    # 351 -> 283 s, 44.7 -> 4.8 MB).
    cxx = ["-O3", "-g0", "-fopenmp", "-fvisibility=hidden"]
    link = ["-fopenmp"]
    if os.environ.get("BILATERAL_OPS_DEBUG", "0") == "1":
        cxx = ["-O0", "-g", "-fopenmp"]
    if not want_cuda():
        return [
            CppExtension(
                "bilateral_ops._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx},
                extra_link_args=link,
            )
        ]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    # ptxas's resource report (registers, spills, shared memory per kernel and arch), which
    # `make cuda-check` feeds to tools/ptxas_report.py.
    if os.environ.get("BILATERAL_OPS_PTXAS_VERBOSE", "0") == "1":
        nvcc += ["-Xptxas", "-v"]
    return [
        CUDAExtension(
            "bilateral_ops._C",
            sources,
            include_dirs=include_dirs + nvidia_wheel_includes(),
            define_macros=[("BILATERAL_OPS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    ]


setup(
    name="bilateral_ops",
    version=read_version(),
    description="Fast, differentiable bilateral operators for PyTorch (CPU and CUDA)",
    packages=find_packages(include=["bilateral_ops", "bilateral_ops.*"]),
    package_data={"bilateral_ops": ["py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    # The command-line jobs (python -m bilateral_ops.train / enhance / demo): OpenCV reads and
    # writes the photos and gives the default target operator, scikit-image ships the photos.
    # ONNX export (python -m bilateral_ops.export, bilateral_ops.export.export_onnx): pinned to the
    # versions the export tests pass with (torch.onnx's exporter builds on onnxscript's internals).
    extras_require={
        "train": ["opencv-python-headless", "scikit-image", "tqdm", "matplotlib"],
        "export": EXPORT_DEPS,
    },
    zip_safe=False,
)
