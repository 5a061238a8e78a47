#!/usr/bin/env bash
# GPU check for a bare H100/H200 machine: torch (a CUDA build) and nvcc preinstalled, no network, no .venv,
# no pip installs. In one call of at most GPU_CHECK_BUDGET_S seconds (default 420: 7 minutes) it
#   1. records the environment,
#   2. builds the extension against the installed torch (sm_90),
#   3. reads the SASS of the build (cuobjdump) and checks it (tests/test_sass.py),
#   4. runs every test that needs a GPU (pytest -m cuda),
#   5. runs compute-sanitizer memcheck and racecheck on a small subset of the CUDA tests,
#   6. runs the GPU benchmarks (fake-quant tables, the QAT step's memory and time, int8 convs),
# and writes everything under OUTDIR, nothing into the checkout:
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
#   OUTDIR/summary.txt            one line per stage: exit status, seconds, limit
#   OUTDIR/<stage>.log            each stage's output (env, build, sass, tests, memcheck, racecheck, bench_*)
#   OUTDIR/junit.xml              the CUDA tests
#   OUTDIR/sass-sm_90.md/.json    registers, spills, instruction mix per kernel
#   OUTDIR/results/               the benchmarks' results (cuda-<gpu>.md/.json and cuda-<gpu>/<script>.*),
#                                 laid out as benchmarks/results/ is: copy them there to commit them
#
# The build happens in a copy of the sources under OUTDIR/work (with the caches and temporary files of
# torch.compile, Triton and Python), removed at the end unless GPU_CHECK_KEEP_WORK=1. Every stage runs
# under `timeout` with its own limit, cut to what the budget has left, and the stages before the
# benchmarks leave them BENCH_RESERVE seconds; a stage that fails or times out is recorded in the summary
# and the next one still runs. A missing tool (pytest, ninja, compute-sanitizer, cuobjdump) is recorded,
# never installed.
#
# Dry runs (a machine without a GPU): PYTHON=/path/to/python picks the interpreter, and
# GPU_CHECK_PREBUILT=1 takes the checkout's built qkernels/_C*.so instead of building.
set -u

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

BUDGET=${GPU_CHECK_BUDGET_S:-420}
RESERVE=10         # seconds kept for the summary and the clean-up
BENCH_RESERVE=${GPU_CHECK_BENCH_RESERVE_S:-190}  # seconds the earlier stages leave to the benchmarks
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# The GPU benchmarks, in order of priority: "LIMIT_S SCRIPT [ARGS...]", one line each (add yours here).
GPU_BENCHMARKS=(
  "100 bench_fake_quant --quick --compile-budget 40"
  "60 bench_qat_memory --quick --batch 32 --autocast bf16 --channels-last"
  "60 bench_conv_int8_gpu --quick"
  "40 bench_conv_int8 --quick"
  "40 bench_qat --quick --skip-training"
)

# --- a private copy of the sources, and every cache under OUTDIR/work -----------------------------------
WORK="$OUT/work"
SRC="$WORK/qkernels"  # tests read ../shared beside the checkout: linked below where the checkout has one
rm -rf "$WORK"
mkdir -p "$SRC" "$WORK/tmp" "$OUT/results"
cleanup() { [ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./benchmarks/results \
  --exclude='./qkernels/_C*.so' --exclude=./qkernels/_build_info.json --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude=.pytest_cache --exclude=./demo --exclude=./data --exclude=./shared -cf - . | tar -C "$SRC" -xf -
for shared in "$REPO/../shared" "$REPO/shared"; do  # data the tests read, linked (never copied)
  [ -d "$shared" ] && { ln -s "$(cd "$shared" && pwd)" "$WORK/shared"; break; }
done
cd "$SRC" || exit 2
export TMPDIR="$WORK/tmp" PYTHONPYCACHEPREFIX="$WORK/pycache" XDG_CACHE_HOME="$WORK/cache" \
  TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton" CUDA_CACHE_PATH="$WORK/nv" \
  TORCH_EXTENSIONS_DIR="$WORK/torch_extensions" MPLCONFIGDIR="$WORK/mpl"

# --- tools: the system python that has torch; the toolkit's binaries -------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
PY=${PY:-python3}
NVCC=$(command -v nvcc || true)
CUDA_ROOT=${CUDA_HOME:-}
if [ -z "$CUDA_ROOT" ] && [ -n "$NVCC" ]; then CUDA_ROOT=$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd); fi
[ -z "$CUDA_ROOT" ] && [ -d /usr/local/cuda ] && CUDA_ROOT=/usr/local/cuda
if [ -n "$CUDA_ROOT" ]; then  # the build, cuobjdump (sass_report) and compute-sanitizer all look here
  export CUDA_HOME="$CUDA_ROOT" PATH="$PATH:$CUDA_ROOT/bin"
fi
find_tool() {  # find_tool NAME: PATH, then the toolkit (bin/ and NAME/), else nothing
  command -v "$1" 2>/dev/null && return 0
  for c in "$CUDA_ROOT/$1/$1" /usr/local/cuda/bin/"$1" /usr/local/cuda/"$1"/"$1"; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 0
}
SANITIZER=$(find_tool compute-sanitizer)
HAVE_PYTEST=0
"$PY" -c "import pytest" >/dev/null 2>&1 && HAVE_PYTEST=1

left() { echo $(( BUDGET - RESERVE - ($(date +%s) - START) )); }

# stage NAME LIMIT_S CMD...: run CMD under timeout with the smaller of LIMIT_S and what the budget has
# left (less the benchmarks' reserve while BEFORE_BENCH=1), output to OUT/NAME.log; append
# "NAME rc=.. seconds=.. limit=.." to the summary.
BEFORE_BENCH=1
stage() {
  local name=$1 limit=$2
  shift 2
  local remaining
  remaining=$(left)
  [ "$BEFORE_BENCH" = 1 ] && remaining=$(( remaining - BENCH_RESERVE ))
  if [ "$remaining" -lt 15 ]; then
    echo "$name rc=skipped reason=budget-spent" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  local t0
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && note=" (timed out)"
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit$note" | tee -a "$SUMMARY"
  return 0
}

missing() {  # missing NAME WHAT: record a stage that cannot run here
  echo "$1 rc=missing reason=$2" | tee -a "$SUMMARY"
}

# --- 1. environment ---------------------------------------------------------------------------------
stage env 30 bash -c "
  set -x
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv
  nvidia-smi
  '$PY' --version
  '$PY' -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  '$PY' -c 'import torch; p = torch.cuda.get_device_properties(0); print(p, getattr(p, \"memory_clock_rate\", None), getattr(p, \"memory_bus_width\", None))'
  echo nvcc=$NVCC CUDA_ROOT=$CUDA_ROOT compute-sanitizer=$SANITIZER pytest=$HAVE_PYTEST
  [ -n '$NVCC' ] && '$NVCC' --version
  '$PY' -c 'import ninja' && echo ninja module present || echo 'no ninja module: the build compiles one file at a time'
  command -v ninja || true
  git -C '$REPO' log --oneline -1 || true
  nproc; free -g; df -h '$OUT'
"

# --- 2. build (in the copy) -------------------------------------------------------------------------
if [ "${GPU_CHECK_PREBUILT:-0}" = 1 ]; then
  stage build 30 bash -c "cp -v '$REPO'/qkernels/_C*.so '$REPO'/qkernels/_build_info.json qkernels/"
else
  stage build 200 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
fi
BUILT=$(timeout 60 "$PY" -c "import qkernels, sys; sys.exit(0 if qkernels.has_cuda_kernels() else 1)" >/dev/null 2>&1 && echo 1 || echo 0)
[ "$BUILT" = 1 ] || echo "build: qkernels has no CUDA kernels (see build.log); the GPU stages below will fail" | tee -a "$SUMMARY"

# --- 3. SASS of the build: registers, spills, instruction mix, and the designs' requirements -----------
stage sass 60 bash -c "
  '$PY' -m benchmarks.sass_report --out-dir '$OUT' &&
  if [ $HAVE_PYTEST = 1 ]; then '$PY' -m pytest -q -p no:cacheprovider tests/test_sass.py; else echo 'pytest missing'; exit 3; fi
"

# --- 4. the CUDA tests (every test that needs a GPU, see tests/conftest.py) ---------------------------
if [ "$HAVE_PYTEST" = 1 ]; then
  stage tests 90 "$PY" -m pytest -q -p no:cacheprovider tests -m cuda --junitxml="$OUT/junit.xml"
else
  missing tests "pytest is not installed for $PY"
fi

# --- 5. compute-sanitizer on a small subset: every fake-quant kernel (small and multi-launch paths,
#        strided inputs, masks) and the int8 conv/linear kernels ------------------------------------
SUBSET=(tests/test_ops_fake_quant.py::test_cuda_matches_cpu_bit_for_bit tests/test_ops_int8.py::test_cuda_linear_matches_cpu)
if [ "$HAVE_PYTEST" = 1 ] && [ -n "$SANITIZER" ]; then
  # without torch's caching allocator every tensor is its own allocation, so memcheck sees an access past
  # a tensor's end instead of a read inside a cached block
  stage memcheck 50 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 20 \
    "$PY" -m pytest -q -x -p no:cacheprovider "${SUBSET[@]}" -k "float32 or bfloat16 or linear"
  stage racecheck 35 "$SANITIZER" --tool racecheck --racecheck-report hazard --error-exitcode 3 --print-limit 20 \
    "$PY" -m pytest -q -x -p no:cacheprovider "${SUBSET[@]}" -k "float32 or linear"
else
  missing memcheck "compute-sanitizer=${SANITIZER:-none} pytest=$HAVE_PYTEST"
  missing racecheck "compute-sanitizer=${SANITIZER:-none} pytest=$HAVE_PYTEST"
fi

# --- 6. the GPU benchmarks: each publishes into OUTDIR/results (merged per device) ---------------------
BEFORE_BENCH=0
for line in "${GPU_BENCHMARKS[@]}"; do
  read -r limit script args <<< "$line"
  # shellcheck disable=SC2086  (args are words)
  stage "$script" "$limit" "$PY" -m "benchmarks.$script" --device cuda --results-dir "$OUT/results" $args
done

# --- results ----------------------------------------------------------------------------------------
md=$(ls -t "$OUT"/results/cuda-*.md 2>/dev/null | head -1)
if [ -n "$md" ]; then
  echo "results: $md" | tee -a "$SUMMARY"
else
  echo "no results file was written (see the bench_*.log files)" | tee -a "$SUMMARY"
fi

echo "total seconds=$(( $(date +%s) - START )) budget=$BUDGET" | tee -a "$SUMMARY"
# Exit status: 0 only when every stage passed.
if grep -qE "rc=([1-9]|skipped|missing)" "$SUMMARY"; then exit 1; fi
exit 0
