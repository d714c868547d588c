#!/usr/bin/env bash
# One GPU session's checks, as one command on a lent CUDA machine that has torch and triton
# but no Rust toolchain and no bitsandbytes: installs the wheels carried in .whl/ (an abi3
# fastlora wheel built with `maturin build --release -o .whl`, and a bitsandbytes wheel),
# overlays the tree's Python sources, then runs benches/gpu_bench.py (correctness at real sizes, then timings) and the Triton
# kernel tests on the GPU. Logs and the results JSON go to $OUT (or ./gpu-out).
#
#   bash benches/gpu_session.sh [BENCH_SECONDS] [TEST_SECONDS] [PYTEST_K_EXPRESSION] [TRAIN_SECONDS]
#
# A zero time skips that part. TRAIN_SECONDS > 0 also runs benches/train_compare.py on the GPU
# (a ~1B-parameter Llama, fastlora against transformers + peft + bitsandbytes). The parts run
# one after the other: keep their sum (plus about 30 s of set-up) under the device tool's
# per-command limit, e.g. `bash benches/gpu_session.sh 200 0 "" 300`.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
BENCH_SECONDS="${1:-330}"
TEST_SECONDS="${2:-150}"
TEST_FILTER="${3:-}"
TRAIN_SECONDS="${4:-0}"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
# The tree's Python sources replace the wheel's, so a Python-only change needs no new wheel.
cp -r python/fastlora/. /tmp/site/fastlora/
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton, bitsandbytes, fastlora; print(torch.__version__, triton.__version__, bitsandbytes.__version__, fastlora.__file__)" \
  || exit 1
if [ "$TRAIN_SECONDS" -gt 0 ]; then
  python3 -c "import transformers, peft; print('transformers', transformers.__version__, 'peft', peft.__version__)" || exit 1
fi

if [ "$BENCH_SECONDS" -gt 0 ]; then
  echo "== gpu_bench.py (at most ${BENCH_SECONDS}s)"
  timeout -k 10 "$BENCH_SECONDS" python3 benches/gpu_bench.py --results-dir "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
  echo "gpu_bench exit: ${PIPESTATUS[0]}"
fi

if [ "$TRAIN_SECONDS" -gt 0 ]; then
  echo "== train_compare.py on the GPU (at most ${TRAIN_SECONDS}s)"
  timeout -k 10 "$TRAIN_SECONDS" python3 benches/train_compare.py --device cuda --model-size 1b --batch-size 8 \
    --max-length 512 --steps 12 --warmup 3 --json "$OUT/train_compare-1b-cuda.json" 2>&1 | tee "$OUT/train_compare.log"
  echo "train_compare exit: ${PIPESTATUS[0]}"
fi

[ "$TEST_SECONDS" -gt 0 ] || exit 0
echo "== Triton kernel tests on the GPU (at most ${TEST_SECONDS}s)"
# The tests must import the installed wheel (it holds the Rust extension), not ./python.
timeout -k 10 "$TEST_SECONDS" python3 -m pytest -q -p no:cacheprovider -n 12 --rootdir=. ${TEST_FILTER:+-k "$TEST_FILTER"} tests/test_triton_kernels.py \
  2>&1 | tee "$OUT/pytest_triton.log" | tail -40
echo "pytest exit: ${PIPESTATUS[0]}"
