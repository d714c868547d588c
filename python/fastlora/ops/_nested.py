"""The double-quantized block scales as the 4-bit ops take them.

The ops accept the block scales either as fp32 (`absmax`) or double-quantized: uint8 codes in
`absmax` plus the second-level state (`nested_absmax`, `nested_code`, `nested_offset`,
`nested_blocksize`), which the Triton kernels decode in registers and the CPU path decodes
once per call. Passing them through saves a separate decode op and kernel launch per call.
"""

from __future__ import annotations

import torch

SCHEMA = "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? nested_offset=None, int nested_blocksize=256"


def triton_scales(nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                  nested_offset: torch.Tensor | None, nested_blocksize: int):
    """The `NestedScales` the Triton kernels take, or None for fp32 scales."""
    if nested_absmax is None:
        return None
    from ..kernels.dequantize import NestedScales

    return NestedScales(nested_absmax, nested_code, nested_offset, nested_blocksize)
