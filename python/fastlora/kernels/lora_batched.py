"""The LoRA term of a mixed batch on the GPU: `y[t] = scaling[i] * (x[t] @ A[i].T) @ B[i].T`
with `i = indices[t]` (0 where `i` is -1), for adapters stacked as `A` `(n, r, K)` and `B`
`(n, O, r)`.

One program per row and block of `O` outputs: it gathers its row's adapter, forms the rank-r
vector `h = x[t] @ A[i].T` in fp32 registers (the "shrink" of vLLM's and LoRAX's kernels),
then its block of `h @ B[i].T` (the "expand"), and stores once. `h` is formed again by each
output block of a row: r * K multiply-adds, small beside the `O * r` of the expand for the
ranks adapters use, and it spares a second launch and an `h` buffer. A -1 row reads adapter 0
and stores zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Outputs per program: one warp's worth of rows of B per step.
_BLOCK_O = 64
_BLOCK_K = 128


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


def lora_batched(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
                 scaling: torch.Tensor) -> torch.Tensor:
    """`y` `(rows, O)` in x's dtype, for checked arguments (`fastlora.lora_batched`)."""
    rows, (_, r, k), o = x.shape[0], A.shape, B.shape[1]
    y = torch.empty((rows, o), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    grid = (rows, triton.cdiv(o, _BLOCK_O))
    _lora_batched_kernel[grid](x.contiguous(), A.contiguous(), B.contiguous(), indices.contiguous(),
                               scaling.contiguous(), y, k, r, o, BLOCK_K=_BLOCK_K,
                               BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_O=_BLOCK_O, num_warps=4)
    return y
