#!/usr/bin/env bash
# Builds the extension for the GPU machine on this (CPU) machine, so that a lease does not spend its first
# minutes compiling: the GPU machine's Python and torch (KINDS.md of the device tool: Python 3.12, torch
# 2.11.0+cu130), CUDA 13's nvcc, sm_90 only. The result goes to gpu-prebuilt/ (ignored by git) with the
# digest of the sources it was built from; name that folder in the device call's carry, and
# scripts/gpu_check.sh's build phase uses it where the digest matches and it loads and runs there, and
# builds from source otherwise. Its C++ code is built for x86-64-v3 (AVX2 with FMA), not for this
# machine's CPU, which the GPU machine's may not match. About 2 minutes on two cores, 5 with the download
# of torch; a second run reuses the environment.
#   bash scripts/gpu_prebuild.sh
# Environment: PREBUILD_PYTHON (default: pyenv's 3.12), PREBUILD_TORCH (default 2.11.0), PREBUILD_VENV
# (default /tmp/rnnkernels-gpu-venv), CUDA_HOME (default /usr/local/cuda-13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BASE="${PREBUILD_PYTHON:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3 2>/dev/null | tail -n 1 || true)}"
TORCH_VERSION="${PREBUILD_TORCH:-2.11.0}"
VENV="${PREBUILD_VENV:-/tmp/rnnkernels-gpu-venv}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda-13.0}"
[ -x "$PYTHON_BASE" ] || { echo "gpu_prebuild: no Python 3.12 found; set PREBUILD_PYTHON"; exit 2; }
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "gpu_prebuild: no nvcc under $CUDA_HOME; set CUDA_HOME"; exit 2; }

if ! "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION')" 2>/dev/null; then
  "$PYTHON_BASE" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" setuptools wheel ninja numpy
fi
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

# A copy of the tracked and untracked sources, so that the build touches nothing in this checkout.
COPY=$(mktemp -d)
trap 'rm -rf "$COPY"' EXIT
git ls-files -co --exclude-standard | grep -v '^benchmarks/\|^docs/\|^examples/' | tar -cf - -T - | tar -xf - -C "$COPY"
(cd "$COPY" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" CPLUS_INCLUDE_PATH="$SITE/nvidia/cu13/include" \
  RNNKERNELS_CPU_ARCH=x86-64-v3 CPPFLAGS= "$VENV/bin/python" setup.py build_ext --inplace >build.log 2>&1) ||
  { tail -n 40 "$COPY/build.log"; exit 1; }

mkdir -p gpu-prebuilt
rm -f gpu-prebuilt/*.so
cp "$COPY"/rnnkernels/_C.*.so gpu-prebuilt/
strip --strip-debug gpu-prebuilt/*.so
(cd "$COPY" && bash scripts/gpu_check.sh digest) >gpu-prebuilt/sources  # of what was built, not of edits since
"$VENV/bin/python" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])" \
  >gpu-prebuilt/built-with
echo "gpu_prebuild: $(ls gpu-prebuilt/*.so) ($(du -h gpu-prebuilt/*.so | cut -f1)), $(cat gpu-prebuilt/built-with)"
echo "carry it: run(command='bash scripts/gpu_check.sh first', carry=['gpu-prebuilt'])"
