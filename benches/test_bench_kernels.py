"""pytest-benchmark benchmarks of the CPU kernels, fastlora against bitsandbytes and dense
torch on the same data. Not part of the test run (`testpaths` is tests/); run with

    pytest benches/test_bench_kernels.py --benchmark-enable --benchmark-group-by=param:case

`fastlora bench` prints the same comparisons as ratios from one process.
"""

import pytest

from fastlora import bench

CASES = ["dequantize", "matmul_m1", "matmul_m512", "layer", "model_step"]
IMPLS = ["fastlora", "bitsandbytes", "dense"]


@pytest.fixture(scope="module")
def built():
    return {case: bench.build(case, quick=False) for case in CASES}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_speed(benchmark, built, case, impl):
    impls = built[case]
    name = "dense copy" if case == "dequantize" and impl == "dense" else impl
    if name not in impls:
        pytest.skip(f"{impl} is not installed")
    benchmark.pedantic(impls[name], rounds=7, warmup_rounds=1)
