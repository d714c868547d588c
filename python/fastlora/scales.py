"""`BlockScales`: the one representation of a 4-bit weight's block scales that every layer, op
and backend takes, with its checks.

Either fp32 scales (`absmax`, one per block), or double-quantized as bitsandbytes stores them:
uint8 codes in `absmax` plus the `NestedScales` that decode them,
`code[q] * absmax2[i // blocksize] + offset`. The Triton kernels decode them in registers;
the CPU backend decodes them once per call plan (`fastlora.plan`), or once per op call
outside a plan. `compress_statistics` (bitsandbytes' name) is only spoken at the API edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import NESTED_BLOCKSIZE

# The custom ops' trailing arguments that carry the nested scales (see `BlockScales.op_args`).
OP_SCHEMA = "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, int nested_blocksize=256"


@dataclass(frozen=True)
class NestedScales:
    """What decodes uint8 (double-quantized) block scales: `code[q] * absmax[i // blocksize] + offset`.

    `absmax` is the fp32 `state2.absmax`, `code` the 256-entry map, `offset` a 0-d fp32
    tensor on the device (read by the kernels, never synchronized to the host).
    """

    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor
    blocksize: int = NESTED_BLOCKSIZE


@dataclass(frozen=True)
class BlockScales:
    absmax: torch.Tensor
    nested: NestedScales | None = None

    @classmethod
    def from_op_args(cls, absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                     nested_offset: torch.Tensor | None, nested_blocksize: int) -> BlockScales:
        """The scales from a custom op's arguments, checked (the kernels index `nested_absmax`
        and `nested_code` by `absmax`'s values and positions: a mismatch must stop here)."""
        if nested_absmax is None:
            if nested_code is not None or nested_offset is not None:
                raise ValueError("nested_code and nested_offset need nested_absmax")
            scales = cls(absmax)
        else:
            if nested_code is None or nested_offset is None:
                raise ValueError("nested_code and nested_offset are required with nested_absmax")
            scales = cls(absmax, NestedScales(nested_absmax, nested_code, nested_offset, nested_blocksize))
        scales.check()
        return scales

    def op_args(self) -> tuple:
        """The custom ops' scale arguments: `absmax, nested_absmax, nested_code, nested_offset,
        nested_blocksize` (`OP_SCHEMA`)."""
        nested = self.nested
        if nested is None:
            return (self.absmax, None, None, None, NESTED_BLOCKSIZE)
        return (self.absmax, nested.absmax, nested.code, nested.offset, nested.blocksize)

    def check(self, blocks: int | None = None, name: str = "absmax") -> BlockScales:
        """Raises naming the argument when the scales do not fit together (or do not hold
        `blocks` scales); returns self."""
        absmax, nested = self.absmax, self.nested
        if not isinstance(absmax, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(absmax).__name__}")
        if blocks is not None and absmax.numel() != blocks:
            raise ValueError(f"{name} holds {absmax.numel()} scales but the weight has {blocks} blocks")
        if nested is None:
            if absmax.dtype != torch.float32:
                raise TypeError(f"{name} must be float32 without nested scales, got {absmax.dtype}")
            return self
        if absmax.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 (double-quantized codes) with nested scales, got {absmax.dtype}")
        blocksize = nested.blocksize
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"nested_blocksize must be a positive int, got {blocksize!r}")
        for label, t in (("nested_absmax", nested.absmax), ("nested_code", nested.code),
                         ("nested_offset", nested.offset)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        expected = -(-absmax.numel() // blocksize)
        if nested.absmax.dtype != torch.float32 or nested.absmax.numel() != expected:
            raise ValueError(f"nested_absmax must be {expected} float32 values, got {nested.absmax.numel()} "
                             f"{nested.absmax.dtype}")
        if nested.code.dtype != torch.float32 or nested.code.numel() != 256:
            raise ValueError(f"nested_code must be 256 float32 values, got {nested.code.numel()} {nested.code.dtype}")
        if nested.offset.numel() != 1 or not nested.offset.dtype.is_floating_point:
            raise ValueError(f"nested_offset must be one float value, got shape {tuple(nested.offset.shape)}")
        devices = {t.device for t in (absmax, nested.absmax, nested.code, nested.offset)}
        if len(devices) > 1:
            raise ValueError(f"{name} and the nested scales must be on one device, got {sorted(map(str, devices))}")
        return self

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def decoded(self) -> torch.Tensor:
        """The fp32 scale of every block (the scales themselves when not nested)."""
        nested = self.nested
        if nested is None:
            return self.absmax
        offset = nested.offset.reshape(()).to(torch.float32)
        return torch.ops.fastlora.dequantize_blockwise(
            self.absmax.contiguous(), nested.absmax.contiguous(), nested.code.contiguous(), nested.blocksize, offset
        )
