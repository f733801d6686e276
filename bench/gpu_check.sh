#!/usr/bin/env bash
# One-shot GPU check: build for the local GPU, the GPU tests of the CUDA ops (the CPU
# tests are CI's), a compute-sanitizer memcheck smoke run, the quick benchmark (batch 1
# and 128, every provider on one layer per op, the whole model; JSON and PNG), then the
# Triton GPU tests with what is left of the budget (each new shape compiles its kernels:
# 62 tests took ~4.5 s each on an H200, more than the budget has). Meant to finish in
# under 8 minutes; each step is capped with `timeout` and the whole run with a budget.
# Not yet run end to end on a GPU: its steps were run separately (bench/device_run.sh).
#
#   bench/gpu_check.sh OUTDIR
#
# OUTDIR gets build.log, tests.log, tests_tile.log, sanitizer.log, bench.log, bench.json,
# bench.png, tests_triton.log and gpu_check.log
# (everything). A failing step is recorded and the next one still runs; the last line is a
# one-line summary and the exit status is 0 only when every step passed.
# Environment: PYTHON (default python), GPU_CHECK_BUDGET_S (default 470),
# GPU_CHECK_SKIP_BUILD=1 (use the extension already built in the tree when it loads
# with CUDA kernels: for a tree built beforehand for this GPU and torch).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

SUMMARY=()
FAILED=0

# step NAME CAP_S RESERVE_S CMD...: run CMD for at most CAP_S seconds and never into the
# last RESERVE_S seconds of the budget (kept for the later steps); output to the screen and
# OUTDIR/NAME.log; note the outcome in the summary.
step() {
  local name=$1 cap=$2 left=$((BUDGET - SECONDS - $3)) rc t0=$SECONDS
  shift 3
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "=== $name: skipped, ${left}s of the budget left"
    SUMMARY+=("$name=no-time")
    FAILED=1
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  local took=$((SECONDS - t0)) outcome=ok
  if ((rc == 124 || rc == 137)); then
    outcome="TIMEOUT"
  elif ((rc != 0)); then
    outcome="FAIL($rc)"
  fi
  [[ $outcome == ok ]] || FAILED=1
  echo "=== $name: $outcome in ${took}s"
  SUMMARY+=("$name=$outcome/${took}s")
}

echo "gpu_check: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>/dev/null \
  || echo "nvidia-smi: not available"
# build for this GPU only: TORCH_CUDA_ARCH_LIST from its compute capability (9.0 if unknown)
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 \
  | tr -d ' ' || true)
[[ $ARCH =~ ^[0-9]+\.[0-9]+$ ]] || ARCH=9.0
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.is_available())" || true

if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]] && "$PY" -c "import mobilenet_ext, sys; \
sys.exit(0 if mobilenet_ext.compiled_with_cuda() else 1)"; then
  echo "=== build: skipped (GPU_CHECK_SKIP_BUILD=1 and the extension in place has CUDA kernels)"
  SUMMARY+=("build=prebuilt")
else
  step build 200 230 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="$ARCH" MOBILENET_EXT_CUDA=1 \
    "$PY" -m pip install -v --no-build-isolation --no-deps -e .
fi

# the CUDA ops' GPU tests: ~80 s on an H200 (GPU runs 2 and 3); those of the depthwise
# shared-memory tile kernels (MOBILENET_EXT_DW_TILE=1, off by default, never run on a GPU
# yet: "tile" in the test id) after them in a process of their own, so that a fault
# there cannot take the default paths' results with it
step tests 130 190 env MOBILENET_EXT_EXPECT_CUDA=1 "$PY" -m pytest -q -m gpu -k "not tile" \
  tests/test_dw_conv.py tests/test_pw_conv.py tests/test_vec_paths.py tests/test_models.py
step tests_tile 40 150 env MOBILENET_EXT_EXPECT_CUDA=1 "$PY" -m pytest -q -m gpu -k tile \
  tests/test_vec_paths.py

SANITIZER=$(command -v compute-sanitizer || true)
TORCH_CUDA_HOME=$("$PY" -c 'from torch.utils.cpp_extension import CUDA_HOME as h; print(h or "")' \
  2>/dev/null || true)
for dir in "${CUDA_HOME:-}" "$TORCH_CUDA_HOME" /usr/local/cuda; do
  if [[ -z $SANITIZER && -n $dir && -x $dir/bin/compute-sanitizer ]]; then
    SANITIZER=$dir/bin/compute-sanitizer
  fi
done
if [[ -n $SANITIZER ]]; then
  step sanitizer 90 130 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" -m bench.sanitizer_smoke
else
  echo "=== sanitizer: skipped, compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
  SUMMARY+=("sanitizer=not-found")
fi

step bench 200 20 "$PY" -m bench --quick --batch 1,128 --json "$OUT/bench.json" \
  --plot "$OUT/bench.png"

step tests_triton 120 0 "$PY" -m pytest -q -m gpu tests/test_triton.py

echo "gpu_check summary: ${SUMMARY[*]} total ${SECONDS}s -> $OUT"
exit "$FAILED"
