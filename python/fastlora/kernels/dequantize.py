"""4-bit (NF4/FP4) quantize and dequantize, and the 8-bit blockwise quantization of the
scales that double quantization uses, as Triton kernels.

Byte for byte what `fastlora.reference` (and bitsandbytes' CPU backend) produce:

* `quantize_4bit` scales a full block by the reciprocal of its clamped maximum and the
  partial last block by true division (both IEEE-rounded: `tl.div_rn`, not Triton's
  approximate `/`), then counts the code midpoints strictly below each value.
* `quantize_blockwise` snaps each normalized value to bitsandbytes' 65536-point grid and
  binary-searches the grid point among the code's midpoints.
* The mean subtracted before double quantization (`offset`) is not computed here: the
  caller takes it with `absmax.mean()` on the device, as bitsandbytes does, because a Triton
  reduction would not sum in torch's order and the offset would differ in the last bit.

These kernels are launched with `enable_fp_fusion=False`, so that `a * b + c` is rounded
twice, as torch rounds it, and not fused into one FMA.

`decode_weight_tile` and `block_scales` are the decoding steps shared with the matmul
kernels: a 4-bit weight tile becomes fp32 values in registers, with double-quantized scales
decoded on the fly (`code2[q] * absmax2[i // 256] + offset`), so no fp32 copy of the
scales and no full-precision copy of the weight is ever written.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..formats import code_tensor
from ..reference import _nibble_bounds
from ..scales import NestedScales
from . import tuning
from .launch import launch

# Launch parameters on a GPU. Dequantize: (packed bytes per program, warps), 16 or 32 bytes
# per thread (one or two 128-bit loads each); the first is the default, and the GPU sweep
# picks among them per weight size (`dequantize_config`). Quantize: elements per program.
DEQUANTIZE_CONFIGS = [(4096, 8), (2048, 4), (8192, 8)]
_QUANTIZE_ELEMENTS = 2048
# bitsandbytes' 8-bit grid: 65536 points over [-1, 1] (see `fastlora.reference.quantize_blockwise`).
_GRID_STEPS = 65535.0

_tables: dict[tuple[str, str, torch.device], torch.Tensor] = {}


def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 fp32 code values on `device`, cached (the kernels only read it)."""
    key = ("code", quant_type, device)
    if key not in _tables:
        _tables[key] = code_tensor(quant_type, device)
    return _tables[key]


def _bounds_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 15 sorted midpoints between codes and the nibble of each sorted position."""
    key = ("bounds", quant_type, device)
    if key not in _tables:
        bounds, order = _nibble_bounds(quant_type)
        _tables[key] = bounds.to(device)
        _tables[("order", quant_type, device)] = order.to(torch.int32).to(device)
    return _tables[key], _tables[("order", quant_type, device)]


def scale_args(absmax: torch.Tensor, nested: NestedScales | None) -> tuple[tuple, dict]:
    """The kernels' scale pointers `(absmax, absmax2, code2, offset)` and their constants.

    Without double quantization the three nested pointers are `absmax` again: the kernels
    never read them (`NESTED` is a compile-time constant).
    """
    if nested is None:
        return (absmax, absmax, absmax, absmax), {"NESTED": False, "NESTED_BLOCKSIZE": 256}
    offset = nested.offset.reshape(1).to(device=absmax.device, dtype=torch.float32)
    pointers = (absmax, nested.absmax.contiguous(), nested.code.contiguous(), offset)
    return pointers, {"NESTED": True, "NESTED_BLOCKSIZE": nested.blocksize}


@triton.jit
def block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
                 NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """The fp32 scale of each block index in `block`, 0 where `mask` is false."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.where(mask, scale + tl.load(offset_ptr), 0.0)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def decode_weight_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, col0, N, K,
                       ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                       NESTED_BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr):
    """`W[rows, col0 : col0 + COLS]` in fp32 (0 outside W) for the 4-bit `W` of shape (N, K).

    With `K_ALIGNED` (K a multiple of the block size; `col0` a multiple of COLS) every row
    starts on a byte and on a block: each byte is loaded once and split into its two
    nibbles, and one scale serves each (row, block). Otherwise every element finds its byte,
    nibble and block from its flat index `row * K + col` (the general, slower path).
    """
    if K_ALIGNED:
        row_ok = rows < N
        byte_cols = col0 // 2 + tl.arange(0, COLS // 2)
        row_bytes = rows.to(tl.int64) * (K // 2)
        packed = tl.load(packed_ptr + row_bytes[:, None] + byte_cols[None, :],
                         mask=row_ok[:, None] & (byte_cols < K // 2)[None, :], other=0).to(tl.int32)
        # Element 2i is the high nibble: interleaving (high, low) restores the column order.
        w = tl.interleave(tl.load(code_ptr + (packed >> 4)), tl.load(code_ptr + (packed & 15)))
        blocks_per_row = K // BLOCKSIZE
        if COLS <= BLOCKSIZE:  # the tile lies in one block of each row (col0 < K)
            block = rows * blocks_per_row + col0 // BLOCKSIZE
            scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, row_ok,
                                 NESTED, NESTED_BLOCKSIZE)
            w = w * scale[:, None]
        else:
            col_block = col0 // BLOCKSIZE + tl.arange(0, COLS // BLOCKSIZE)
            block = rows[:, None] * blocks_per_row + col_block[None, :]
            scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block,
                                 row_ok[:, None] & (col_block < blocks_per_row)[None, :], NESTED, NESTED_BLOCKSIZE)
            w = tl.reshape(tl.reshape(w, (ROWS, COLS // BLOCKSIZE, BLOCKSIZE)) * scale[:, :, None], (ROWS, COLS))
    else:
        cols = col0 + tl.arange(0, COLS)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        flat = rows.to(tl.int64)[:, None] * K + cols[None, :]
        packed = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        nibble = (packed >> (4 - 4 * (flat % 2)).to(tl.int32)) & 15
        scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE, mask,
                             NESTED, NESTED_BLOCKSIZE)
        w = tl.load(code_ptr + nibble) * scale
    return w


@triton.jit
def _dequantize_4bit_kernel(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel,
                            n_bytes, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                            BYTES: tl.constexpr):
    """`out[e] = code[nibble e] * scale[e // BLOCKSIZE]` for the bytes of one program.

    `n_bytes` (`(numel + 1) // 2`) is an argument of its own: a launch specializes it as a
    multiple of 16 where it is one, which lets the packed bytes load 16 at a time."""
    start = tl.program_id(0).to(tl.int64) * BYTES
    byte = start + tl.arange(0, BYTES)
    byte_ok = byte < n_bytes
    packed = tl.load(packed_ptr + byte, mask=byte_ok, other=0).to(tl.int32)
    # Both nibbles of a byte lie in one block (block sizes are even).
    scale = block_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, byte // (BLOCKSIZE // 2), byte_ok,
                         NESTED, NESTED_BLOCKSIZE)
    values = tl.interleave(tl.load(code_ptr + (packed >> 4)) * scale, tl.load(code_ptr + (packed & 15)) * scale)
    element = 2 * start + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < numel)


@triton.jit
def _nibbles(scaled, bounds_ptr, order_ptr):
    """The nibble of the nearest code: the number of the 15 sorted midpoints strictly below
    the value (a binary search), mapped to code order."""
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    below = tl.zeros(scaled.shape, tl.int32)
    for step in tl.static_range(4):  # binary lifting: `|` sets one new bit per step
        probe = below | (7 >> step)
        below = tl.where(tl.load(bounds_ptr + probe) < scaled, below | (8 >> step), below)
    return tl.load(order_ptr + below)


@triton.jit
def _quantize_4bit_kernel(a_ptr, bounds_ptr, order_ptr, packed_ptr, absmax_ptr, numel,
                          BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr):
    """ROWS quantization blocks per program."""
    block = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    start = block.to(tl.int64) * BLOCKSIZE
    offs = start[:, None] + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(a_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    # A bare 1e-38 literal (below fp32's normal range) is typed fp64 by Triton 3.6: name the type.
    clamped = tl.maximum(amax, tl.full(amax.shape, 1e-38, tl.float32))
    full_block = start + BLOCKSIZE <= numel
    # Full blocks multiply by the reciprocal; the partial last block divides (bitsandbytes' CPU path).
    # An all-zero block scales to 0 whether or not the device flushes the subnormal 1e-38.
    inv = tl.div_rn(tl.full(clamped.shape, 1.0, tl.float32), clamped)
    scaled = tl.where(full_block[:, None], x * inv[:, None], tl.div_rn(x, clamped[:, None]))
    nibbles = _nibbles(tl.where((amax == 0.0)[:, None], 0.0, scaled), bounds_ptr, order_ptr)
    # Element 2i goes in the high nibble; an odd count is padded with the code of 0.0.
    high, low = tl.split(tl.reshape(nibbles, (ROWS, BLOCKSIZE // 2, 2)))
    byte = start[:, None] // 2 + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + byte, ((high << 4) | low).to(tl.uint8), mask=byte < (numel + 1) // 2)
    # A full block keeps its true maximum (0.0 when all zeros); the partial one the clamped.
    tl.store(absmax_ptr + block, tl.where(full_block, amax, clamped), mask=start < numel)


@triton.jit
def _quantize_blockwise_kernel(a_ptr, code_ptr, q_ptr, absmax_ptr, numel, BLOCKSIZE: tl.constexpr,
                               BLOCK: tl.constexpr, ROWS: tl.constexpr, GRID_STEPS: tl.constexpr):
    """8-bit blockwise quantization onto the sorted 256-entry `code`, as bitsandbytes' CPU kernel."""
    block = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offs = block.to(tl.int64)[:, None] * BLOCKSIZE + cols[None, :]
    mask = (cols < BLOCKSIZE)[None, :] & (offs < numel)
    x = tl.load(a_ptr + offs, mask=mask, other=0.0)
    amax = tl.max(tl.abs(x), axis=1)
    zero = (amax == 0.0)[:, None]
    inv = tl.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.where(amax == 0.0, 1.0, amax))
    normed = tl.where(zero, 0.0, tl.minimum(tl.maximum(x * inv[:, None], -1.0), 1.0))
    grid_index = ((normed + 1.0) * 0.5 * GRID_STEPS + 0.5).to(tl.int32)
    grid_value = -1.0 + tl.div_rn(2.0 * grid_index.to(tl.float32), GRID_STEPS)
    # Count the midpoints 0.5 * (code[j] + code[j + 1]) (255 of them, sorted) below the grid value.
    below = tl.zeros(x.shape, tl.int32)
    for step in tl.static_range(8):  # binary lifting: `|` sets one new bit per step
        probe = below | (127 >> step)
        midpoint = 0.5 * (tl.load(code_ptr + probe) + tl.load(code_ptr + probe + 1))
        below = tl.where(midpoint < grid_value, below | (128 >> step), below)
    tl.store(q_ptr + offs, tl.where(zero, 0, below).to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + block, amax, mask=block.to(tl.int64) * BLOCKSIZE < numel)


@triton.jit
def _dequantize_blockwise_kernel(q_ptr, code_ptr, absmax_ptr, offset_ptr, out_ptr, numel,
                                 BLOCKSIZE: tl.constexpr, HAS_OFFSET: tl.constexpr, ELEMENTS: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * ELEMENTS + tl.arange(0, ELEMENTS)
    mask = offs < numel
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    values = tl.load(code_ptr + q) * tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
    if HAS_OFFSET:
        values = values + tl.load(offset_ptr)
    tl.store(out_ptr + offs, values, mask=mask)


# Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 when this
# module was imported): then they run on CPU tensors, and autotuning (which needs a GPU
# driver) gives way to one fixed configuration.
INTERPRETED = isinstance(_dequantize_4bit_kernel, InterpretedFunction)


def _programs_for(count: int, per_program: int) -> int:
    return max(1, triton.cdiv(count, per_program))


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: list[int] | tuple[int, ...],
    dtype: torch.dtype,
    *,
    nested: NestedScales | None = None,
    out: torch.Tensor | None = None,
    config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The dense weight: `code[nibble] * scale[block]` in fp32, cast to `dtype`.

    `absmax` holds fp32 scales, or uint8 double-quantized ones decoded in the same kernel
    when `nested` is given. `out`, if given, is a contiguous tensor of `shape` and `dtype`.
    `config` (bytes per program, warps) replaces `dequantize_config`'s choice (the GPU
    sweep's candidates).
    """
    numel = 1
    for size in shape:
        numel *= size
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    n_bytes = (numel + 1) // 2
    per_program, warps = config or dequantize_config(numel, packed.device)
    per_program = min(per_program, triton.next_power_of_2(n_bytes))
    scale_pointers, scale_constants = scale_args(absmax.contiguous(), nested)
    launch(_dequantize_4bit_kernel, (_programs_for(n_bytes, per_program), 1, 1),
           (packed.reshape(-1).view(torch.uint8), code_table(quant_type, packed.device), *scale_pointers, out, numel,
            n_bytes),
           dict(BLOCKSIZE=blocksize, BYTES=per_program, num_warps=warps, enable_fp_fusion=False, **scale_constants),
           outputs=(2 + len(scale_pointers),))
    return out


def dequantize_config(numel: int, device: torch.device) -> tuple[int, int]:
    """(bytes per program, warps) for dequantizing `numel` weights: the measured table's
    choice (`fastlora.kernels.tuning`), else the first of `DEQUANTIZE_CONFIGS`."""
    measured = tuning.lookup("dequantize", device, numel)
    if measured is not None:
        config = (measured.get("BYTES"), measured.get("num_warps"))
        if config in DEQUANTIZE_CONFIGS:
            return config
    return DEQUANTIZE_CONFIGS[0]


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(packed, absmax)`: uint8 `((n + 1) // 2, 1)` and fp32 `(ceil(n / blocksize),)`."""
    flat = A.contiguous().reshape(-1)
    numel = flat.numel()
    packed = torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=A.device)
    n_blocks = triton.cdiv(numel, blocksize)
    absmax = torch.empty((n_blocks,), dtype=torch.float32, device=A.device)
    rows = min(max(1, _QUANTIZE_ELEMENTS // blocksize), triton.next_power_of_2(n_blocks))
    bounds, order = _bounds_tables(quant_type, A.device)
    _quantize_4bit_kernel[(_programs_for(n_blocks, rows),)](
        flat, bounds, order, packed, absmax, numel, BLOCKSIZE=blocksize, ROWS=rows, num_warps=4,
        enable_fp_fusion=False,
    )
    return packed, absmax


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes into the sorted 256-entry `code` (uint8, A's shape) and fp32 block maxima."""
    values = A.contiguous().float()
    numel = values.numel()
    quantized = torch.empty(values.shape, dtype=torch.uint8, device=A.device)
    n_blocks = triton.cdiv(numel, blocksize)
    absmax = torch.empty((n_blocks,), dtype=torch.float32, device=A.device)
    if numel == 0:
        return quantized, absmax
    block = triton.next_power_of_2(blocksize)
    rows = min(max(1, _QUANTIZE_ELEMENTS // block), triton.next_power_of_2(n_blocks))
    _quantize_blockwise_kernel[(_programs_for(n_blocks, rows),)](
        values.reshape(-1), code.contiguous().float(), quantized.reshape(-1), absmax, numel,
        BLOCKSIZE=blocksize, BLOCK=block, ROWS=rows, GRID_STEPS=_GRID_STEPS, num_warps=4, enable_fp_fusion=False,
    )
    return quantized, absmax


def dequantize_blockwise(
    quantized: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """`code[q] * absmax[i // blocksize] (+ offset)` in fp32 (A's shape); offset a 0-d tensor."""
    out = torch.empty(quantized.shape, dtype=torch.float32, device=quantized.device)
    numel = quantized.numel()
    if numel == 0:
        return out
    per_program = min(_QUANTIZE_ELEMENTS, triton.next_power_of_2(numel))
    offset_arg = absmax if offset is None else offset.reshape(1).to(device=absmax.device, dtype=torch.float32)
    _dequantize_blockwise_kernel[(_programs_for(numel, per_program),)](
        quantized.contiguous().reshape(-1), code.contiguous().float(), absmax.contiguous(), offset_arg,
        out.reshape(-1), numel, BLOCKSIZE=blocksize, HAS_OFFSET=offset is not None, ELEMENTS=per_program,
        num_warps=4, enable_fp_fusion=False,
    )
    return out
