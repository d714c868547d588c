"""Fused dequantize-matmul: `x @ dequant(W).T` (forward) and `dy @ dequant(W)` (the input
gradient, `transposed=True`) for a 4-bit weight W of shape (N, K), as one Triton kernel.

Each program owns an output tile `[BLOCK_M, BLOCK_OUT]` and walks the reduction dimension
in steps of BLOCK_RED. At each step it decodes the weight tile from the packed bytes in
registers (`decode_weight_tile`: nibbles, code lookup, block scale, double-quantized scales
included) and multiplies it into the activation tile, accumulating in fp32. The fused
kernels never write the weight back in full precision (the dequantize-then-cuBLAS path,
below, does, transiently).

* Up to `GEMV_MAX_ROWS` rows, forward, K a multiple of the block size (every model's
  case): `_gemv_4bit_kernel`, one program per activation row and BLOCK_OUT rows of W, in
  the shape of bitsandbytes' one-row kernel: 16-byte loads of packed bytes, values decoded
  where they were loaded, partial sums kept per thread, one reduction after the K loop (no
  barrier inside it: `python -m fastlora.kernels.inspect` counts them).
* Otherwise small M (`M <= SMALL_M_MAX_ROWS`, the transposed product, unaligned K): a
  single row of output tiles, so each packed byte is read by exactly one program. Up to
  `GEMV_MAX_ROWS` rows multiply on the CUDA cores (broadcast and sum); above, the rows are
  padded to a 16-row `tl.dot` tile.
* Both small-M kernels split the reduction when the output alone gives too few programs to
  fill the GPU: `SPLIT` programs per output tile add fp32 partial sums into a workspace
  reused across launches, and the last of them stores the tile (`_store_split`).
* Large M: tensor-core tiles (`tl.dot`), grouped program order for L2 reuse, autotuned.
* `use_dequantize_then_cublas(M, N, K, transposed)` picks bitsandbytes' approach
  (dequantize W once, then cuBLAS) for the row counts where it measured faster.

The epilogue adds an optional bias and the LoRA term `scaling * u @ B.T` (`LoraTerm`, see
`fastlora.kernels.lora`) before the single store of y.

Precision: activations in fp32, fp16 or bf16, fp32 accumulation. On the tensor-core path
the decoded weight is rounded to the activation dtype (what dequantize-then-matmul does);
fp32 activations use IEEE fp32 products unless torch allows TF32
(`torch.set_float32_matmul_precision("high")`). Under `TRITON_INTERPRET=1` (CPU tensors)
one fixed configuration runs instead of autotuning.
"""

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tuning
from .dequantize import (
    INTERPRETED,
    NestedScales,
    block_scales,
    code_table,
    decode_weight_tile,
    dequantize_4bit,
    scale_args,
)
from .launch import launch

# Up to this many activation rows: the small-M path (each packed byte read once).
SMALL_M_MAX_ROWS = 16
# Up to this many rows the small-M path multiplies on the CUDA cores instead of padding the
# rows to a 16-row tensor-core tile (tune on the GPU: benches/gpu_bench.py).
GEMV_MAX_ROWS = 4
# From these row counts on, dequantize W once and let cuBLAS multiply (bitsandbytes'
# approach): the tensor-core fused kernel is far slower than cuBLAS at large M and lost at
# every measured row count backward (benches/GPU_NOTES.md has the H200 figures).
DEQUANTIZE_CUBLAS_MIN_ROWS = GEMV_MAX_ROWS + 1
DEQUANTIZE_CUBLAS_MIN_ROWS_TRANSPOSED = 1
PATHS = ("auto", "fused", "cublas")
_path = "auto"


@contextlib.contextmanager
def forced_path(path: str):
    """Within the block, every 4-bit matmul takes `path`: "fused" (the Triton kernels at any
    row count, the tensor-core one above `GEMV_MAX_ROWS`: experimental, for measuring and
    testing it), "cublas" (dequantize + cuBLAS at any row count) or "auto" (the default)."""
    global _path
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    saved, _path = _path, path
    try:
        yield
    finally:
        _path = saved


def use_dequantize_then_cublas(m: int, n: int, k: int, transposed: bool = False) -> bool:
    """Whether `M x K @ (N x K).T` (or, `transposed`, `M x N @ (N x K)`) should dequantize W
    and call cuBLAS.

    Dequantizing costs about `N * K * 4.5` bytes of memory traffic, once; the fused kernel's
    extra cost over cuBLAS grows with `M * N * K`. N and K cancel out of the comparison, so
    the crossover is a row count per orientation.
    """
    if _path != "auto":
        return _path == "cublas"
    return m >= (DEQUANTIZE_CUBLAS_MIN_ROWS_TRANSPOSED if transposed else DEQUANTIZE_CUBLAS_MIN_ROWS)


@dataclass(frozen=True)
class LoraTerm:
    """`scaling * u @ up.T` added in the epilogue: `u` (M, r), `up` (outputs, r), contiguous."""

    u: torch.Tensor
    up: torch.Tensor
    scaling: float


@triton.jit
def _store_split(acc, out_ptr, sums_ptr, offsets, mask, counts_ptr, tile, SPLIT: tl.constexpr):
    """Stores a program's fp32 results at `out_ptr + offsets`. With SPLIT programs per
    output tile, each adds its partial sums into the fp32 workspace at `sums_ptr` and counts
    itself done in the tile's counter; the last one takes the totals out (zeroing them) and
    resets the counter, so the workspace is zero again for the next launch with no memset."""
    if SPLIT > 1:
        tl.atomic_add(sums_ptr + offsets, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are issued before the program counts as done
        done = tl.atomic_add(counts_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT - 1:
            # Read where the adds went (an atomic read is served by L2, never a stale L1).
            total = tl.atomic_add(sums_ptr + offsets, tl.zeros_like(acc), mask=mask, sem="relaxed")
            tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(sums_ptr + offsets, tl.zeros_like(acc), mask=mask)
            tl.store(counts_ptr + tile, 0)
    else:
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _matmul_4bit_kernel(
    a_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, u_ptr, up_ptr, out_ptr,
    sums_ptr, counts_ptr, M, N, K, rank, lora_scaling, M_BUCKET,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, RANK_BLOCK: tl.constexpr,
    USE_DOT: tl.constexpr, SPLIT: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_RED: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, OUT] = a[M, RED] @ (W.T or W); (OUT, RED) = (N, K), or (K, N) when TRANSPOSED.

    `M_BUCKET` is only an autotuning key (the rows rounded to a power of two).
    """
    if TRANSPOSED:
        out_dim = K
        red_dim = N
    else:
        out_dim = N
        red_dim = K
    # Grouped order: GROUP_M row tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_out = tl.cdiv(out_dim, BLOCK_OUT)
    group = GROUP_M * tiles_out
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_out = (pid % group) // group_m
    # This program's share of the reduction (all of it unless SPLIT > 1).
    pid_split = tl.program_id(1)
    red_per_split = tl.cdiv(tl.cdiv(red_dim, BLOCK_RED), SPLIT) * BLOCK_RED
    red_start = pid_split * red_per_split
    red_end = tl.minimum(red_start + red_per_split, red_dim)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_out = pid_out * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    m_ok = offs_m < M
    out_ok = offs_out < out_dim
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * red_dim
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), tl.float32)
    rows = tl.arange(0, BLOCK_M)
    for red0 in range(red_start, red_end, BLOCK_RED):
        offs_red = red0 + tl.arange(0, BLOCK_RED)
        red_ok = offs_red < red_dim
        if TRANSPOSED:  # W[red, out]: rows of W are the reduction
            w = decode_weight_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_red,
                                   pid_out * BLOCK_OUT, N, K, BLOCK_RED, BLOCK_OUT, BLOCKSIZE, NESTED,
                                   NESTED_BLOCKSIZE, K_ALIGNED)
        else:  # W[out, red]
            w = decode_weight_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_out,
                                   red0, N, K, BLOCK_OUT, BLOCK_RED, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, K_ALIGNED)
        if USE_DOT:
            a = tl.load(a_rows + offs_red[None, :], mask=m_ok[:, None] & red_ok[None, :], other=0.0)
            if TRANSPOSED:
                acc = tl.dot(a, w.to(a.dtype), acc, input_precision=FP32_PRECISION)
            else:
                acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision=FP32_PRECISION)
        else:
            # GEMV: one activation row at a time against the whole weight tile, on the CUDA
            # cores, so registers hold one weight tile and not a 3-D product.
            for i in tl.static_range(BLOCK_M):
                # A padding row (i >= M) reads row M - 1; its sum is never stored.
                row = tl.minimum(pid_m * BLOCK_M + i, M - 1)
                a_row = tl.load(a_ptr + row.to(tl.int64) * red_dim + offs_red, mask=red_ok, other=0.0).to(tl.float32)
                if TRANSPOSED:
                    partial = tl.sum(a_row[:, None] * w, axis=0)
                else:
                    partial = tl.sum(w * a_row[None, :], axis=1)
                acc += tl.where((rows == i)[:, None], partial[None, :], 0.0)

    if pid_split == 0:  # the epilogue terms are added once, by the first split
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_out, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LORA:
            offs_r = tl.arange(0, RANK_BLOCK)
            r_ok = offs_r < rank
            u = tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * rank + offs_r[None, :],
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32) * lora_scaling
            up = tl.load(up_ptr + offs_out.to(tl.int64)[:, None] * rank + offs_r[None, :],
                         mask=out_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            if USE_DOT:
                # Accumulated into acc by the same tensor-core products as the main loop (a
                # separate fp32 product would spill registers). With 16-bit activations each
                # fp32 operand is a 16-bit high part plus its rounded remainder: three
                # products keep the LoRA term close to fp32 precision.
                act = a_ptr.dtype.element_ty
                up_t = tl.trans(up)
                if act == tl.float32:
                    acc = tl.dot(u, up_t, acc, input_precision=FP32_PRECISION)
                else:
                    u_high = u.to(act)
                    u_low = (u - u_high.to(tl.float32)).to(act)
                    up_high = up_t.to(act)
                    up_low = (up_t - up_high.to(tl.float32)).to(act)
                    acc = tl.dot(u_high, up_high, acc)
                    acc = tl.dot(u_low, up_high, acc)
                    acc = tl.dot(u_high, up_low, acc)
            else:  # BLOCK_M < 16 rows: too few for tl.dot
                acc += tl.sum(u[:, None, :] * up[None, :, :], axis=2)

    offsets = offs_m.to(tl.int64)[:, None] * out_dim + offs_out[None, :]
    _store_split(acc, out_ptr, sums_ptr, offsets, m_ok[:, None] & out_ok[None, :], counts_ptr, pid, SPLIT)


@triton.jit
def _gemv_4bit_kernel(
    a_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, u_ptr, up_ptr, out_ptr,
    sums_ptr, counts_ptr, N, K, K_BYTES, rank, lora_scaling,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK_BLOCK: tl.constexpr, SPLIT: tl.constexpr, BLOCK_OUT: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    """`out[row, outs] = a[row] @ W[outs].T (+ bias + lora)` for one activation row and
    BLOCK_OUT rows of W (K a multiple of the block size, so every row of W starts on a byte
    and a block): the shape of bitsandbytes' one-row kernel.

    Each step loads a [BLOCK_OUT, BLOCK_BYTES] tile of packed bytes (`K_BYTES`, K / 2, is
    its own argument so that a launch specializes it as a multiple of 16 and each thread
    loads 16 contiguous bytes at once), multiplies the high nibbles' values by the even
    activations and the low nibbles' by the odd ones, so no value changes place, scales them
    by their block's scale, and adds them into a tile of partial sums that stays in the
    threads that loaded it. One reduction across the tile, after the loop, gives the outputs.
    """
    # The row varies fastest: the programs of one tile of W run together and read it once
    # from memory, from L2 after the first.
    row = tl.program_id(0).to(tl.int64)
    pid_out = tl.program_id(1)
    pid_split = tl.program_id(2)
    bytes_per_split = tl.cdiv(tl.cdiv(K_BYTES, BLOCK_BYTES), SPLIT) * BLOCK_BYTES
    byte_start = pid_split * bytes_per_split
    byte_end = tl.minimum(byte_start + bytes_per_split, K_BYTES)
    outs = pid_out * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    out_ok = outs < N
    row_bytes = outs.to(tl.int64)[:, None] * K_BYTES
    blocks_per_row = K // BLOCKSIZE
    a_row = a_ptr + row * K
    acc = tl.zeros((BLOCK_OUT, BLOCK_BYTES), tl.float32)
    for byte0 in range(byte_start, byte_end, BLOCK_BYTES):
        cols = byte0 + tl.arange(0, BLOCK_BYTES)
        col_ok = cols < byte_end
        mask = out_ok[:, None] & col_ok[None, :]
        packed = tl.load(packed_ptr + row_bytes + cols[None, :], mask=mask, other=0).to(tl.int32)
        even = tl.load(a_row + 2 * cols, mask=col_ok, other=0.0).to(tl.float32)
        odd = tl.load(a_row + 2 * cols + 1, mask=col_ok, other=0.0).to(tl.float32)
        scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                             outs[:, None] * blocks_per_row + (cols // (BLOCKSIZE // 2))[None, :], mask,
                             NESTED, NESTED_BLOCKSIZE)
        values = tl.load(code_ptr + (packed >> 4)) * even[None, :] + tl.load(code_ptr + (packed & 15)) * odd[None, :]
        acc += values * scale
    y = tl.sum(acc, axis=1)
    if pid_split == 0:  # the epilogue terms are added once, by the first split
        if HAS_BIAS:
            y += tl.load(bias_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)
        if HAS_LORA:
            offs_r = tl.arange(0, RANK_BLOCK)
            r_ok = offs_r < rank
            u = tl.load(u_ptr + row * rank + offs_r, mask=r_ok, other=0.0).to(tl.float32) * lora_scaling
            up = tl.load(up_ptr + outs.to(tl.int64)[:, None] * rank + offs_r[None, :],
                         mask=out_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            y += tl.sum(up * u[None, :], axis=1)
    _store_split(y, out_ptr, sums_ptr, row * N + outs, out_ok, counts_ptr, row * tl.num_programs(1) + pid_out, SPLIT)


# Autotuning keys: the shape, and the compile-time constants that change the kernel.
_TUNING_KEY = ["M_BUCKET", "N", "K", "BLOCKSIZE", "NESTED", "TRANSPOSED", "HAS_LORA", "USE_DOT", "SPLIT"]


# Large M: (BLOCK_M, BLOCK_OUT, BLOCK_RED, warps, stages). Decoding the weight tile in
# registers beside the accumulator limits the tiles: these compile without register spills
# (`python -m fastlora.kernels.inspect`, checked by tests/test_kernel_compile.py), the first
# one only for sm_90 and later (it spills on sm_86/sm_89).
_LARGE_M_TILES = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 256, 32, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
    (64, 64, 64, 4, 4),
]
_SM90_LARGE_M_TILES = {(128, 128, 64, 8, 3)}


def large_m_tiles(capability: int) -> list[tuple[int, int, int, int, int]]:
    """The large-M tiles for a GPU of compute capability `capability` (e.g. 90, 86)."""
    return [t for t in _LARGE_M_TILES if capability >= 90 or t not in _SM90_LARGE_M_TILES]
# Small M: (BLOCK_OUT, BLOCK_RED, warps, stages); BLOCK_M is the padded row count, set per call.
# Forward: BLOCK_OUT rows of W, BLOCK_RED contiguous columns (BLOCK_RED / 2 bytes per row).
_SMALL_M_TILES = [
    (16, 128, 4, 4), (32, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 4), (16, 512, 4, 4), (32, 512, 8, 3),
    (64, 256, 8, 3),
]
# The one-row GEMV (`_gemv_4bit_kernel`): (BLOCK_OUT, BLOCK_BYTES, warps); BLOCK_OUT rows of W
# and BLOCK_BYTES packed bytes of each per step, 16 or 32 bytes per thread. The GPU sweep
# picks among these per shape (`gemv_config`); a table naming another is ignored.
_GEMV_TILES = [(32, 128, 8), (64, 128, 8), (32, 64, 4)]
# Transposed: BLOCK_OUT contiguous columns of W, BLOCK_RED rows.
_SMALL_M_TRANSPOSED_TILES = [(128, 32, 4, 4), (128, 64, 4, 3), (256, 32, 4, 3), (64, 64, 4, 4), (256, 64, 8, 3)]
# The output tile width that the split heuristic assumes, per orientation of the GEMV.
_NOMINAL_GEMV_OUT = {False: 32, True: 128}
# Least reduction length per split program: below it the atomics cost more than they save.
_MIN_RED_PER_SPLIT = 512
# One fixed configuration under the interpreter: (BLOCK_OUT, BLOCK_RED) small, few programs.
_INTERPRETER_BLOCK_OUT = 32
_INTERPRETER_BLOCK_RED = 64
_INTERPRETER_BLOCK_M = 16

_autotuned: dict[str, triton.runtime.Autotuner] = {}


def _tuned_kernel(path: str):
    """The autotuned kernel of a path ("large", "small", "small_transposed"), built on first
    use: `triton.autotune` needs a GPU driver, which the interpreter lacks."""
    if path not in _autotuned:
        if path == "large":
            major, minor = torch.cuda.get_device_capability()
            configs = [
                triton.Config({"BLOCK_M": bm, "BLOCK_OUT": bo, "BLOCK_RED": br}, num_warps=warps, num_stages=stages)
                for bm, bo, br, warps, stages in large_m_tiles(10 * major + minor)
            ]
        else:
            tiles = _SMALL_M_TRANSPOSED_TILES if path == "small_transposed" else _SMALL_M_TILES
            configs = [
                triton.Config({"BLOCK_OUT": bo, "BLOCK_RED": br}, num_warps=warps, num_stages=stages)
                for bo, br, warps, stages in tiles
            ]
        _autotuned[path] = triton.autotune(configs=configs, key=_TUNING_KEY)(_matmul_4bit_kernel)
    return _autotuned[path]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _split_count(out_dim: int, red_dim: int, transposed: bool, device: torch.device) -> int:
    """Programs per output tile on the small-M path: enough to give every SM one program."""
    if device.type == "cuda":
        programs_wanted = _sms(device)
        tile_out, most = _NOMINAL_GEMV_OUT[transposed], red_dim // _MIN_RED_PER_SPLIT
    else:  # the interpreter: split small problems too, so the tests run the atomic path
        programs_wanted, tile_out, most = 4, _INTERPRETER_BLOCK_OUT, triton.cdiv(red_dim, _INTERPRETER_BLOCK_RED)
    return max(1, min(programs_wanted // triton.cdiv(out_dim, tile_out), most))


def _fp32_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    k: int,
    blocksize: int,
    quant_type: str,
    transposed: bool,
    *,
    nested: NestedScales | None = None,
    bias: torch.Tensor | None = None,
    lora: LoraTerm | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias + lora` (x of shape (..., k)), or `x @ W` when `transposed` (x (..., n)).

    `packed` holds W (N, K) as flat bytes, `absmax` its fp32 block scales, or uint8 ones with
    `nested` (decoded in the kernel). `out`, if given, is a contiguous `(rows, outputs)`
    tensor of x's dtype; the result is returned with x's leading dimensions.
    """
    inner, outer = (n, k) if transposed else (k, n)
    x2d = x.reshape(-1, inner).contiguous()
    m = x2d.shape[0]
    if out is None:
        out = torch.empty((m, outer), dtype=x.dtype, device=x.device)
    if m > 0:
        if use_dequantize_then_cublas(m, n, k, transposed):
            _dequantize_then_matmul(x2d, packed, absmax, n, k, blocksize, quant_type, transposed, nested, bias, lora,
                                    out)
        else:
            _launch(x2d, packed, absmax, n, k, blocksize, quant_type, transposed, nested, bias, lora, out)
    return out.reshape(*x.shape[:-1], outer)


def _dequantize_then_matmul(x2d, packed, absmax, n, k, blocksize, quant_type, transposed, nested, bias, lora, out):
    """bitsandbytes' approach: a full-precision W, then cuBLAS (and the epilogue in torch)."""
    w = dequantize_4bit(packed, absmax, blocksize, quant_type, (n, k), x2d.dtype, nested=nested)
    if bias is None:
        torch.matmul(x2d, w if transposed else w.t(), out=out)
    else:
        torch.addmm(bias.to(out.dtype), x2d, w if transposed else w.t(), out=out)
    del w
    if lora is not None:
        # As PEFT: the LoRA term in the adapter's precision, added to the rounded base output;
        # in place (no (m, n) temporary) where the output has the adapter's dtype.
        up_t = lora.up.t().to(lora.u.dtype)
        if out.dtype == lora.u.dtype:
            out.addmm_(lora.u, up_t, alpha=lora.scaling)
        else:
            out.add_(lora.u @ up_t, alpha=lora.scaling)


# Per device and stream: (fp32 partial sums, int32 tile counters) of split launches. Zero
# between launches (each tile's last program zeroes its part); grown when a launch needs
# more. A CUDA graph captures the buffers in use when it is captured (warm up first).
_workspaces: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _split_workspace(out: torch.Tensor, split: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sums, counters) a launch with `split` programs per tile over `tiles` output tiles
    the shape of `out` reads; unused (`out` twice) without a split."""
    if split == 1:
        return out, out
    device = out.device
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    sums, counts = _workspaces.get(key, (None, None))
    if sums is None or sums.numel() < out.numel():
        sums = torch.zeros(out.numel(), dtype=torch.float32, device=device)
    if counts is None or counts.numel() < tiles:
        counts = torch.zeros(tiles, dtype=torch.int32, device=device)
    _workspaces[key] = (sums, counts)
    return sums, counts


def gemv_config(n: int, k: int, m: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_OUT, BLOCK_BYTES, warps, split) for the one-row GEMV: the measured table's choice
    for this shape (`fastlora.kernels.tuning`), else a heuristic: short rows take the narrow
    tile, many output rows the tall one, and the reduction is split where the output tiles
    alone leave SMs idle."""
    k_bytes = k // 2
    measured = tuning.lookup("gemv", device, n, k, m)
    if measured is not None:
        tile = (measured.get("BLOCK_OUT"), measured.get("BLOCK_BYTES"), measured.get("num_warps"))
        split = measured.get("SPLIT")
        if tile in _GEMV_TILES and isinstance(split, int) and 1 <= split <= max(1, k_bytes // tile[1]):
            return (*tile, split)
    if device.type != "cuda":  # the interpreter: split small problems too, so the tests run the atomic path
        block_out, block_bytes, warps = _INTERPRETER_BLOCK_OUT, _INTERPRETER_BLOCK_RED // 2, 4
        programs = triton.cdiv(n, block_out) * m
        return block_out, block_bytes, warps, max(1, min(4 // programs, triton.cdiv(k_bytes, block_bytes)))
    sms = _sms(device)
    if k_bytes <= 128:
        block_out, block_bytes, warps = _GEMV_TILES[2]
    elif triton.cdiv(n, 32) * m >= 4 * sms:
        block_out, block_bytes, warps = _GEMV_TILES[1]
    else:
        block_out, block_bytes, warps = _GEMV_TILES[0]
    programs = triton.cdiv(n, block_out) * m
    split = max(1, min(sms // programs, k_bytes // (2 * block_bytes)))
    return block_out, block_bytes, warps, split


def launch_gemv(x2d, packed, absmax, n, k, blocksize, quant_type, nested, bias, lora, out, config=None):
    """One program per activation row and BLOCK_OUT rows of W (`_gemv_4bit_kernel`), the
    reduction split where that leaves SMs idle (`_store_split`). `config` (BLOCK_OUT,
    BLOCK_BYTES, warps, split) replaces `gemv_config`'s choice (the GPU sweep's candidates)."""
    m = x2d.shape[0]
    block_out, block_bytes, warps, split = config or gemv_config(n, k, m, x2d.device)
    sums, counts = _split_workspace(out, split, triton.cdiv(n, block_out) * m)
    scale_pointers, scale_constants = scale_args(absmax.contiguous(), nested)
    rank = 0 if lora is None else lora.u.shape[1]
    args = (x2d, packed.reshape(-1).view(torch.uint8), code_table(quant_type, x2d.device), *scale_pointers,
            out if bias is None else bias.contiguous(), out if lora is None else lora.u.contiguous(),
            out if lora is None else lora.up.contiguous(), out, sums, counts,
            n, k, k // 2, rank, 0.0 if lora is None else float(lora.scaling))
    constants = dict(BLOCKSIZE=blocksize, HAS_BIAS=bias is not None, HAS_LORA=lora is not None,
                     RANK_BLOCK=max(16, triton.next_power_of_2(max(rank, 1))), SPLIT=split, BLOCK_OUT=block_out,
                     BLOCK_BYTES=block_bytes, num_warps=warps, **scale_constants)
    launch(_gemv_4bit_kernel, (m, triton.cdiv(n, block_out), split), args, constants,
           outputs=(6 + len(scale_pointers),))


def _launch(x2d, packed, absmax, n, k, blocksize, quant_type, transposed, nested, bias, lora, out):
    m = x2d.shape[0]
    if m <= GEMV_MAX_ROWS and not transposed and k % blocksize == 0:
        launch_gemv(x2d, packed, absmax, n, k, blocksize, quant_type, nested, bias, lora, out)
        return
    out_dim, red_dim = (k, n) if transposed else (n, k)
    small = m <= SMALL_M_MAX_ROWS
    use_dot = not small or m > GEMV_MAX_ROWS
    split = _split_count(out_dim, red_dim, transposed, x2d.device) if small else 1
    # Counters for the most tiles any configuration makes (the narrowest tile is 16 wide).
    sums, counts = _split_workspace(out, split, m * triton.cdiv(out_dim, 16))
    scale_pointers, scale_constants = scale_args(absmax.contiguous(), nested)
    rank = 0 if lora is None else lora.u.shape[1]
    args = (
        x2d, packed.reshape(-1).view(torch.uint8), code_table(quant_type, x2d.device), *scale_pointers,
        out if bias is None else bias.contiguous(), out if lora is None else lora.u.contiguous(),
        out if lora is None else lora.up.contiguous(), out, sums, counts,
        m, n, k, rank, 0.0 if lora is None else float(lora.scaling), min(triton.next_power_of_2(m), 8192),
    )
    constants = dict(
        BLOCKSIZE=blocksize, K_ALIGNED=k % blocksize == 0, TRANSPOSED=transposed, HAS_BIAS=bias is not None,
        HAS_LORA=lora is not None, RANK_BLOCK=max(16, triton.next_power_of_2(max(rank, 1))), USE_DOT=use_dot,
        SPLIT=split, FP32_PRECISION=_fp32_precision(), GROUP_M=8, **scale_constants,
    )
    gemv_rows = 16 if use_dot else triton.next_power_of_2(m)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_dim, meta["BLOCK_OUT"]), split)

    if INTERPRETED:
        block_m = gemv_rows if small else _INTERPRETER_BLOCK_M
        fixed = dict(BLOCK_M=block_m, BLOCK_OUT=_INTERPRETER_BLOCK_OUT, BLOCK_RED=_INTERPRETER_BLOCK_RED)
        _matmul_4bit_kernel[grid(fixed)](*args, **constants, **fixed)
    elif small:
        _tuned_kernel("small_transposed" if transposed else "small")[grid](*args, **constants, BLOCK_M=gemv_rows)
    else:
        _tuned_kernel("large")[grid](*args, **constants)
