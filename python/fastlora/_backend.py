"""Which kernels run fastlora's ops: Rust or Triton.

* CUDA tensors always run the Triton kernels (`fastlora.kernels`); without triton installed
  the call raises `RuntimeError`.
* CPU tensors run the Rust kernels, unless `FASTLORA_BACKEND=triton`: then they run the same
  Triton kernels a GPU would, under Triton's interpreter. That needs triton installed and
  `TRITON_INTERPRET=1` in the environment before Python starts (Triton reads it when the
  kernels are defined), e.g. `FASTLORA_BACKEND=triton TRITON_INTERPRET=1 pytest`. Results
  match the Rust path within float tolerance (bytes for quantization); it is slow, a way to
  test the GPU kernels without a GPU.

`FASTLORA_BACKEND` is `auto` (the default, also when unset or empty), `rust` or `triton`;
anything else raises `ValueError`. Asking for Triton where it cannot run raises
`RuntimeError`: there is no silent fallback. The variable is read at every call.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

_VARIABLE = "FASTLORA_BACKEND"
_CHOICES = ("auto", "rust", "triton")


def triton_kernels() -> ModuleType:
    """`fastlora.kernels` with its op modules imported; RuntimeError if triton is missing."""
    try:
        from . import kernels
        from .kernels import dequantize, lora, matmul  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"fastlora's Triton kernels need the triton package, which failed to import ({exc}); "
            "install triton (it comes with torch's CUDA wheels)"
        ) from exc
    return kernels


def uses_triton(device: torch.device) -> bool:
    """Whether an op on `device` runs the Triton kernels (see the module docstring)."""
    choice = os.environ.get(_VARIABLE) or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{_VARIABLE}={os.environ[_VARIABLE]!r}: expected one of {', '.join(_CHOICES)}")
    if device.type == "cuda":
        return True
    if choice != "triton":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{_VARIABLE}=triton runs the Triton kernels on CPU tensors through Triton's interpreter: "
            "set TRITON_INTERPRET=1 in the environment before starting Python"
        )
    if not triton_kernels().dequantize.INTERPRETED:
        raise RuntimeError(
            f"{_VARIABLE}=triton: TRITON_INTERPRET=1 was set after fastlora's Triton kernels were loaded; "
            "set it before starting Python"
        )
    return True
