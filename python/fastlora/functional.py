"""The functional API: bitsandbytes-compatible 4-bit quantization and matmul.

`quantize_4bit`, `dequantize_4bit` and `matmul_4bit` take and return what their
`bitsandbytes.functional` namesakes do, so packed weights and `QuantState`s move between
the two libraries unchanged. Arguments are checked here; the work is done by the
`torch.ops.fastlora` custom ops (Rust on CPU, Triton/reference on CUDA).
"""

from __future__ import annotations

import math

import torch

from . import _checks, ops
from .formats import NESTED_BLOCKSIZE, code_tensor, dynamic_map
from .quant_state import QuantState


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantizes `A` blockwise to 4 bits; returns the packed bytes and their `QuantState`.

    The packed tensor has shape `((A.numel() + 1) // 2, 1)` and dtype `quant_storage` (a
    view of the same bytes). With `compress_statistics` the per-block scales are themselves
    quantized to 8 bits ("double quantization"). `A` must be finite: NaN or Inf raise.
    """
    A = _checks.float_tensor("A", A)
    if A.numel() == 0:
        raise ValueError("A must have at least one element")
    blocksize = _checks.blocksize(blocksize)
    quant_type = _checks.quant_type(quant_type)
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage must be a torch.dtype, got {quant_storage!r}")
    packed_bytes = (A.numel() + 1) // 2
    storage_size = torch.empty((), dtype=quant_storage).element_size()
    if packed_bytes % storage_size:
        raise ValueError(
            f"quant_storage={quant_storage} needs the packed size ({packed_bytes} bytes) to be a multiple of "
            f"{storage_size}"
        )
    _checks.finite("A", A)

    packed, absmax = torch.ops.fastlora.quantize_4bit(A.contiguous(), blocksize, quant_type)
    code = code_tensor(quant_type, A.device)
    if compress_statistics:
        offset = absmax.mean()
        nested_code = dynamic_map(A.device)
        quantized, nested_absmax = torch.ops.fastlora.quantize_blockwise(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state2 = QuantState(
            absmax=nested_absmax, code=nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
        state = QuantState(
            absmax=quantized, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type,
            dtype=A.dtype, offset=offset, state2=state2,
        )
    else:
        state = QuantState(
            absmax=absmax, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=A.dtype
        )
    if quant_storage != torch.uint8:
        packed = packed.view(-1).view(quant_storage).unsqueeze(1)
    return packed, state


def _packed_bytes(packed: object, state: QuantState) -> torch.Tensor:
    """The packed tensor as a flat uint8 view, checked against the state it belongs to."""
    packed = _checks.tensor("packed", packed)
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    if packed.dtype == torch.bool or packed.dtype.is_complex:
        raise TypeError(f"packed has dtype {packed.dtype}; expected uint8 or a quant_storage view of it")
    flat = packed.reshape(-1).view(torch.uint8)
    numel = math.prod(state.shape)
    if flat.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed holds {flat.numel()} bytes but quant_state.shape {tuple(state.shape)} needs {(numel + 1) // 2}"
        )
    return flat


def _check_state(quant_state: object) -> QuantState:
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a fastlora.QuantState, got {type(quant_state).__name__}")
    _checks.blocksize(quant_state.blocksize)
    _checks.quant_type(quant_state.quant_type)
    numel = math.prod(quant_state.shape)
    blocks = -(-numel // quant_state.blocksize)
    absmax = _checks.tensor("quant_state.absmax", quant_state.absmax)
    if absmax.numel() != blocks:
        raise ValueError(
            f"quant_state.absmax holds {absmax.numel()} scales but shape {tuple(quant_state.shape)} in blocks of "
            f"{quant_state.blocksize} needs {blocks}"
        )
    if quant_state.nested:
        if absmax.dtype != torch.uint8:
            raise TypeError(f"quant_state.absmax must be uint8 when nested, got {absmax.dtype}")
        state2 = quant_state.state2
        nested = _checks.tensor("quant_state.state2.absmax", state2.absmax)
        if nested.dtype != torch.float32 or nested.numel() != -(-blocks // state2.blocksize):
            raise ValueError(
                f"quant_state.state2.absmax must be float32 with {-(-blocks // state2.blocksize)} values, got "
                f"{nested.dtype} with {nested.numel()}"
            )
        code2 = _checks.tensor("quant_state.state2.code", state2.code)
        if code2.dtype != torch.float32 or code2.numel() != 256:
            raise ValueError("quant_state.state2.code must be 256 float32 values")
        if quant_state.offset is None:
            raise ValueError("quant_state.offset is missing for a nested state")
    elif absmax.dtype != torch.float32:
        raise TypeError(f"quant_state.absmax must be float32, got {absmax.dtype}")
    return quant_state


def block_scales(quant_state: QuantState) -> torch.Tensor:
    """The fp32 scale of every block, decoding double-quantized statistics."""
    if not quant_state.nested:
        return quant_state.absmax
    state2 = quant_state.state2
    offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=quant_state.absmax.device)
    return torch.ops.fastlora.dequantize_blockwise(
        quant_state.absmax.contiguous(), state2.absmax.contiguous(), state2.code.contiguous(), state2.blocksize, offset
    )


def _scale_args(quant_state: QuantState) -> tuple:
    """The block-scale arguments of the 4-bit ops for a checked state: `absmax` and, when
    double-quantized, the second-level state the kernels decode it with."""
    if not quant_state.nested:
        return (quant_state.absmax.contiguous(), None, None, None, NESTED_BLOCKSIZE)
    state2 = quant_state.state2
    offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=quant_state.absmax.device)
    return (quant_state.absmax.contiguous(), state2.absmax.contiguous(), state2.code.contiguous(), offset,
            state2.blocksize)


def dequantize_4bit(packed: torch.Tensor, quant_state: QuantState) -> torch.Tensor:
    """The dense tensor: original shape and dtype, `code[nibble] * absmax[block]`."""
    state = _check_state(quant_state)
    flat = _packed_bytes(packed, state)
    _checks.same_device(packed=flat, absmax=state.absmax)
    absmax, *nested = _scale_args(state)
    return torch.ops.fastlora.dequantize_4bit(
        flat, absmax, state.blocksize, state.quant_type, list(state.shape), state.dtype, *nested
    )


def matmul_4bit(
    x: torch.Tensor, packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ dequantize_4bit(packed, quant_state).T + bias` in x's dtype, without building the
    dense weight. The weight has shape `(out_features, in_features)`; x is `(..., in_features)`.
    Differentiable in `x` and `bias`."""
    state = _check_state(quant_state)
    x = _checks.float_tensor("x", x)
    if len(state.shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D (out_features, in_features), got {tuple(state.shape)}")
    n, k = state.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) for a weight of shape ({n}, {k}), got {tuple(x.shape)}")
    flat = _packed_bytes(packed, state)
    if bias is not None:
        bias = _checks.float_tensor("bias", bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    _checks.same_device(x=x, packed=flat, absmax=state.absmax, bias=bias)
    absmax, *nested = _scale_args(state)
    y = ops.matmul.matmul_4bit(x, flat, absmax, n, k, state.blocksize, state.quant_type, False, *nested)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
