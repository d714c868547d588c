"""Op: the 4-bit matmul `x @ W.T` (and `x @ W`, its input gradient), differentiable in x.

The packed weight and its block scales (fp32, or double-quantized as they are stored) are
the only things saved for backward: no dequantized copy of W outlives a call.
"""

from __future__ import annotations

import torch

from .. import backends
from ..scales import OP_SCHEMA, BlockScales
from . import _autocast, _eager

torch.library.define(
    "fastlora::matmul_4bit",
    "(Tensor x, Tensor packed, Tensor absmax, int n, int k, int blocksize, str quant_type, bool transposed, "
    f"{OP_SCHEMA}) -> Tensor",
)


@torch.library.register_fake("fastlora::matmul_4bit")
def _(x, packed, absmax, n, k, blocksize, quant_type, transposed, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], k if transposed else n))


def _implementation(x, packed, absmax, n, k, blocksize, quant_type, transposed, nested_absmax=None,
                    nested_code=None, nested_offset=None, nested_blocksize=256) -> torch.Tensor:
    scales = BlockScales.from_op_args(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    return backends.select(x.device).matmul_4bit(x, packed, scales, n, k, blocksize, quant_type, transposed)


_CAST = frozenset({0})  # what autocast casts: x
torch.library.register_kernel("fastlora::matmul_4bit", ("cpu", "cuda"))(_implementation)
_autocast.register("matmul_4bit", _CAST)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
                quant_type: str, transposed: bool) -> torch.Tensor:
    """The op on `scales` (through the dispatcher only where it has a part: `_eager.call`)."""
    absmax, *nested = scales.op_args()
    return call(x, packed, absmax, n, k, blocksize, quant_type, transposed, *nested)


def call(*op_args) -> torch.Tensor:
    """The op on its own arguments (as a backward pass holds them: checked once, by the op)."""
    return _eager.call(torch.ops.fastlora.matmul_4bit, _implementation, *op_args, autograd=Matmul4bitFunction,
                       cast=_CAST)


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
        grad_x = call(grad, packed, absmax, n, k, blocksize, quant_type, not transposed, nested_absmax, nested_code,
                      nested_offset, nested_blocksize)
    return (grad_x,) + (None,) * (len(ctx.needs_input_grad) - 1)


torch.library.register_autograd("fastlora::matmul_4bit", _backward, setup_context=_setup_context)


Matmul4bitFunction = _eager.autograd_function("Matmul4bitFunction", _implementation, _setup_context, _backward)
