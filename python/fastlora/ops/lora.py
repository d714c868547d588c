"""Op: the fused QLoRA linear
`y = x @ dequant(W).T + bias + scaling * (x_drop @ A.T) @ B.T`, differentiable in x,
x_drop (dropout's output, which autograd carries back to x), bias, A and B.

Backward forms the rank-r products first (`g @ B`, then `@ A`), never `B @ A`, and the
adapter's gradients before `dx`, which comes from the transposed 4-bit product
(`fastlora.ops.matmul`, or without dropout the backend's `matmul_4bit_low_rank`, which adds
dx's `g @ B @ A` term in the product's sums on the CPU's bf16 GEMM, after it elsewhere): only
the packed weight and its scales are saved for it. The LoRA
term runs in the adapter's dtype (fp32 adapters over a bf16 base, as PEFT does) and is added
to y in y's dtype.
"""

from __future__ import annotations

import torch

from .. import backends
from ..scales import OP_SCHEMA, BlockScales
from . import _autocast, _eager, matmul

torch.library.define(
    "fastlora::lora_linear_4bit",
    "(Tensor x, Tensor x_drop, Tensor packed, Tensor absmax, Tensor? bias, Tensor A, Tensor B, float scaling, "
    f"int blocksize, str quant_type, {OP_SCHEMA}) -> Tensor",
)


@torch.library.register_fake("fastlora::lora_linear_4bit")
def _(x, x_drop, packed, absmax, bias, A, B, scaling, blocksize, quant_type, nested_absmax=None, nested_code=None,
      nested_offset=None, nested_blocksize=256):
    return x.new_empty((*x.shape[:-1], B.shape[0]))


def _implementation(x, x_drop, packed, absmax, bias, A, B, scaling, blocksize, quant_type, nested_absmax=None,
                    nested_code=None, nested_offset=None, nested_blocksize=256):
    scales = BlockScales.from_op_args(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    return backends.select(x.device).lora_linear_4bit(x, x_drop, packed, scales, bias, A, B, scaling, blocksize,
                                                      quant_type)


_CAST = frozenset({0, 1, 4, 5, 6})  # what autocast casts: x, x_drop, bias, A, B
torch.library.register_kernel("fastlora::lora_linear_4bit", ("cpu", "cuda"))(_implementation)
_autocast.register("lora_linear_4bit", _CAST)


def lora_linear_4bit(x: torch.Tensor, x_drop: torch.Tensor, packed: torch.Tensor, scales: BlockScales,
                     bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scaling: float, blocksize: int,
                     quant_type: str) -> torch.Tensor:
    """The op on `scales` (through the dispatcher only where it has a part: `_eager.call`)."""
    absmax, *nested = scales.op_args()
    return _eager.call(torch.ops.fastlora.lora_linear_4bit, _implementation, x, x_drop, packed, absmax, bias, A, B,
                       scaling, blocksize, quant_type, *nested, autograd=LoraLinear4bitFunction, cast=_CAST)


def _setup_context(ctx, inputs, output) -> None:
    x, x_drop, packed, absmax, bias, A, B, scaling, blocksize, quant_type, nested_absmax, nested_code, \
        nested_offset, nested_blocksize = inputs
    ctx.save_for_backward(x_drop, packed, absmax, A, B, nested_absmax, nested_code, nested_offset)
    ctx.args = (scaling, blocksize, quant_type, None if bias is None else bias.dtype, nested_blocksize)
    # Without dropout x_drop is x: both gradients then go into one tensor (see _backward).
    ctx.x_drop_is_x = x_drop is x


def _backward(ctx, grad: torch.Tensor):
    x_drop, packed, absmax, A, B, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    scaling, blocksize, quant_type, bias_dtype, nested_blocksize = ctx.args
    needs_x, needs_x_drop, _, _, needs_bias, needs_A, needs_B = ctx.needs_input_grad[:7]
    n, k = B.shape[0], A.shape[1]
    g = grad.reshape(-1, n)
    grad_x = grad_x_drop = grad_bias = grad_A = grad_B = g_u = None
    if needs_bias:
        # Summed in fp32: an fp32 bias under bf16/fp16 activations keeps an fp32-accurate grad.
        grad_bias = g.sum(0, dtype=torch.float32).to(bias_dtype)
    if needs_x_drop or needs_A or needs_B:
        # First: these temporaries are freed before dx's product dequantizes W.
        xd = x_drop.reshape(-1, k).to(A.dtype)
        g_lora = g.to(A.dtype)
        g_u = torch.mm(g_lora, B).mul_(scaling)  # (m, r)
        if needs_B:
            grad_B = torch.mm(g_lora.t(), torch.mm(xd, A.t())).mul_(scaling)
        if needs_A:
            grad_A = torch.mm(g_u.t(), xd)
        del xd, g_lora
    op_args = (packed, absmax, n, k, blocksize, quant_type, True, nested_absmax, nested_code, nested_offset,
               nested_blocksize)
    if needs_x and needs_x_drop and ctx.x_drop_is_x:
        # dx's two terms in one tensor instead of a second (m, k) gradient that autograd would
        # allocate and sum into dx: `g_u @ A` in the backend's product where it takes it (its
        # fp32 sums, one rounding), else added into it in place.
        if _eager.direct(grad, g_u, A, packed, absmax, nested_absmax, nested_code, nested_offset):
            scales = BlockScales.from_op_args(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
            grad_x = backends.select(grad.device).matmul_4bit_low_rank(
                grad, packed, scales, n, k, blocksize, quant_type, True, g_u, A, 1.0)
        else:
            grad_x = matmul.call(grad, *op_args)
            backends.add_low_rank(grad_x, g_u, A, 1.0, transposed=True)
    elif needs_x:
        grad_x = matmul.call(grad, *op_args)
    if needs_x_drop and not ctx.x_drop_is_x:
        grad_x_drop = (g_u @ A).to(x_drop.dtype).reshape(x_drop.shape)
    grads = (grad_x, grad_x_drop, None, None, grad_bias, grad_A, grad_B)
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


torch.library.register_autograd("fastlora::lora_linear_4bit", _backward, setup_context=_setup_context)


LoraLinear4bitFunction = _eager.autograd_function("LoraLinear4bitFunction", _implementation, _setup_context, _backward)
