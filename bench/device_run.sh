#!/usr/bin/env bash
# The developers' one-shot device call (not CI; bench/gpu_check.sh is the user-facing
# runner): use the extension prebuilt for the device's torch if it loads (else build),
# GPU tests of the CUDA ops, the benchmark (infer + train, JSON), Triton GPU tests and
# Triton rows. Each step is capped so the whole call ends inside BUDGET seconds; every
# output goes to $OUT as it is written; run.log is the summary.
# A prebuilt mobilenet_ext/_C*.so is used only when mobilenet_ext/_C.srchash (carried with
# it) matches the sources: after prebuilding, `bash bench/device_run.sh --srchash >
# mobilenet_ext/_C.srchash`. A stale one would ignore new kernels and their knobs.
srchash() { find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16; }
if [ "${1:-}" = --srchash ]; then srchash; exit 0; fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=/opt/torch/.venv/bin/python; [ -x $PY ] || PY=python
BUDGET=${BUDGET:-420}
export PYTHONUNBUFFERED=1 MOBILENET_EXT_EXPECT_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0
LOG=$OUT/run.log
# At most 8 files come back from $OUT: run.log, misaligned.log, bench.log/.json/.png,
# tests_cuda.log, knobs.log (the steps after the tests append to it), model_b1.json.
step() {  # step NAME CAP CMD...: output to $OUT/${STEPLOG:-NAME}.log, never past the budget
  local name=$1 cap=$2 t0=$SECONDS; shift 2
  local left=$((BUDGET - SECONDS)); ((cap > left)) && cap=$left
  if ((cap < 10)); then echo "$name: no time left" >> "$LOG"; return; fi
  echo "=== $name" >> "$OUT/${STEPLOG:-$name}.log"
  timeout "$cap" "$@" >> "$OUT/${STEPLOG:-$name}.log" 2>&1
  echo "$name rc=$? $((SECONDS - t0))s (cap ${cap}s)" >> "$LOG"
}
{ date -u; echo "tree: ${TREE:-?}"
  nvidia-smi --query-gpu=name,compute_cap,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch,triton;print(torch.__version__,torch.version.cuda,torch.backends.cudnn.version(),triton.__version__)"
} > "$LOG" 2>&1
if [ "$(cat mobilenet_ext/_C.srchash 2>/dev/null)" = "$(srchash)" ] && $PY -c "import \
mobilenet_ext,sys; sys.exit(0 if mobilenet_ext.compiled_with_cuda() else 1)" >> "$LOG" 2>&1; then
  echo "prebuilt extension matches the sources and loads with CUDA kernels" >> "$LOG"
else
  echo "no current prebuilt extension: building" >> "$LOG"
  rm -f mobilenet_ext/_C*.so
  step build 200 env MOBILENET_EXT_CUDA=1 $PY setup.py build_ext --inplace
  tail -5 "$OUT/build.log" >> "$LOG"; rm -f "$OUT/build.log"  # at most 8 files come back
fi
# a misaligned-address fault seen in run 1 (test_pw_paths, Cout 264 fp32, misaligned x):
# alone and synchronous first, so it cannot poison the rest and its traceback names the op
step misaligned 40 env CUDA_LAUNCH_BLOCKING=1 $PY -m pytest -q -p no:cacheprovider -x -rf \
  "tests/test_vec_paths.py::test_pw_paths[case2-dtype0-False-False-1-True]"
step bench 130 $PY -m bench --op all --mode both --providers eager,folded,ours --batch 128 \
  --repeats 20 --warmup 3 --json "$OUT/bench.json" --plot "$OUT/bench.png"
# the kernels never run on a GPU yet (the shared-memory tile ones: "tile" in the test id)
# in a process of their own after the others: a fault there cannot take the rest with it
step tests_cuda 110 $PY -m pytest -q -p no:cacheprovider -m gpu -rf -k "not tile" \
  tests/test_vec_paths.py tests/test_dw_conv.py tests/test_pw_conv.py
STEPLOG=tests_cuda step tests_tile 50 $PY -m pytest -q -p no:cacheprovider -m gpu -rf -k tile \
  tests/test_vec_paths.py
export STEPLOG=knobs
step sweep 75 bash -c "$PY -m bench.sweep --op dw --mode infer --setting MOBILENET_EXT_DW_TILE=1 \
--setting MOBILENET_EXT_VEC_OCC=1 && \
$PY -m bench.sweep --op dw --mode train --setting MOBILENET_EXT_DW_TILE=1 \
--setting MOBILENET_EXT_DW_TILE=1,MOBILENET_EXT_DW_TILE_SPLIT=1 \
--setting MOBILENET_EXT_DW_SPLIT=0 --repeats 15 && \
$PY -m bench.sweep --op dw --mode train --layer 'v3 120@28x28 s1 k5' \
--layer 'v3 672@14x14 s2 k5' --setting MOBILENET_EXT_DW_TILE=1 --repeats 10 && \
$PY -m bench.sweep --op pw --mode train --setting MOBILENET_EXT_PW_SAVE=1 \
--setting MOBILENET_EXT_VEC=0 --repeats 15"
step profile 45 bash -c "$PY -m bench.profile --op dw --mode train --steps 3 \
--layer '144@56x56 s1' && MOBILENET_EXT_DW_TILE=1 $PY -m bench.profile --op dw --mode train \
--steps 3 --layer '144@56x56 s1' && $PY -m bench.profile --op pw --mode train --steps 3 \
--layer 'expand 24->144@56x56'"
# the whole model with both unmeasured variants on (the bench step above has the defaults)
step model_knobs 45 env MOBILENET_EXT_DW_TILE=1 MOBILENET_EXT_PW_SAVE=1 $PY -m bench --op model \
  --mode train --providers eager,ours --batch 128 --repeats 10 --warmup 2
# batch-1 inference of the whole model: from CUDA graphs, and the eager loop's time (the
# Python and launch overhead per fused call) in ungraphed_stats
step model_b1 30 $PY -m bench --op model --mode infer --providers eager,ours --batch 1 \
  --repeats 30 --warmup 5 --json "$OUT/model_b1.json"
cat "$LOG"
