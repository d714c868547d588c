"""Op: the 4-bit matmul `x @ W.T` (and `x @ W`, its input gradient), differentiable in x.

The packed weight and its fp32 scales are the only things saved for backward: no
dequantized copy of W outlives a call.
"""

from __future__ import annotations

import torch

from .. import _backend, _cpu

torch.library.define(
    "fastlora::matmul_4bit",
    "(Tensor x, Tensor packed, Tensor absmax, int n, int k, int blocksize, str quant_type, bool transposed) -> Tensor",
)


@torch.library.register_fake("fastlora::matmul_4bit")
def _(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, blocksize: int, quant_type: str,
    transposed: bool,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], k if transposed else n))


@torch.library.register_kernel("fastlora::matmul_4bit", ("cpu", "cuda"))
def _(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, blocksize: int, quant_type: str,
    transposed: bool,
) -> torch.Tensor:
    if _backend.uses_triton(x.device):
        return _backend.triton_kernels().matmul.matmul_4bit(x, packed, absmax, n, k, blocksize, quant_type, transposed)
    return _cpu.matmul_4bit(x, packed, absmax, n, k, blocksize, quant_type, transposed)


def _setup_context(ctx, inputs, output) -> None:
    _, packed, absmax, n, k, blocksize, quant_type, transposed = inputs
    ctx.save_for_backward(packed, absmax)
    ctx.shape = (n, k, blocksize, quant_type, transposed)


def _backward(ctx, grad: torch.Tensor):
    packed, absmax = ctx.saved_tensors
    n, k, blocksize, quant_type, transposed = ctx.shape
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.fastlora.matmul_4bit(grad, packed, absmax, n, k, blocksize, quant_type, not transposed)
    return grad_x, None, None, None, None, None, None, None


torch.library.register_autograd("fastlora::matmul_4bit", _backward, setup_context=_setup_context)
