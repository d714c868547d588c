"""The implementations of fastlora's ops, one module per backend, and which one runs.

* `backends.cpu`: the Rust kernels (`fastlora._native`), for CPU tensors.
* `backends.triton`: the Triton kernels (`fastlora.kernels`), for CUDA tensors, and for CPU
  tensors under `FASTLORA_BACKEND=triton`: then they run under Triton's interpreter. That
  needs triton installed and `TRITON_INTERPRET=1` in the environment before Python starts
  (Triton reads it when the kernels are defined), e.g.
  `FASTLORA_BACKEND=triton TRITON_INTERPRET=1 pytest`. Results match the Rust path within
  float tolerance (bytes for quantization); it is slow, a way to test the GPU kernels
  without a GPU.

Each backend module implements the same functions (`quantize_4bit`, `dequantize_4bit`,
`quantize_blockwise`, `dequantize_blockwise`, `matmul_4bit`, `matmul_4bit_low_rank`,
`lora_linear_4bit`) on checked
arguments, block scales as a `fastlora.scales.BlockScales`. The ops (`fastlora.ops`) and the
call plans (`fastlora.plan`) pick one with `select`; nothing else branches on the backend.

`FASTLORA_BACKEND` is `auto` (the default, also when unset or empty), `rust` or `triton`;
anything else raises `ValueError`. Asking for Triton where it cannot run raises
`RuntimeError`: there is no silent fallback. The variable is read at every selection.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

_VARIABLE = "FASTLORA_BACKEND"
_CHOICES = ("auto", "rust", "triton")


def _triton() -> ModuleType:
    try:
        from . import triton
    except ImportError as exc:
        raise RuntimeError(
            f"fastlora's Triton kernels need the triton package, which failed to import ({exc}); "
            "install triton (it comes with torch's CUDA wheels)"
        ) from exc
    return triton


# `os.environ.get` of an unset variable raises and catches a KeyError inside (about 1 us, on
# every call of a layer): CPython's mapping behind `os.environ` answers the same in 0.1 us.
_environ_data = getattr(os.environ, "_data", None)
_encoded_key = os.environ.encodekey(_VARIABLE) if hasattr(os.environ, "encodekey") else None


def setting() -> str | None:
    """`FASTLORA_BACKEND` as set now (unchecked; `select` checks it)."""
    if _environ_data is None or _encoded_key is None:
        return os.environ.get(_VARIABLE)
    value = _environ_data.get(_encoded_key)
    return None if value is None else os.environ.decodevalue(value)


def select(device: torch.device) -> ModuleType:
    """The backend module that runs ops on `device` (see the module docstring)."""
    choice = os.environ.get(_VARIABLE) or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{_VARIABLE}={os.environ[_VARIABLE]!r}: expected one of {', '.join(_CHOICES)}")
    if device.type == "cuda":
        return _triton()
    if choice != "triton":
        from . import cpu

        return cpu
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{_VARIABLE}=triton runs the Triton kernels on CPU tensors through Triton's interpreter: "
            "set TRITON_INTERPRET=1 in the environment before starting Python"
        )
    triton = _triton()
    if not triton.interpreted():
        raise RuntimeError(
            f"{_VARIABLE}=triton: TRITON_INTERPRET=1 was set after fastlora's Triton kernels were loaded; "
            "set it before starting Python"
        )
    return triton


def add_low_rank(y: torch.Tensor, u: torch.Tensor, factor: torch.Tensor, scale: float,
                 transposed: bool = False) -> torch.Tensor:
    """`y += scale * u @ factor.T` (`scale * u @ factor` when `transposed`: the factor in a
    4-bit weight's orientation, LoRA's B or A) in place over y's rows, the product in u's
    dtype (a LoRA term in the adapter's): the backends' low-rank term where their kernel does
    not take it. Returns y."""
    y2d, down = y.view(-1, y.shape[-1]), factor if transposed else factor.t()
    if y2d.dtype == u.dtype:  # no temporary of y's size
        y2d.addmm_(u, down, alpha=scale)
    else:
        y2d.add_((u @ down).to(y2d.dtype), alpha=scale)
    return y
