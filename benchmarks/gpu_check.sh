#!/usr/bin/env bash
# GPU check for an H100/H200 machine with torch (CUDA build) and nvcc preinstalled, no internet, no .venv:
# build the extension in place against the installed torch, run the CUDA tests, run the benchmarks on
# the GPU, and leave logs and results in OUTDIR (flat, at most 8 files).
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Every stage runs under `timeout`; a failing stage is recorded and the next one still runs. The whole
# script stays inside GPU_CHECK_BUDGET_S seconds (default 420, i.e. well inside 8 minutes).
# Files in OUTDIR: summary.txt (each stage's exit status and seconds), env.log, build.log, tests.log,
# junit.xml, bench.log, results.md, results.json.
set -u

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2

BUDGET=${GPU_CHECK_BUDGET_S:-420}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# The system python that has torch (never a network install).
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
PY=${PY:-python3}

# stage NAME LIMIT_S CMD...: run CMD under timeout with the smaller of LIMIT_S and what the budget has
# left, output to OUT/NAME.log; append "NAME rc=.. seconds=.. limit=.." to the summary.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then
    echo "$name rc=skipped reason=budget-spent" >> "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (timed out)"
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit$note" >> "$SUMMARY"
  return 0
}

stage env 60 bash -c "
  set -x
  nvidia-smi
  command -v nvcc && nvcc --version
  $PY --version
  $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  $PY -c 'import ninja' && echo ninja module present || echo 'no ninja module (serial build)'
  command -v ninja || true
  git log --oneline -1 || true
  nproc; free -g
"

stage build 200 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" setup.py build_ext --inplace

# -m cuda: every test that needs a GPU (tests/conftest.py marks them), whatever its name.
stage tests 90 "$PY" -m pytest -q tests -m cuda -p no:cacheprovider --junitxml="$OUT/junit.xml"

# Results go to a scratch folder so the checkout's CPU results are not touched; copied out below.
SCRATCH=$(mktemp -d)
# The GPU benchmarks only, each given at least run_all's 30 s minimum: run_all's budget is the stage's
# time less 20 s for start-up and writing the merged files.
BENCH_SCRIPTS="bench_fake_quant bench_conv_int8 bench_qat"
BENCH_SCRIPTS="$BENCH_SCRIPTS bench_conv_int8_gpu"
bench_left=$(( BUDGET - ($(date +%s) - START) ))
[ "$bench_left" -gt 150 ] && bench_left=150
stage bench 150 "$PY" -m benchmarks.run_all --device cuda --only $BENCH_SCRIPTS \
  --budget $(( bench_left > 110 ? bench_left - 20 : 90 )) --results-dir "$SCRATCH"
md=$(ls "$SCRATCH"/cuda-*.md 2>/dev/null | head -1)
if [ -n "$md" ]; then
  cp "$md" "$OUT/results.md"
  cp "${md%.md}.json" "$OUT/results.json" 2>/dev/null
else
  echo "no results file was written (see bench.log)" > "$OUT/results.md"
fi
rm -rf "$SCRATCH"

echo "total seconds=$(( $(date +%s) - START )) budget=$BUDGET" >> "$SUMMARY"
cat "$SUMMARY"
# Exit status: 0 only when every stage passed.
if grep -q "rc=[1-9s]" "$SUMMARY"; then exit 1; fi
exit 0
