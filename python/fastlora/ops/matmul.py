"""Op: the 4-bit matmul `x @ W.T` (and `x @ W`, its input gradient), differentiable in x.

The packed weight and its block scales (fp32, or double-quantized as they are stored) are
the only things saved for backward: no dequantized copy of W outlives a call.
"""

from __future__ import annotations

import torch

from .. import _backend, _cpu
from . import _eager, _nested

torch.library.define(
    "fastlora::matmul_4bit",
    "(Tensor x, Tensor packed, Tensor absmax, int n, int k, int blocksize, str quant_type, bool transposed, "
    f"{_nested.SCHEMA}) -> Tensor",
)


@torch.library.register_fake("fastlora::matmul_4bit")
def _(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, blocksize: int, quant_type: str,
    transposed: bool, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], k if transposed else n))


def _kernel(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, blocksize: int, quant_type: str,
    transposed: bool, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256,
) -> torch.Tensor:
    _nested.check(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    if _backend.uses_triton(x.device):
        nested = _nested.triton_scales(nested_absmax, nested_code, nested_offset, nested_blocksize)
        return _backend.triton_kernels().matmul.matmul_4bit(
            x, packed, absmax, n, k, blocksize, quant_type, transposed, nested=nested
        )
    scales = _cpu.decoded_scales(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    return _cpu.matmul_4bit(x, packed, scales, n, k, blocksize, quant_type, transposed)


torch.library.register_kernel("fastlora::matmul_4bit", ("cpu", "cuda"))(_kernel)


def matmul_4bit(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, blocksize: int, quant_type: str,
    transposed: bool, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256,
) -> torch.Tensor:
    """`torch.ops.fastlora.matmul_4bit`, or its implementation directly when the dispatcher
    would only forward the call (`_eager.direct`)."""
    args = (x, packed, absmax, n, k, blocksize, quant_type, transposed, nested_absmax, nested_code, nested_offset,
            nested_blocksize)
    if _eager.direct(x, packed, absmax, nested_absmax, nested_code, nested_offset):
        return _kernel(*args)
    return torch.ops.fastlora.matmul_4bit(*args)


def _setup_context(ctx, inputs, output) -> None:
    _, packed, absmax, n, k, blocksize, quant_type, transposed, nested_absmax, nested_code, nested_offset, \
        nested_blocksize = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, nested_offset)
    ctx.shape = (n, k, blocksize, quant_type, transposed, nested_blocksize)


def _backward(ctx, grad: torch.Tensor):
    packed, absmax, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    n, k, blocksize, quant_type, transposed, nested_blocksize = ctx.shape
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = matmul_4bit(
            grad, packed, absmax, n, k, blocksize, quant_type, not transposed, nested_absmax, nested_code,
            nested_offset, nested_blocksize,
        )
    return (grad_x,) + (None,) * 11


torch.library.register_autograd("fastlora::matmul_4bit", _backward, setup_context=_setup_context)
