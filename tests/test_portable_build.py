"""The CPU kernels as built for machines without AVX-512, which a build on an AVX-512 machine, like CI's, never
exercises: x86-64-v3 (AVX2 with FMA, most x86 laptops), where the float32 gate math runs on 8 lanes
(csrc/cpu/float_lanes.h); 64-bit ARM (Apple silicon and other ARM laptops), where it runs on NEON's 4
lanes; and x86-64-v2, where it runs one unit at a time as on CPUs with none of these. The first two run
the panel kernels of csrc/cpu/panels.h, on 8- and 4-lane panels; in the last they compile out and the
per-step GEMM path runs instead. A copy of the tree is built each way and runs the CPU tests of the gate
math and the modules against torch.nn; the NEON copy runs on x86 through SIMDe's definitions of the NEON
intrinsics (the Debian package libsimde-dev).

No ARM machine runs the tests, so the NEON instructions themselves are checked apart from torch: the
CPU sources compile for aarch64 with a cross compiler, and tests/native/float_lanes_check.cpp, built for
aarch64, runs under qemu (the Debian packages g++-aarch64-linux-gnu and qemu-user; .ci/run installs
them)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SIMDE_NEON = Path("/usr/include/simde/arm/neon.h")
ARM_CXX = "aarch64-linux-gnu-g++"
TORCH_INCLUDE = Path(torch.__file__).parent / "include"

BUILDS = [
    pytest.param("x86-64-v3", "", 8, id="avx2"),
    pytest.param("x86-64-v3", "-DRNNKERNELS_EMULATE_NEON", 4, id="neon", marks=pytest.mark.skipif(
        not SIMDE_NEON.exists(), reason=f"no {SIMDE_NEON}: apt-get install libsimde-dev")),
    pytest.param("x86-64-v2", "", 1, id="scalar"),
]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86-64 build option")
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.parametrize(("arch", "defines", "lanes"), BUILDS)
def test_build_without_avx512_matches_torch(tmp_path, arch, defines, lanes):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "__pycache__", "*.egg-info", "benchmarks", "examples", "docs"))
    env = {**os.environ, "RNNKERNELS_CPU_ARCH": arch, "RNNKERNELS_CUDA": "0", "PYTHONPATH": str(src),
           "CPPFLAGS": f"{os.environ.get('CPPFLAGS', '')} {defines}".strip()}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    where = subprocess.run(
        [sys.executable, "-c", "import rnnkernels.ops as o; print(o.__file__, o.LOAD_ERROR, o.CPU_FLOAT_LANES)"],
        cwd=src, env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(src)) and where.stdout.split()[1:] == ["None", str(lanes)], (
        where.stdout + where.stderr)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cell_math.py",
         "tests/test_threads.py", "tests/test_modules.py", "-k", "not cuda and not triton and not reference"],
        cwd=src, env=env, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-5000:] + tests.stderr[-2000:]
    passed = re.search(r"(\d+) passed", tests.stdout)
    assert passed and int(passed.group(1)) >= 200, tests.stdout[-2000:]  # the selection did not run dry


needs_arm_compiler = pytest.mark.skipif(
    shutil.which(ARM_CXX) is None, reason=f"no {ARM_CXX}: apt-get install g++-aarch64-linux-gnu")
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-aarch64") is None, reason="no qemu-aarch64: apt-get install qemu-user")


def compile_and_run(tmp_path, compiler, flags, runner=()):
    binary = tmp_path / "float_lanes_check"
    build = subprocess.run([compiler, "-std=c++20", "-O2", *flags, f"-I{TORCH_INCLUDE}", "-o", str(binary),
                            str(ROOT / "tests" / "native" / "float_lanes_check.cpp")], capture_output=True, text=True)
    if "this build has no vector lanes" in build.stderr:
        pytest.skip(f"{compiler} {' '.join(flags)}: no vector registers to check")
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout[-3000:] + run.stderr[-1000:]
    return run.stdout


@needs_arm_compiler
@needs_qemu
def test_neon_registers_on_arm(tmp_path):
    """The NEON FloatRegister on (emulated) ARM: sigmoid and tanh within 2 ulps, NaN and infinities as torch,
    masked loads and stores that touch nothing past a row that ends at an unreadable page, the cells'
    formulas against float64."""
    out = compile_and_run(tmp_path, ARM_CXX, ["-static"], runner=["qemu-aarch64"])
    assert out.startswith("float_lanes_check: 4 lanes"), out


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
@pytest.mark.parametrize(("arch", "lanes"), [("native", ("8", "16")), ("x86-64-v3", ("8",))])
def test_x86_registers(tmp_path, arch, lanes):
    """The same checks on x86 registers: this machine's (AVX-512 or AVX2 with FMA), and AVX2 with FMA."""
    out = compile_and_run(tmp_path, "g++", [f"-march={arch}"])
    assert out.split()[1] in lanes, out


@needs_arm_compiler
def test_cpu_sources_compile_for_arm():
    """Every C++ source of the CPU build (setup.py's: csrc/*.cpp and csrc/cpu/*.cpp), NEON paths included,
    compiles for aarch64 against this torch's headers, nothing linked: the kernels of csrc/cpu to machine
    code at -O3 as setup.py builds them (always_inline failures and compiler crashes show only there), the
    operator registration to its syntax and types (it includes Python.h, whose Debian build dispatches
    pyconfig.h by architecture: that source skips where only the host's exists)."""
    python_include = sysconfig.get_paths()["include"]
    kernels = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    for source in kernels + sorted((ROOT / "csrc").glob("*.cpp")):
        output = ["-O3", "-c", "-o", os.devnull] if source in kernels else ["-fsyntax-only"]
        build = subprocess.run([ARM_CXX, "-std=c++20", "-fopenmp", *output, f"-I{TORCH_INCLUDE}",
                                f"-I{TORCH_INCLUDE / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{python_include}",
                                "-DTORCH_EXTENSION_NAME=_C", str(source)], capture_output=True, text=True)
        if build.returncode != 0 and source not in kernels and "pyconfig.h" in build.stderr:
            continue
        assert build.returncode == 0, f"{source.name}: {build.stderr[-3000:]}"
