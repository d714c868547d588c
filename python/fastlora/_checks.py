"""Argument checks shared by the public API. Every check raises before any pointer reaches
Rust or Triton, with a message that names the argument."""

from __future__ import annotations

import torch

from .formats import BLOCKSIZES, QUANT_TYPES

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DEVICE_TYPES = ("cpu", "cuda")


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type not in _DEVICE_TYPES:
        raise ValueError(f"{name} is on device {value.device}; fastlora supports cpu and cuda")
    return value


def float_tensor(name: str, value: object) -> torch.Tensor:
    t = tensor(name, value)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    return t


def finite(name: str, t: torch.Tensor) -> None:
    # Not a torch.compile-friendly check; it runs only on the eager quantize path.
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; 4-bit quantization needs finite values")


def blocksize(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {value!r}")
    return value


def quant_type(value: object) -> str:
    if value not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {value!r}")
    return str(value)


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")
