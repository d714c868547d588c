"""The Triton backend: fastlora's ops on the Triton kernels of `fastlora.kernels` (CUDA
tensors, or CPU tensors under Triton's interpreter; see `fastlora.backends`). Arguments are
checked by the callers; double-quantized scales go to the kernels as stored, decoded there."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels import dequantize as _dequantize
from ..kernels import lora as _lora
from ..kernels import lora_batched as _lora_batched
from ..kernels import matmul as _matmul
from ..scales import BlockScales
from . import add_low_rank

NAME = "triton"


def interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return _dequantize.INTERPRETED


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _dequantize.quantize_4bit(A, blocksize, quant_type)


def dequantize_4bit(packed: torch.Tensor, scales: BlockScales, blocksize: int, quant_type: str, shape: Sequence[int],
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    return _dequantize.dequantize_4bit(packed, scales.absmax, blocksize, quant_type, shape, dtype,
                                       nested=scales.nested, out=out)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _dequantize.quantize_blockwise(A, code, blocksize)


def dequantize_blockwise(quantized: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         offset: torch.Tensor) -> torch.Tensor:
    return _dequantize.dequantize_blockwise(quantized, absmax, code, blocksize, offset)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
                quant_type: str, transposed: bool) -> torch.Tensor:
    return _matmul.matmul_4bit(x, packed, scales.absmax, n, k, blocksize, quant_type, transposed,
                               nested=scales.nested)


def matmul_4bit_low_rank(x: torch.Tensor, packed: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
                         quant_type: str, transposed: bool, u: torch.Tensor, factor: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """`matmul_4bit` plus `scale * u @ factor.T` (`scale * u @ factor` when `transposed`),
    added after the product in u's dtype."""
    return add_low_rank(matmul_4bit(x, packed, scales, n, k, blocksize, quant_type, transposed), u, factor, scale,
                        transposed)


def lora_linear_4bit(x: torch.Tensor, x_drop: torch.Tensor, packed: torch.Tensor, scales: BlockScales,
                     bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scaling: float, blocksize: int,
                     quant_type: str) -> torch.Tensor:
    """Bias and the LoRA term fused into the matmul's epilogue."""
    return _lora.lora_linear_4bit(x, x_drop, packed, scales.absmax, bias, A, B, scaling, blocksize, quant_type,
                                  nested=scales.nested)


def lora_batched(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
                 scaling: torch.Tensor) -> torch.Tensor:
    return _lora_batched.lora_batched(x, A, B, indices, scaling)


class PreparedWeight:
    """A frozen 4-bit weight made ready for many calls on this backend (its half of a call
    plan, `fastlora.plan`): the kernels' arguments, gathered once."""

    __slots__ = ("packed", "scales", "n", "k", "blocksize", "quant_type")
    decode = None  # no one-step decoding call: every call takes `matmul`

    def __init__(self, packed: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
                 quant_type: str) -> None:
        self.packed, self.scales = packed, scales
        self.n, self.k, self.blocksize, self.quant_type = n, k, blocksize, quant_type

    def matmul(self, x: torch.Tensor, transposed: bool = False, lora: tuple | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        if lora is None:
            y = matmul_4bit(x, self.packed, self.scales, self.n, self.k, self.blocksize, self.quant_type, transposed)
            return y if bias is None else y.add_(bias.to(y.dtype))
        a, b, scaling = lora  # bias and LoRA in the kernel's epilogue
        return lora_linear_4bit(x, x, self.packed, self.scales, bias, a, b, scaling, self.blocksize, self.quant_type)


def prepare(packed: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
            quant_type: str) -> PreparedWeight:
    return PreparedWeight(packed, scales, n, k, blocksize, quant_type)
