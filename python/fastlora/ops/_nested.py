"""The double-quantized block scales as the 4-bit ops take them.

The ops accept the block scales either as fp32 (`absmax`) or double-quantized: uint8 codes in
`absmax` plus the second-level state (`nested_absmax`, `nested_code`, `nested_offset`,
`nested_blocksize`), which the Triton kernels decode in registers and the CPU path decodes
once per call. Passing them through saves a separate decode op and kernel launch per call.
"""

from __future__ import annotations

import torch

SCHEMA = "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, int nested_blocksize=256"


def check(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
          nested_offset: torch.Tensor | None, nested_blocksize: int) -> None:
    """Raises naming the argument when the scale arguments do not fit together: the Triton
    kernels index `nested_absmax` and `nested_code` by `absmax`'s values and positions, so a
    mismatch must stop here, before any pointer reaches a kernel."""
    if nested_absmax is None:
        if absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be float32 without nested scales, got {absmax.dtype}")
        return
    if nested_code is None or nested_offset is None:
        raise ValueError("nested_code and nested_offset are required with nested_absmax")
    if absmax.dtype != torch.uint8:
        raise TypeError(f"absmax must be uint8 (double-quantized codes) with nested scales, got {absmax.dtype}")
    if isinstance(nested_blocksize, bool) or nested_blocksize < 1:
        raise ValueError(f"nested_blocksize must be a positive int, got {nested_blocksize!r}")
    expected = -(-absmax.numel() // nested_blocksize)
    if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != expected:
        raise ValueError(f"nested_absmax must be {expected} float32 values, got {nested_absmax.numel()} "
                         f"{nested_absmax.dtype}")
    if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
        raise ValueError(f"nested_code must be 256 float32 values, got {nested_code.numel()} {nested_code.dtype}")
    if nested_offset.numel() != 1 or not nested_offset.dtype.is_floating_point:
        raise ValueError(f"nested_offset must be one float value, got shape {tuple(nested_offset.shape)}")
    devices = {t.device for t in (absmax, nested_absmax, nested_code, nested_offset)}
    if len(devices) > 1:
        raise ValueError(f"absmax and the nested scales must be on one device, got {sorted(map(str, devices))}")


def triton_scales(nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                  nested_offset: torch.Tensor | None, nested_blocksize: int):
    """The `NestedScales` the Triton kernels take, or None for fp32 scales."""
    if nested_absmax is None:
        return None
    from ..kernels.dequantize import NestedScales

    return NestedScales(nested_absmax, nested_code, nested_offset, nested_blocksize)
