"""Fused QLoRA linear forward: `y = x @ dequant(W).T + bias + scaling * (x_drop @ A.T) @ B.T`
with one write of y.

The rank-r down-projection `u = x_drop @ A.T` (M x r, r small) is computed first by torch,
in the adapter's dtype as PEFT does: it reads x_drop once, where computing it inside the
matmul kernel would redo it for every output tile. The 4-bit matmul kernel
(`fastlora.kernels.matmul`) then adds `bias + scaling * u @ B.T` to its fp32 accumulator in
the epilogue and stores y once: neither the LoRA term nor the base product is written to
memory on its own.

The backward (registered with the op in `fastlora.ops.lora`) needs no kernel of its own: dx
is the transposed 4-bit product `dy @ dequant(W)` (`fastlora.kernels.matmul`), and
dA, dB and x_drop's gradient come from rank-r intermediates (`dy @ B`, then `@ A`; never
`B @ A`), which are small torch matmuls.
"""

from __future__ import annotations

import torch

from .dequantize import NestedScales
from .matmul import LoraTerm, matmul_4bit


def lora_linear_4bit(
    x: torch.Tensor,
    x_drop: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    blocksize: int,
    quant_type: str,
    *,
    nested: NestedScales | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA layer's output in x's dtype, for W (N, K) packed, A (r, K) and B (N, r).

    `x_drop` is dropout's output (x itself without dropout); `absmax` the fp32 block scales,
    or uint8 ones decoded in the kernel with `nested`. `out` as for `matmul_4bit`.
    """
    n, k = B.shape[0], A.shape[1]
    u = x_drop.reshape(-1, k).to(A.dtype) @ A.t()
    lora = LoraTerm(u=u, up=B.contiguous(), scaling=float(scaling))
    return matmul_4bit(x, packed, absmax, n, k, blocksize, quant_type, False, nested=nested, bias=bias, lora=lora,
                       out=out)
