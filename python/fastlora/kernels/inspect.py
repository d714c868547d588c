"""What the GPU kernels compile to, without a GPU: `python -m fastlora.kernels.inspect --arch sm_90 [--json]`.

Every kernel in every configuration of the tables it is launched with is compiled by
Triton's own compiler for the named architecture (sm_90: H100/H200; sm_89, sm_86: RTX
4090/3090), and its PTX is assembled by the `ptxas` Triton ships. For each it reports the
registers per thread, the bytes spilled to local memory, the 128-bit global loads in the PTX
(`ld.global.v4.b32` and kin: the widest a thread can issue) and the barriers inside a loop
(`bar.sync` between a loop's label and its backward branch: a reduction across threads at
every step of the loop). One specialization stands for each configuration: bf16 activations,
NF4 with double-quantized scales, block size 64, bias and LoRA on where the kernel takes
them (the most registers a configuration needs), pointers 16-byte aligned and the weight's
sizes multiples of 16, as a launch on such tensors specializes them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import dequantize, lora_batched, matmul

ARCHS = {"sm_90": 90, "sm_89": 89, "sm_86": 86}
_WARP = 32
_VECTOR_128 = re.compile(
    r"^\s*(?:@%p\d+\s+)?ld\.global(?:\.[A-Za-z0-9_:]+)*?\.(?:v4\.[bfsu]32|v2\.[bfsu]64|v8\.[bfsu]16)\b")
_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_BARRIER = re.compile(r"^\s*(?:@%p\d+\s+)?(?:bar\.sync|barrier\.sync|bar\.red)\b")
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class KernelConfig:
    """One compilation: a kernel, its compile-time constants and launch options."""

    kernel: str
    config: dict
    fn: object
    signature: dict[str, str]
    constants: dict
    num_warps: int
    num_stages: int = 3


@dataclass
class Report:
    kernel: str
    config: dict
    arch: str
    registers: int
    spill_bytes: int
    vector_loads_128: int
    barriers_in_loop: int


_MATMUL_SIGNATURE = {
    "a_ptr": "*bf16", "packed_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32",
    "code2_ptr": "*fp32", "offset_ptr": "*fp32", "bias_ptr": "*bf16", "u_ptr": "*fp32", "up_ptr": "*fp32",
    "out_ptr": "*bf16", "sums_ptr": "*fp32", "counts_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "rank": "i32",
    "lora_scaling": "fp32", "M_BUCKET": "i32",
}
_NESTED = {"NESTED": True, "NESTED_BLOCKSIZE": 256}
# Sizes taken as multiples of 16, as they are in the models measured (4096, 11008, 14336).
_ALIGNED_SIZES = {"N", "K", "K_BYTES", "numel", "n_bytes"}


def _matmul_config(kernel: str, tile: dict, transposed: bool, use_dot: bool, warps: int, stages: int) -> KernelConfig:
    constants = {"BLOCKSIZE": 64, **_NESTED, "K_ALIGNED": True, "TRANSPOSED": transposed, "HAS_BIAS": not transposed,
                 "HAS_LORA": not transposed, "RANK_BLOCK": 16, "USE_DOT": use_dot, "SPLIT": 1,
                 "FP32_PRECISION": "ieee", "GROUP_M": 8 if use_dot else 1, **tile}
    return KernelConfig(kernel, {**tile, "num_warps": warps, "num_stages": stages}, matmul._matmul_4bit_kernel,
                        dict(_MATMUL_SIGNATURE), constants, warps, stages)


def kernel_configs(arch: str = "sm_90") -> Iterator[KernelConfig]:
    """Every kernel and configuration the launchers use on `arch` (their tables, or their one choice)."""
    for bm, bo, br, warps, stages in matmul.large_m_tiles(ARCHS[arch]):
        yield _matmul_config("matmul_4bit large-M (tl.dot)", {"BLOCK_M": bm, "BLOCK_OUT": bo, "BLOCK_RED": br},
                             False, True, warps, stages)
    for bo, br, warps, stages in matmul._SMALL_M_TILES:
        yield _matmul_config("matmul_4bit GEMV", {"BLOCK_M": 1, "BLOCK_OUT": bo, "BLOCK_RED": br}, False, False,
                             warps, stages)
    for (bo, bb, warps), split in itertools.product(matmul._GEMV_TILES, (1, 4)):  # 4: through the workspace
        pointers = {name: kind for name, kind in _MATMUL_SIGNATURE.items() if name.endswith("_ptr")}
        yield KernelConfig(
            "matmul_4bit one-row GEMV", {"BLOCK_OUT": bo, "BLOCK_BYTES": bb, "SPLIT": split, "num_warps": warps},
            matmul._gemv_4bit_kernel,
            {**pointers, "N": "i32", "K": "i32", "K_BYTES": "i32", "rank": "i32", "lora_scaling": "fp32"},
            {"BLOCKSIZE": 64, **_NESTED, "HAS_BIAS": True, "HAS_LORA": True, "RANK_BLOCK": 16, "SPLIT": split,
             "BLOCK_OUT": bo, "BLOCK_BYTES": bb}, warps, 1)
    for bo, br, warps, stages in matmul._SMALL_M_TRANSPOSED_TILES:
        yield _matmul_config("matmul_4bit GEMV transposed", {"BLOCK_M": 1, "BLOCK_OUT": bo, "BLOCK_RED": br}, True,
                             False, warps, stages)
    scales = {"absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32"}
    for per_program, warps in dequantize.DEQUANTIZE_CONFIGS:
        yield KernelConfig(
            "dequantize_4bit", {"BYTES": per_program, "num_warps": warps}, dequantize._dequantize_4bit_kernel,
            {"packed_ptr": "*u8", "code_ptr": "*fp32", **scales, "out_ptr": "*bf16", "numel": "i64",
             "n_bytes": "i64"}, {"BLOCKSIZE": 64, **_NESTED, "BYTES": per_program}, warps)
    rows = dequantize._QUANTIZE_ELEMENTS // 64
    yield KernelConfig(
        "quantize_4bit", {"ROWS": rows, "num_warps": 4}, dequantize._quantize_4bit_kernel,
        {"a_ptr": "*bf16", "bounds_ptr": "*fp32", "order_ptr": "*i32", "packed_ptr": "*u8", "absmax_ptr": "*fp32",
         "numel": "i64"}, {"BLOCKSIZE": 64, "ROWS": rows}, 4)
    yield KernelConfig(
        "quantize_blockwise", {"ROWS": dequantize._QUANTIZE_ELEMENTS // 256, "num_warps": 4},
        dequantize._quantize_blockwise_kernel,
        {"a_ptr": "*fp32", "code_ptr": "*fp32", "q_ptr": "*u8", "absmax_ptr": "*fp32", "numel": "i64"},
        {"BLOCKSIZE": 256, "BLOCK": 256, "ROWS": dequantize._QUANTIZE_ELEMENTS // 256,
         "GRID_STEPS": dequantize._GRID_STEPS}, 4)
    yield KernelConfig(
        "lora_batched", {"BLOCK_O": lora_batched._BLOCK_O, "BLOCK_R": 16, "num_warps": 4},
        lora_batched._lora_batched_kernel,
        {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "indices_ptr": "*i64", "scaling_ptr": "*fp32",
         "y_ptr": "*bf16", "K": "i32", "R": "i32", "N_OUT": "i32"},
        {"BLOCK_K": lora_batched._BLOCK_K, "BLOCK_R": 16, "BLOCK_O": lora_batched._BLOCK_O}, 4)
    yield KernelConfig(
        "lora_batched segments (tl.dot)",
        {"BLOCK_M": lora_batched._SEGMENT_ROWS, "BLOCK_O": lora_batched._BLOCK_O, "BLOCK_R": 16, "num_warps": 4},
        lora_batched._lora_segments_kernel,
        {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "order_ptr": "*i32", "row_start_ptr": "*i32",
         "tile_start_ptr": "*i32", "scaling_ptr": "*fp32", "y_ptr": "*bf16", "K": "i32", "R": "i32", "N_OUT": "i32",
         "N_ADAPTERS": "i32"},
        {"BLOCK_M": lora_batched._SEGMENT_ROWS, "BLOCK_K": lora_batched._SEGMENT_BLOCK_K, "BLOCK_R": 16,
         "BLOCK_O": lora_batched._BLOCK_O}, 4)
    yield KernelConfig(
        "dequantize_blockwise", {"ELEMENTS": dequantize._QUANTIZE_ELEMENTS, "num_warps": 4},
        dequantize._dequantize_blockwise_kernel,
        {"q_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*fp32",
         "numel": "i64"}, {"BLOCKSIZE": 256, "HAS_OFFSET": True, "ELEMENTS": dequantize._QUANTIZE_ELEMENTS}, 4)


def _ptxas() -> list[str]:
    """Triton's own assemblers, newest first (PTX from a recent Triton needs a recent one)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return [str(p) for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.is_file()]


def _assemble(ptx: str, arch: str) -> tuple[int, int]:
    """(registers, spilled bytes) from `ptxas -v` on the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        errors = []
        for ptxas in _ptxas():
            gpu = f"{arch}a" if arch == "sm_90" else arch
            run = subprocess.run([ptxas, "-v", "--gpu-name", gpu, str(source), "-o", os.devnull],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                usage, spills = _PTXAS_USAGE.search(run.stderr), _PTXAS_SPILLS.search(run.stderr)
                if usage is None or spills is None:
                    raise RuntimeError(f"{ptxas}: no resource usage in its output:\n{run.stderr}")
                return int(usage.group(1)), max(int(spills.group(1)), int(spills.group(2)))
            errors.append(f"{ptxas}: {run.stderr.strip()}")
    raise RuntimeError("no ptxas assembled the kernel:\n" + "\n".join(errors))


def vector_loads_128(ptx: str) -> int:
    return sum(1 for line in ptx.splitlines() if _VECTOR_128.match(line))


def barriers_in_loops(ptx: str) -> int:
    """Barrier instructions that lie inside a loop: between a label and a later branch back to it."""
    lines = ptx.splitlines()
    labels = {}
    inside: set[int] = set()
    for number, line in enumerate(lines):
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = number
        branch = _BRANCH.search(line)
        if branch and branch.group(1) in labels:  # a backward branch: the loop is labels[..] .. here
            inside.update(i for i in range(labels[branch.group(1)], number) if _BARRIER.match(lines[i]))
    return len(inside)


def inspect(spec: KernelConfig, arch: str) -> Report:
    if dequantize.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET is set: Triton's interpreter replaces its compiler; unset it to inspect")
    signature = {**spec.signature, **{name: "constexpr" for name in spec.constants}}
    # As a launch specializes them: pointers (torch's allocations) and sizes divisible by 16.
    aligned = {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in spec.signature.items() if kind.startswith("*") or name in _ALIGNED_SIZES}
    source = ASTSource(fn=spec.fn, signature=signature, constexprs=spec.constants, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCHS[arch], _WARP),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    ptx = compiled.asm["ptx"]
    registers, spills = _assemble(ptx, arch)
    return Report(spec.kernel, spec.config, arch, registers, spills, vector_loads_128(ptx), barriers_in_loops(ptx))


def inspect_all(arch: str) -> list[Report]:
    return [inspect(spec, arch) for spec in kernel_configs(arch)]


def _table(reports: list[Report]) -> str:
    rows = ["| kernel | config | arch | registers | spill bytes | 128-bit loads | barriers in loops |",
            "|---|---|---|---|---|---|---|"]
    for r in reports:
        config = " ".join(f"{k}={v}" for k, v in r.config.items())
        rows.append(f"| {r.kernel} | {config} | {r.arch} | {r.registers} | {r.spill_bytes} | {r.vector_loads_128} "
                    f"| {r.barriers_in_loop} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlora.kernels.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sm_90", help="the GPU architecture to compile for")
    parser.add_argument("--json", action="store_true", help="one JSON list of objects instead of a table")
    args = parser.parse_args(argv)
    reports = inspect_all(args.arch)
    print(json.dumps([asdict(r) for r in reports], indent=1) if args.json else _table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
