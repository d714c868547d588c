#!/usr/bin/env bash
# One GPU session's checks, as one command on a lent CUDA machine that has torch and triton
# but no Rust toolchain and no bitsandbytes: installs the wheels carried in .whl/ (an abi3
# fastlora wheel built with `maturin build --release -o .whl`, and a bitsandbytes wheel),
# overlays the tree's Python sources, then runs benches/gpu_bench.py (correctness at real sizes, then timings) and the Triton
# kernel tests on the GPU. Logs and the results JSON go to $OUT (or ./gpu-out).
#
#   bash benches/gpu_session.sh [BENCH_SECONDS] [TEST_SECONDS] [PYTEST_K_EXPRESSION]
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
BENCH_SECONDS="${1:-330}"
TEST_SECONDS="${2:-150}"
TEST_FILTER="${3:-}"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
# The tree's Python sources replace the wheel's, so a Python-only change needs no new wheel.
cp -r python/fastlora/. /tmp/site/fastlora/
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton, bitsandbytes, fastlora; print(torch.__version__, triton.__version__, bitsandbytes.__version__, fastlora.__file__)"

echo "== gpu_bench.py (at most ${BENCH_SECONDS}s)"
timeout "$BENCH_SECONDS" python3 benches/gpu_bench.py --results-dir "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
echo "gpu_bench exit: ${PIPESTATUS[0]}"

echo "== Triton kernel tests on the GPU (at most ${TEST_SECONDS}s)"
# The tests must import the installed wheel (it holds the Rust extension), not ./python.
timeout "$TEST_SECONDS" python3 -m pytest -q -p no:cacheprovider -n 12 --rootdir=. ${TEST_FILTER:+-k "$TEST_FILTER"} tests/test_triton_kernels.py \
  2>&1 | tee "$OUT/pytest_triton.log" | tail -40
echo "pytest exit: ${PIPESTATUS[0]}"
