#!/usr/bin/env bash
# one-shot device run (session 2): build, GPU tests, bench; everything to $OUT as it goes
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PY=/opt/torch/.venv/bin/python; [ -x $PY ] || PY=python
{ date -u; git rev-parse HEAD; nvidia-smi --query-gpu=name,compute_cap,clocks.max.sm,clocks.max.mem --format=csv; $PY -c "import torch,triton;print(torch.__version__,torch.version.cuda,torch.backends.cudnn.version(),triton.__version__)"; } > $OUT/env.txt 2>&1
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 MOBILENET_EXT_CUDA=1
S=$SECONDS
timeout 170 $PY setup.py build_ext --inplace > $OUT/build.log 2>&1; echo "build rc=$? $((SECONDS-S))s" >> $OUT/env.txt
export MOBILENET_EXT_EXPECT_CUDA=1
S=$SECONDS
timeout 80 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_dw_conv.py tests/test_pw_conv.py tests/test_cpu_isa.py -rf > $OUT/tests_cuda.log 2>&1; echo "tests_cuda rc=$? $((SECONDS-S))s" >> $OUT/env.txt
S=$SECONDS
timeout 70 $PY -m bench --op all --mode infer --providers eager,folded,ours --repeats 30 --warmup 5 --json $OUT/bench_infer.json > $OUT/bench_infer.log 2>&1; echo "bench_infer rc=$? $((SECONDS-S))s" >> $OUT/env.txt
S=$SECONDS
timeout 60 $PY -m bench --op all --mode train --providers eager,ours --repeats 20 --warmup 3 --json $OUT/bench_train.json > $OUT/bench_train.log 2>&1; echo "bench_train rc=$? $((SECONDS-S))s" >> $OUT/env.txt
S=$SECONDS
timeout 40 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_triton.py tests/test_models.py -x -rf > $OUT/tests_triton.log 2>&1; echo "tests_triton rc=$? $((SECONDS-S))s" >> $OUT/env.txt
cat $OUT/env.txt
