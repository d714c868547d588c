"""fastlora: LoRA and QLoRA kernels for torch.

bitsandbytes-compatible 4-bit (NF4/FP4) quantization with Rust CPU kernels and Triton GPU
kernels. The functional API mirrors `bitsandbytes.functional`:

    >>> import torch, fastlora
    >>> w = torch.randn(256, 512)
    >>> packed, state = fastlora.quantize_4bit(w, quant_type="nf4")
    >>> y = fastlora.matmul_4bit(torch.randn(3, 512), packed, state)
"""

import importlib.metadata

from . import _native
from ._threads import get_num_threads, set_num_threads, thread_pool
from .adapter import load_adapter, save_adapter
from .backends import cpu as _cpu_backend
from .backends.cpu import empty_cache
from .functional import dequantize_4bit, lora_batched, matmul_4bit, quantize_4bit
from .model import merge_and_unload, prepare_model
from .named_adapters import active_adapter, adapters_per_row, delete_adapter, list_adapters, set_adapter
from .nn import Linear4bit, LoraLinear
from .quant_state import QuantState

# isort: split
from . import train  # fastlora.train(...) trains (the package is callable); it uses the API above

__version__ = importlib.metadata.version("fastlora")


def from_pretrained(name_or_path, **kwargs):
    """A Hugging Face model with its linear layers as `fastlora.Linear4bit`, from a
    bitsandbytes 4-bit checkpoint (as stored, without bitsandbytes) or a 16/32-bit one
    (quantized while loading). See `fastlora.hf.from_pretrained`; needs transformers 5."""
    from . import hf  # imports transformers: only when asked for

    return hf.from_pretrained(name_or_path, **kwargs)


def simd_level() -> str:
    """The instruction set fastlora's CPU kernels use here: "avx512", "avx2" or "scalar" (the widest
    the CPU has, at most `FASTLORA_MAX_ISA`; scalar under `FASTLORA_FORCE_SCALAR=1`)."""
    return _native.simd_level()


def simd_levels() -> list[str]:
    """Every instruction set this CPU can run fastlora's CPU kernels with, narrowest first
    (the values `FASTLORA_MAX_ISA` takes here)."""
    return _native.simd_levels()


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, with the kernels
    on AVX-512): then a bf16 product of many rows dequantizes its weight to bf16 for torch's
    bf16 GEMM, and `fastlora train --precision auto` trains in bf16 on the CPU."""
    return _native.native_bf16()


def fp32_gemm() -> str:
    """Which library multiplies the dequantized weight tiles of a many-row fp32 CPU product:
    "onednn" (torch's oneDNN linear) on CPUs with AVX-512 not made by Intel, where torch's MKL
    runs only its AVX2 kernels, else "blas" (torch's matmul); `FASTLORA_FP32_GEMM` overrides."""
    return _cpu_backend.FP32_GEMM


__all__ = [
    "Linear4bit",
    "LoraLinear",
    "QuantState",
    "active_adapter",
    "adapters_per_row",
    "delete_adapter",
    "empty_cache",
    "from_pretrained",
    "list_adapters",
    "load_adapter",
    "lora_batched",
    "merge_and_unload",
    "prepare_model",
    "save_adapter",
    "set_adapter",
    "dequantize_4bit",
    "get_num_threads",
    "matmul_4bit",
    "quantize_4bit",
    "set_num_threads",
    "thread_pool",
    "simd_level",
    "simd_levels",
    "native_bf16",
    "fp32_gemm",
    "train",
]
