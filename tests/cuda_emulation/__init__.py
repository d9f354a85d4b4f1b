"""The CUDA backend run on the CPU: csrc/cuda built as C++ against the host emulation of emulation.h (each
CUDA thread a fiber), and installed as the CPU kernels of the rnnkernels operators while a test runs, so
that the CUDA tests (tests/test_cuda.py) check the kernels' logic on machines without a GPU."""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

from rnnkernels import ops

HERE = Path(__file__).resolve().parent
CUDA_SOURCES = HERE.parent.parent / "csrc" / "cuda"
# The operators the CUDA backend implements, each replaced while an Installation is entered.
OPERATORS = [f"{cell}_{op}" for cell in ops.CELLS for op in ("forward", "backward", "step")] + ["linear"]
if not sys.platform.startswith("linux"):
    UNSUPPORTED = "the emulation's fibers (ucontext) are built on Linux only"
elif not cpp_extension.is_ninja_available():
    UNSUPPORTED = "building the emulation needs ninja (pip install ninja)"
else:
    UNSUPPORTED = None
# Set in processes started with sanitizer_environment(): they run the emulation built with AddressSanitizer.
SANITIZED = os.environ.get("RNNKERNELS_EMULATION_SANITIZED") == "1"

_modules = {}


def module(sanitized: bool = SANITIZED):
    """The emulated CUDA backend, built on first use (about 40 s on two cores; reused after). `sanitized`:
    built with AddressSanitizer, which then reports every access of the kernels and host code outside
    the memory they were given; it loads only into a process started with sanitizer_environment()."""
    if sanitized not in _modules:
        if sanitized:  # the compiler and linker run without the sanitizer this process was started with
            os.environ.pop("LD_PRELOAD", None)
        name = "rnnkernels_cuda_emulation" + ("_asan" if sanitized else "")
        # One build directory per checkout and torch, so that neither rebuilds the other's.
        key = hashlib.sha1(f"{CUDA_SOURCES}{torch.__version__}".encode()).hexdigest()[:10]
        build = Path(tempfile.gettempdir()) / f"{name}-{getpass.getuser()}-{key}"
        build.mkdir(parents=True, exist_ok=True)
        sources = []
        for source in sorted(CUDA_SOURCES.glob("*.cu")):  # compiled as C++: one wrapper per file
            wrapper = build / f"{source.stem}.cpp"
            text = f'#include "{source}"\n'
            if not wrapper.exists() or wrapper.read_text() != text:
                wrapper.write_text(text)
            sources.append(str(wrapper))
        sanitizer = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitized else []
        with _exclusive(build / "builder.lock"):
            _modules[sanitized] = _load(name, build, sources, sanitizer)
    return _modules[sanitized]


@contextlib.contextmanager
def _exclusive(path: Path):
    """Holds an flock on path. torch's builder marks a build in progress with a file named "lock" and waits
    while it exists, forever if a killed build left it behind; under this flock no other build of the
    directory runs, so a "lock" found then is such a leftover, and is removed."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (path.parent / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(name: str, build: Path, sources: list, sanitizer: list):
    return cpp_extension.load(
        name=name,
        sources=sources + [str(HERE / "bindings.cpp")],
        extra_cflags=["-O2", "-fvisibility=hidden", "-DRNNKERNELS_CUDA_EMULATION", "-include", str(HERE / "emulation.h"),
                      *sanitizer],
        extra_ldflags=sanitizer,
        extra_include_paths=[str(HERE / "include")],
        build_directory=str(build),
        verbose=os.environ.get("RNNKERNELS_EMULATION_VERBOSE") == "1",
    )


def sanitizer_environment() -> dict:
    """The environment of a process that runs the emulation sanitized: the compiler's libasan preloaded (it
    must come first) with its libstdc++ (whose __cxa_throw the sanitizer wraps: without it a C++ exception
    aborts), leak checks off (Python and torch keep memory to the end by design)."""
    libraries = [subprocess.run([os.environ.get("CXX", "c++"), f"-print-file-name={name}"], capture_output=True,
                                text=True, check=True).stdout.strip() for name in ("libasan.so", "libstdc++.so")]
    return {**os.environ, "LD_PRELOAD": " ".join(libraries), "ASAN_OPTIONS": "detect_leaks=0",
            "RNNKERNELS_EMULATION_SANITIZED": "1"}


class Installation:
    """While entered, the rnnkernels operators on CPU tensors run the emulated CUDA backend, on a device of
    `multiprocessors` multiprocessors whose threads run in an order drawn from `seed`."""

    def __init__(self, multiprocessors: int = 4, seed: int = 0):
        self.emulated = module()
        self.multiprocessors, self.seed = multiprocessors, seed
        self.library = None

    def __enter__(self) -> Installation:
        self.emulated.configure(self.multiprocessors, self.seed)
        self.library = torch.library.Library("rnnkernels", "IMPL")
        for name in OPERATORS:
            self.library.impl(name, _positional(name, getattr(self.emulated, name)), "CPU")
        return self

    def __exit__(self, *exc) -> None:
        self.library._destroy()  # the CPU kernels registered before are the operators' again
        self.library = None

    @contextlib.contextmanager
    def paused(self):
        """Inside the block, the operators run their own CPU kernels."""
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()

def _positional(name: str, function):
    """function called with every argument of operator `name` in schema order, defaults filled in (the
    dispatcher leaves out those left at their defaults; the bound C++ functions take all)."""
    arguments = getattr(torch.ops.rnnkernels, name).default._schema.arguments

    def kernel(*args, **kwargs):
        rest = [kwargs.get(a.name, a.default_value) for a in arguments[len(args):]]
        return function(*args, *rest)

    return kernel
