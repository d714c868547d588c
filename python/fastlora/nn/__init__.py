"""Layers: `Linear4bit` (a frozen 4-bit base) and `LoraLinear` (a LoRA adapter over it)."""

from .linear4bit import Linear4bit
from .lora import LoraLinear

__all__ = ["Linear4bit", "LoraLinear"]
