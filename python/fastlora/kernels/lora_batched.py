"""The LoRA term of a mixed batch on the GPU: `y[t] = scaling[i] * (x[t] @ A[i].T) @ B[i].T`
with `i = indices[t]` (0 where `i` is -1), for adapters stacked as `A` `(n, r, K)` and `B`
`(n, O, r)`. Two kernels, as serving stacks have them:

- Decoding (few rows), `_lora_batched_kernel`: one program per row and block of `O`
  outputs. It gathers its row's adapter, forms the rank-r vector `h = x[t] @ A[i].T` in fp32
  registers (the "shrink" of vLLM's and LoRAX's kernels), then its block of `h @ B[i].T`
  (the "expand"), and stores once. `h` is formed again by each output block of a row: r * K
  multiply-adds, small beside the `O * r` of the expand for the ranks adapters use, and it
  spares a second launch and an `h` buffer. A -1 row reads adapter 0 and stores zeros.
- Prefill (many rows), `_lora_segments_kernel`: the rows sorted by adapter into segments, one
  program per tile of up to `BLOCK_M` rows of one segment and block of outputs, both products
  on the tensor cores (`tl.dot`), so an adapter's A and B are read once per tile instead of
  once per row. The segments are found on the device (a sort and a cumulative count, no
  synchronization): the grid is the most tiles the rows can make, and a program past the
  last tile returns at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Outputs per program: one warp's worth of rows of B per step.
_BLOCK_O = 64
_BLOCK_K = 128
# Above this many rows the segment kernel runs: a decoding step of a batch stays per row.
_ROW_KERNEL_MAX_ROWS = 32
# Rows per tile of a segment, and the K step of its shrink (tl.dot's smallest tiles are 16).
_SEGMENT_ROWS = 32
_SEGMENT_BLOCK_K = 64


@triton.jit
def _lora_batched_kernel(x_ptr, a_ptr, b_ptr, indices_ptr, scaling_ptr, y_ptr, K, R, N_OUT,
                         BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    adapter = tl.load(indices_ptr + row)
    used = adapter >= 0
    adapter = tl.maximum(adapter, 0).to(tl.int64)
    ranks = tl.arange(0, BLOCK_R)
    h = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (adapter * R + ranks[:, None]) * K + cols[None, :],
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0).to(tl.float32)
        h += tl.sum(a * x[None, :], axis=1)
    outs = block * BLOCK_O + tl.arange(0, BLOCK_O)
    b = tl.load(b_ptr + (adapter * N_OUT + outs[:, None]) * R + ranks[None, :],
                mask=(outs[:, None] < N_OUT) & (ranks[None, :] < R), other=0.0).to(tl.float32)
    y = tl.sum(b * h[None, :], axis=1) * tl.load(scaling_ptr + adapter)
    y = tl.where(used, y, 0.0)
    tl.store(y_ptr + row * N_OUT + outs, y.to(y_ptr.dtype.element_ty), mask=outs < N_OUT)


@triton.jit
def _lora_segments_kernel(x_ptr, a_ptr, b_ptr, order_ptr, row_start_ptr, tile_start_ptr, scaling_ptr, y_ptr,
                          K, R, N_OUT, N_ADAPTERS, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    tile = tl.program_id(0)
    block = tl.program_id(1)
    # The adapter whose tiles hold this one: tile_start[a] <= tile < tile_start[a + 1].
    adapter = tile * 0
    for i in range(N_ADAPTERS):
        adapter += (tl.load(tile_start_ptr + i + 1) <= tile).to(adapter.dtype)
    if adapter >= N_ADAPTERS:  # past the last tile
        return
    row_end = tl.load(row_start_ptr + adapter + 1)
    sorted_rows = tl.load(row_start_ptr + adapter) + (tile - tl.load(tile_start_ptr + adapter)) * BLOCK_M \
        + tl.arange(0, BLOCK_M)
    in_tile = sorted_rows < row_end
    rows = tl.load(order_ptr + sorted_rows, mask=in_tile, other=0).to(tl.int64)
    adapter = adapter.to(tl.int64)
    ranks = tl.arange(0, BLOCK_R)
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=in_tile[:, None] & (cols[None, :] < K),
                    other=0.0)
        a_t = tl.load(a_ptr + (adapter * R + ranks[None, :]) * K + cols[:, None],
                      mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)
        h = tl.dot(x, a_t, h, input_precision="ieee")
    outs = block * BLOCK_O + tl.arange(0, BLOCK_O)
    b_t = tl.load(b_ptr + (adapter * N_OUT + outs[None, :]) * R + ranks[:, None],
                  mask=(outs[None, :] < N_OUT) & (ranks[:, None] < R), other=0.0).to(tl.float32)
    # h stays fp32, as in the per-row kernel and the CPU's: a row's result does not depend on
    # how many rows share its batch.
    y = tl.dot(h, b_t, input_precision="ieee") * tl.load(scaling_ptr + adapter)
    tl.store(y_ptr + rows[:, None] * N_OUT + outs[None, :], y.to(y_ptr.dtype.element_ty),
             mask=in_tile[:, None] & (outs[None, :] < N_OUT))


def _segments(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows sorted by adapter (-1 rows first, in no segment), the start of each adapter's
    rows in that order `(n + 1,)`, and the start of each adapter's tiles `(n + 1,)`; on the
    device, without synchronizing."""
    order = torch.argsort(indices, stable=True).to(torch.int32)
    counts = torch.zeros(n + 1, dtype=torch.int64, device=indices.device)
    counts.index_add_(0, indices + 1, torch.ones_like(indices))
    row_start = torch.cumsum(counts, 0).to(torch.int32)  # adapter a: [row_start[a], row_start[a + 1])
    tiles = (counts[1:] + _SEGMENT_ROWS - 1) // _SEGMENT_ROWS
    tile_start = torch.cat([tiles.new_zeros(1), torch.cumsum(tiles, 0)]).to(torch.int32)
    return order, row_start, tile_start


def lora_batched(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
                 scaling: torch.Tensor) -> torch.Tensor:
    """`y` `(rows, O)` in x's dtype, for checked arguments (`fastlora.lora_batched`)."""
    rows, (n, r, k), o = x.shape[0], A.shape, B.shape[1]
    if rows > _ROW_KERNEL_MAX_ROWS:
        y = torch.zeros((rows, o), dtype=x.dtype, device=x.device)  # -1 rows are in no segment
        order, row_start, tile_start = _segments(indices, n)
        grid = (triton.cdiv(rows, _SEGMENT_ROWS) + n, triton.cdiv(o, _BLOCK_O))
        _lora_segments_kernel[grid](x.contiguous(), A.contiguous(), B.contiguous(), order, row_start, tile_start,
                                    scaling.contiguous(), y, k, r, o, n, BLOCK_M=_SEGMENT_ROWS,
                                    BLOCK_K=_SEGMENT_BLOCK_K, BLOCK_R=max(16, triton.next_power_of_2(r)),
                                    BLOCK_O=_BLOCK_O, num_warps=4)
        return y
    y = torch.empty((rows, o), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    grid = (rows, triton.cdiv(o, _BLOCK_O))
    _lora_batched_kernel[grid](x.contiguous(), A.contiguous(), B.contiguous(), indices.contiguous(),
                               scaling.contiguous(), y, k, r, o, BLOCK_K=_BLOCK_K,
                               BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_O=_BLOCK_O, num_warps=4)
    return y
