#!/usr/bin/env bash
# Everything that needs a GPU, sized for a lease of 15 minutes of device time in commands of at most 10
# minutes: two commands on one machine, the second sent as soon as the first returns (a machine stays warm
# for about 30 s after a call, and a fresh one costs minutes to start).
#   bash scripts/gpu_check.sh first    budget 480 s: build for sm_90; the CUDA backend's GPU tests; the
#                                      benchmark in bfloat16; compute-sanitizer memcheck
#   bash scripts/gpu_check.sh second   budget 240 s: the benchmark in float32 with the word LM; the Triton
#                                      backend's GPU tests; the persistent kernels' sweep over units per
#                                      block (scripts/gpu_sweep.py); compute-sanitizer racecheck
# In each group the phases run in that order, which is their priority: the last ones get what is left.
# With no argument both groups run in one go; or name phases: build registered tests_cuda tests_triton
# sanitize_memcheck sanitize_racecheck bench_bfloat16 bench_float32 sweep. GPU_CHECK_BUDGET_S replaces the
# budget (give the second command what the lease has left). Every phase is capped at its own limit and at
# what is left of the budget, and runs even if an earlier one failed; the benchmark starts no case past its
# limit and rewrites its JSON after every case, so a phase cut short still returns what it measured.
# The build phase takes gpu-prebuilt/ (scripts/gpu_prebuild.sh, named in the device call's carry) where it was
# built from these sources and imports on this machine, and builds from source otherwise. `gpu_check.sh
# digest` prints the sources' digest that decides it.
# Out ($OUT, default ./gpu-out): gpu_check.log (every phase's output, in order), bench-bfloat16.json,
# bench-float32.json, sweep.json; few files, since a device call returns at most 8. It ends with the
# issues' bars against the benchmark's figures (scripts/bars.py). Commit the JSON under benchmarks/results/
# and make the README's GPU table from it (python -m rnnkernels.bench --report FILE).
set -u
cd "$(dirname "$0")/.."
sources_digest() { cat setup.py pyproject.toml $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -d' ' -f1; }
[ "${1:-}" = digest ] && { sources_digest; exit 0; }
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU machine's torch is its python3
SANITIZER="${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"

FIRST="build registered tests_cuda bench_bfloat16 sanitize_memcheck"
SECOND="build registered bench_float32 tests_triton sweep sanitize_racecheck"
case "${1:-}" in
  first) selected=" $FIRST " budget=480 ;;
  second) selected=" $SECOND " budget=240 ;;
  "") selected=" $FIRST $SECOND " budget=720 ;;
  *) selected=" $* " budget=720 ;;
esac
known=" $FIRST $SECOND "
for name in $selected; do
  [[ "$known" == *" $name "* ]] || { echo "gpu_check: unknown phase '$name'; groups: first second; phases:$known"; exit 2; }
done
budget="${GPU_CHECK_BUDGET_S:-$budget}"
deadline=$((SECONDS + budget))
status=0
summary=()

limit_for() {  # limit_for SECONDS: a phase's limit, capped at what is left of the budget
  local left=$((deadline - SECONDS))
  echo $(($1 < left ? $1 : left))
}

phase() {  # phase NAME SECONDS COMMAND...: COMMAND under a time limit, its output appended to $LOG
  local name=$1 limit
  limit=$(limit_for "$2")
  shift 2
  [[ "$selected" == *" $name "* ]] || return 0
  if [ "$limit" -le 0 ]; then
    echo "== $name: skipped, the time budget is spent" | tee -a "$LOG"
    summary+=("$name: skipped (budget spent)")
    status=1
    return 1
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS first_line
  first_line=$(wc -l <"$LOG")
  # bash: COMMAND may be a function below. SIGINT first: pytest then still prints its summary of failures,
  # and the benchmark has saved every case it finished.
  timeout -s INT -k 10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1
  local rc=$?
  tail -n +"$((first_line + 1))" "$LOG" | tail -n 12
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
  summary+=("$name: exit $rc, $((SECONDS - start)) s$([ "$rc" -eq 124 ] && echo ' (time limit)')")
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# The extension is rebuilt only when its sources changed since the last build on this machine (the second
# command of a lease finds the first one's build; the working tree is copied anew, so mtimes say nothing).
# A prebuilt one is used where its digest matches and it loads with its CUDA kernels; the package itself
# is then found through PYTHONPATH (set below), not installed.
cuda_kernels_load() {  # and one CPU forward runs: a module built for another CPU may not
  "$PYTHON" -c "import torch, rnnkernels, rnnkernels.ops as o; assert o.LOAD_ERROR is None, o.LOAD_ERROR; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('rnnkernels::lstm_forward', 'CUDA'), 'no CUDA kernels'; \
m = torch.nn.LSTM(8, 40); x = torch.randn(5, 3, 8); \
torch.testing.assert_close(rnnkernels.LSTM.from_torch(m, backend='cpu')(x)[0], m(x)[0], atol=1e-5, rtol=1e-5)"
}
build() {
  local stamp=build/gpu_check.sources digest
  digest=$(sources_digest)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && cuda_kernels_load; then
    echo "up to date: $digest"
    return 0
  fi
  local prebuilt=no
  [ -f gpu-prebuilt/sources ] && [ "$(cat gpu-prebuilt/sources)" = "$digest" ] && prebuilt=yes
  if [ "$prebuilt" = yes ] && cp gpu-prebuilt/_C.*.so rnnkernels/ && cuda_kernels_load; then
    echo "prebuilt: $(ls gpu-prebuilt/*.so), $(cat gpu-prebuilt/built-with)"
  else
    [ "$prebuilt" = yes ] && echo "prebuilt: did not load here; building from source" && rm -f rnnkernels/_C.*.so
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || return 1
  fi
  mkdir -p build && echo "$digest" >"$stamp"
}

# pytest on the GPU: four workers share it where pytest-xdist is installed (small tests are latency-bound);
# where pytest-timeout is, a hung test (a kernel that never returns) is ended after 120 s with its stack
# printed, and under xdist only its worker, which is replaced, so the other tests still run.
pytest_gpu() {
  local options=(-q -rfE -p no:cacheprovider --maxfail=50)
  "$PYTHON" -c "import xdist" 2>/dev/null && options+=(-n 4)
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && options+=(--timeout 120 --timeout-method thread)
  "$PYTHON" -m pytest "${options[@]}" "$@"
}

bench() {  # bench DTYPE LIMIT [OPTION...]: the benchmark, starting no case within 40 s of the limit
  local dtype=$1 limit=$2
  shift 2
  "$PYTHON" -m rnnkernels.bench --device cuda --dtypes "$dtype" --repeats 5 --warmup 1 --min-sample-ms 5 \
    --time-limit $((limit > 40 ? limit - 40 : 0)) --json "$OUT/bench-$dtype.json" "$@"
}
export -f sources_digest cuda_kernels_load build pytest_gpu bench
export OUT PYTHON PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

: >"$LOG"
nvidia-smi >>"$LOG" 2>&1
if [[ "$selected" == *" build "* ]]; then
  phase build 200 build || { printf '%s\n' "${summary[@]}"; echo "build failed: nothing else can run"; exit 1; }
fi
phase registered 30 "$PYTHON" -c "import torch, rnnkernels; from rnnkernels import backends; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('rnnkernels::lstm_forward', 'CUDA'), 'no CUDA kernels'; \
print(rnnkernels.__file__, 'torch', torch.__version__, torch.cuda.get_device_name(), 'triton backend:', \
backends.unsupported('triton', torch.device('cuda'), torch.float32) or 'available')"
# No caching allocator under the sanitizer: every buffer its own allocation, so out-of-bounds accesses
# inside torch's memory pool are caught too.
sanitize=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --error-exitcode 1 --print-limit 20)
# The CUDA backend's GPU tests (and the modules' and the benchmark suite's); Triton's, which compile its
# kernels, in the second group (those of other files are the ones with "triton" in their names).
phase tests_cuda 120 pytest_gpu tests -m cuda --ignore tests/test_triton.py -k "not triton"
phase bench_bfloat16 220 bench bfloat16 "$(limit_for 220)"
phase sanitize_memcheck 100 "${sanitize[@]}" --tool memcheck "$PYTHON" scripts/sanitize_case.py
phase bench_float32 120 bench float32 "$(limit_for 120)" --word-lm
# Not the slow tests there: they compile every kernel variant for sm_90 with ptxas, which the GPU does anyway.
phase tests_triton 90 pytest_gpu tests/test_triton.py tests/test_autocast.py -m "cuda and not slow" -k triton
phase sweep 40 "$PYTHON" scripts/gpu_sweep.py --json "$OUT/sweep.json"
phase sanitize_racecheck 100 "${sanitize[@]}" --tool racecheck "$PYTHON" scripts/sanitize_case.py

runs=()
for run in "$OUT"/bench-*.json; do
  [ -f "$run" ] || continue
  runs+=("$run")
  echo "== benchmark (python -m rnnkernels.bench --report $run)" >>"$LOG"
  "$PYTHON" -m rnnkernels.bench --report "$run" >>"$LOG" 2>&1
done
if [ "${#runs[@]}" -gt 0 ]; then  # the issues' bars: every row in the log; here the first 30 unmet and the count
  echo "== bars (python scripts/bars.py ${runs[*]})" >>"$LOG"
  "$PYTHON" scripts/bars.py "${runs[@]}" >>"$LOG" 2>&1
  "$PYTHON" scripts/bars.py --unmet "${runs[@]}" 2>&1 | head -n 31
  tail -n 1 "$LOG"
fi
printf '%s\n' "${summary[@]}"
echo "gpu_check: $([ "$status" -eq 0 ] && echo PASSED || echo FAILED); log: $LOG"
exit "$status"
