#!/usr/bin/env bash
# Everything that needs a GPU, in one command, inside a time budget (GPU_CHECK_BUDGET_S, default 570 s):
#   1. build the extension for sm_90 in place;
#   2. the GPU tests (pytest -m cuda: CUDA, and Triton where present), then the rest of tests/test_triton.py;
#   3. compute-sanitizer memcheck and racecheck over scripts/sanitize_case.py (any error fails);
#   4. the full benchmark on the GPU, float32 and bfloat16, saved as $OUT/gpu.json (plot it where matplotlib is: --report --plot);
#   5. the persistent kernels' time per step over units per block (scripts/gpu_sweep.py), saved as $OUT/sweep.json.
# Logs go to $OUT (default ./gpu-out). Every phase runs even if an earlier one failed, each capped at its
# own limit and at what is left of the budget; the exit status says whether all passed.
# Usage: bash scripts/gpu_check.sh [PHASE...], PHASE among build registered tests_cuda tests_triton
# sanitize_memcheck sanitize_racecheck bench sweep; all by default. Where one command may run 10 minutes
# at most, run the checks and the measurements as two commands on the same machine:
#   bash scripts/gpu_check.sh build registered tests_cuda tests_triton sanitize_memcheck sanitize_racecheck
#   bash scripts/gpu_check.sh build bench sweep      (the second build finds nothing left to compile)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
SANITIZER="${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
status=0
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-570}))
selected=" ${*:-all} "
known=" all build registered tests_cuda tests_triton sanitize_memcheck sanitize_racecheck bench sweep "
for name in $selected; do
  [[ "$known" == *" $name "* ]] || { echo "gpu_check: unknown phase '$name'; phases:$known"; exit 2; }
done

phase() {  # phase NAME SECONDS COMMAND...: runs COMMAND with a time limit, logging to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  if [ "$selected" != " all " ] && [[ "$selected" != *" $name "* ]]; then
    return 0
  fi
  local left=$((deadline - SECONDS))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -le 0 ]; then
    echo "== $name: skipped, the time budget is spent"
    status=1
    return 1
  fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s (log: $OUT/$name.log)"
  tail -n 15 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

nvidia-smi >"$OUT/nvidia-smi.log" 2>&1
phase build 180 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
  || { echo "build failed: nothing else can run"; exit 1; }
phase registered 30 "$PYTHON" -c "import torch, rnnkernels; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('rnnkernels::lstm_forward', 'CUDA'), 'no CUDA kernels'; \
print(rnnkernels.__file__, torch.__version__, torch.cuda.get_device_name())"
phase tests_cuda 300 "$PYTHON" -m pytest tests -m cuda -q -p no:cacheprovider --maxfail=50 --durations=15
if [ -f tests/test_triton.py ]; then
  # its cuda-marked tests ran above; the rest (e.g. interpreter mode) here
  phase tests_triton 120 bash -c '"$0" -m pytest tests/test_triton.py -m "not cuda" -q -p no:cacheprovider; \
rc=$?; exit $((rc == 5 ? 0 : rc))' "$PYTHON"  # 5: every test there is cuda-marked
fi
# No caching allocator under the sanitizer: every buffer its own allocation, so out-of-bounds accesses
# inside torch's memory pool are caught too.
for tool in memcheck racecheck; do
  phase "sanitize_$tool" 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
    --error-exitcode 1 --print-limit 20 "$PYTHON" scripts/sanitize_case.py
done
# Both dtypes of the issues' bars, with samples short enough to fit the budget; commit the JSON under
# benchmarks/results/ and make the README's GPU table from it (python -m rnnkernels.bench --report).
phase bench 400 "$PYTHON" -m rnnkernels.bench --device cuda --dtypes float32,bfloat16 --word-lm \
  --repeats 10 --min-sample-ms 10 --json "$OUT/gpu.json"
phase sweep 90 "$PYTHON" scripts/gpu_sweep.py --json "$OUT/sweep.json"
echo "gpu_check: $([ "$status" -eq 0 ] && echo PASSED || echo FAILED); logs in $OUT"
exit "$status"
