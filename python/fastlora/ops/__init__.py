"""fastlora's torch custom ops (namespace `torch.ops.fastlora`).

Each op is declared once with `torch.library`, with a fake implementation (shapes only, for
`torch.compile` and meta tensors) and one implementation per device beside it: the Rust
kernels on CPU, the plain-PyTorch reference on CUDA until the Triton kernels replace it.
Arguments are validated by the public API (`fastlora.functional`) before they get here.
"""

from . import lora, matmul, quantize

__all__ = ["lora", "matmul", "quantize"]
