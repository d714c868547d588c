"""fastlora's torch custom ops (namespace `torch.ops.fastlora`).

Each op is declared once with `torch.library`, with a fake implementation (shapes only, for
`torch.compile` and meta tensors) and the implementation beside it: the Triton kernels on
CUDA, the Rust kernels on CPU (or the Triton ones there, under `FASTLORA_BACKEND=triton`; see
`fastlora._backend`).
Arguments are validated by the public API (`fastlora.functional`) before they get here.
The layers call `matmul.matmul_4bit` and `lora.lora_linear_4bit`: the op, or its
implementation directly where the dispatcher would only forward the call (`_eager`).
"""

from . import lora, matmul, quantize

__all__ = ["lora", "matmul", "quantize"]
