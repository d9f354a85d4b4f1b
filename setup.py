"""Builds rnnkernels._C: the C++ CPU kernels (csrc/cpu) and, where torch is a CUDA build and nvcc is
found, the CUDA kernels (csrc/cuda) in the same module.

Install with the torch already in the environment (build isolation would fetch a second, multi-GB torch):
    pip install --no-build-isolation -e .
Environment:
    RNNKERNELS_CPU_ARCH   default "native": the C++ code is built for the machine that builds it; set e.g.
                          "x86-64-v3" to build for other machines.
    RNNKERNELS_CUDA       "0" builds the CPU kernels only, even where CUDA could be built.
    TORCH_CUDA_ARCH_LIST  the GPU architectures, e.g. "9.0"; where unset and no GPU is visible, "8.0;9.0"
                          (torch's helper would otherwise fail looking for a device).
    CUDA_HOME, MAX_JOBS   as torch.utils.cpp_extension reads them.
"""

import glob
import os
import platform
import shutil


def find_cuda_toolkit() -> None:
    """torch takes the toolkit to be the folder above the nvcc on the PATH; where that nvcc is a wrapper
    outside the toolkit (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc), the headers and
    libcudart are not there, so point CUDA_HOME at /usr/local/cuda, torch's own last guess, instead."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    guessed = os.path.dirname(os.path.dirname(nvcc))
    if not os.path.exists(os.path.join(guessed, "include", "cuda_runtime.h")) and os.path.exists(
        "/usr/local/cuda/include/cuda_runtime.h"
    ):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


find_cuda_toolkit()  # before torch.utils.cpp_extension reads CUDA_HOME

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100


def openmp_flags():
    """at::parallel_for is a header template that runs on one thread unless the extension itself is
    compiled with OpenMP; the link then names libgomp.so.1, which resolves to the copy torch has loaded."""
    if platform.system() == "Linux" and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def cxx_flags():
    flags = ["-O3"] + openmp_flags()
    arch = os.environ.get("RNNKERNELS_CPU_ARCH", "native")
    if arch and platform.machine() in ("x86_64", "AMD64"):
        flags.append(f"-march={arch}")
    elif arch:
        flags.append(f"-mcpu={arch}")
    return flags


def build_cuda() -> bool:
    """The CUDA kernels build when torch is a CUDA build, nvcc is found and RNNKERNELS_CUDA is not "0"."""
    return (
        os.environ.get("RNNKERNELS_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )


def nvidia_wheel_includes():
    """Headers of the pip nvidia-* wheels (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include: a pip
    CUDA torch with a system nvcc then builds without setting CPLUS_INCLUDE_PATH."""
    roots = {os.path.dirname(os.path.dirname(torch.__file__))}
    return sorted(path for root in roots for path in glob.glob(os.path.join(root, "nvidia", "*", "include")))


def nvcc_flags():
    # No --use_fast_math: its approximate expf/tanhf (and flushed denormals) would make the gate math of
    # the GPU differ from the CPU kernels' and from torch.nn by more than rounding, and the recurrence
    # compounds that error over the time steps; the gate math is a small share of each step's time.
    return ["-O3", "-lineinfo"]


def extension():
    sources = ["csrc/ops.cpp", "csrc/step_autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if not build_cuda():
        return CppExtension(
            "rnnkernels._C", sources, extra_compile_args={"cxx": cxx_flags()}, extra_link_args=openmp_flags()
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return CUDAExtension(
        "rnnkernels._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=nvidia_wheel_includes(),
        define_macros=[("RNNKERNELS_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
        extra_link_args=openmp_flags(),
    )


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
