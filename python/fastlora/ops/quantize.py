"""Ops: 4-bit blockwise quantize/dequantize, and the 8-bit blockwise quantization of the
scales that double quantization uses; each runs on the backend `fastlora.backends.select`
picks for its device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import backends
from ..scales import OP_SCHEMA, BlockScales

torch.library.define(
    "fastlora::quantize_4bit", "(Tensor A, int blocksize, str quant_type) -> (Tensor packed, Tensor absmax)"
)
torch.library.define(
    "fastlora::dequantize_4bit",
    "(Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, ScalarType dtype, "
    f"{OP_SCHEMA}) -> Tensor",
)
torch.library.define(
    "fastlora::dequantize_4bit_out",
    f"(Tensor packed, Tensor absmax, int blocksize, str quant_type, {OP_SCHEMA}, *, Tensor(a!) out) -> ()",
)
torch.library.define(
    "fastlora::quantize_blockwise", "(Tensor A, Tensor code, int blocksize) -> (Tensor quantized, Tensor absmax)"
)
torch.library.define(
    "fastlora::dequantize_blockwise",
    "(Tensor quantized, Tensor absmax, Tensor code, int blocksize, Tensor offset) -> Tensor",
)


def _num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


@torch.library.register_fake("fastlora::quantize_4bit")
def _(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = A.numel()
    return (
        A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
        A.new_empty((_num_blocks(n, blocksize),), dtype=torch.float32),
    )


@torch.library.register_kernel("fastlora::quantize_4bit", ("cpu", "cuda"))
def _(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.select(A.device).quantize_4bit(A, blocksize, quant_type)


@torch.library.register_fake("fastlora::dequantize_4bit")
def _(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
    dtype: torch.dtype, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256,
) -> torch.Tensor:
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_kernel("fastlora::dequantize_4bit", ("cpu", "cuda"))
def _(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
    dtype: torch.dtype, nested_absmax=None, nested_code=None, nested_offset=None, nested_blocksize=256,
) -> torch.Tensor:
    scales = BlockScales.from_op_args(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    return backends.select(packed.device).dequantize_4bit(packed, scales, blocksize, quant_type, list(shape), dtype)


@torch.library.register_fake("fastlora::dequantize_4bit_out")
def _(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, nested_absmax=None,
      nested_code=None, nested_offset=None, nested_blocksize=256, *, out: torch.Tensor) -> None:
    return None


@torch.library.register_kernel("fastlora::dequantize_4bit_out", ("cpu", "cuda"))
def _(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, nested_absmax=None,
      nested_code=None, nested_offset=None, nested_blocksize=256, *, out: torch.Tensor) -> None:
    scales = BlockScales.from_op_args(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    backends.select(packed.device).dequantize_4bit(packed, scales, blocksize, quant_type, list(out.shape), out.dtype,
                                                   out=out)


@torch.library.register_fake("fastlora::quantize_blockwise")
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        A.new_empty(A.shape, dtype=torch.uint8),
        A.new_empty((_num_blocks(A.numel(), blocksize),), dtype=torch.float32),
    )


@torch.library.register_kernel("fastlora::quantize_blockwise", ("cpu", "cuda"))
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.select(A.device).quantize_blockwise(A, code, blocksize)


@torch.library.register_fake("fastlora::dequantize_blockwise")
def _(quantized: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor
      ) -> torch.Tensor:
    return quantized.new_empty(quantized.shape, dtype=torch.float32)


@torch.library.register_kernel("fastlora::dequantize_blockwise", ("cpu", "cuda"))
def _(quantized: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor
      ) -> torch.Tensor:
    return backends.select(quantized.device).dequantize_blockwise(quantized, absmax, code, blocksize, offset)
