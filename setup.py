"""Builds rnnkernels._C, the C++ CPU kernels (csrc/). The CUDA kernels, when csrc/cuda lands, build here too.

Install with the torch already in the environment (build isolation would fetch a second, multi-GB torch):
    pip install --no-build-isolation -e .
Environment: RNNKERNELS_CPU_ARCH (default "native": the extension is built on the machine that runs it;
set e.g. "x86-64-v3" to build for other machines), MAX_JOBS.
"""

import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def cxx_flags():
    flags = ["-O3"]
    arch = os.environ.get("RNNKERNELS_CPU_ARCH", "native")
    if arch and platform.machine() in ("x86_64", "AMD64"):
        flags.append(f"-march={arch}")
    elif arch:
        flags.append(f"-mcpu={arch}")
    return flags


def extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    return CppExtension("rnnkernels._C", sources, extra_compile_args={"cxx": cxx_flags()})


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
