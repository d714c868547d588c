"""The GPU kernels compiled offline, with Triton's own compiler and no GPU
(`python -m fastlora.kernels.inspect`): every kernel in every configuration of its launch
tables compiles for the H100/H200 (sm_90) and the RTX 4090/3090 (sm_89, sm_86) without
spilling registers, and the PTX checks that report loads and barriers count what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastlora.kernels import inspect as kernel_inspect  # noqa: E402

if not kernel_inspect._ptxas():
    pytest.skip("this Triton ships no ptxas", allow_module_level=True)


@pytest.mark.parametrize("arch", sorted(kernel_inspect.ARCHS))
def test_every_kernel_configuration_compiles_without_spills(arch):
    # In its own process: the suite runs Triton's interpreter, which replaces the compiler.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fastlora.kernels.inspect", "--arch", arch, "--json"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    reports = json.loads(run.stdout)
    specs = list(kernel_inspect.kernel_configs(arch))
    assert [(r["kernel"], r["config"]) for r in reports] == [(s.kernel, s.config) for s in specs]
    assert {r["arch"] for r in reports} == {arch}
    for r in reports:
        assert set(r) == {"kernel", "config", "arch", "registers", "spill_bytes", "vector_loads_128",
                          "barriers_in_loop"}
        assert 0 < r["registers"] <= 255, r
        assert r["spill_bytes"] == 0, r
    # The GEMV's tiles differ: the table has as many configurations as the launcher tries.
    gemv = [r for r in reports if r["kernel"] == "matmul_4bit GEMV"]
    assert len(gemv) == len(kernel_inspect.matmul._SMALL_M_TILES)
    # The one-row GEMV reads its packed bytes 16 at a time and synchronizes no thread inside
    # its K loop (one reduction, after it), each tile alone and split through the workspace.
    one_row = [r for r in reports if r["kernel"] == "matmul_4bit one-row GEMV"]
    assert len(one_row) == 2 * len(kernel_inspect.matmul._GEMV_TILES)
    assert {r["config"]["SPLIT"] for r in one_row} == {1, 4}
    assert all(r["vector_loads_128"] >= 1 and r["barriers_in_loop"] == 0 for r in one_row), one_row


def test_ptx_checks_count_what_they_say():
    ptx = "\n".join([
        "\tld.global.v4.b32 \t{ %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "\t@%p1 ld.global.L1::evict_last.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 ];",
        "\tld.global.v2.b64 { %rd3, %rd4 }, [ %rd5 ];",
        "\tld.global.v2.b32 { %r9, %r10 }, [ %rd6 ];",  # 64 bits: not counted
        "\tld.global.b32 %r11, [ %rd7 ];",
        "\tst.global.v4.b32 [ %rd8 ], { %r1, %r2, %r3, %r4 };",  # a store: not counted
        "$L__BB0_1:",
        "\tbar.sync \t0;",
        "\t@%p2 bra \t$L__BB0_1;",
        "\tbar.sync \t0;",  # after the loop
        "\tbra.uni \t$L__BB0_3;",  # a forward branch: no loop
        "$L__BB0_3:",
        "\tbar.sync \t0;",
        "\tret;",
    ])
    assert kernel_inspect.vector_loads_128(ptx) == 3
    assert kernel_inspect.barriers_in_loops(ptx) == 1
    assert kernel_inspect.barriers_in_loops(ptx.replace("@%p2 bra", "@%p2 mov")) == 0
