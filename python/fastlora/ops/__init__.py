"""fastlora's torch custom ops (namespace `torch.ops.fastlora`), one module per op.

Each op is declared once with `torch.library`: its schema, its fake implementation (shapes
only, for `torch.compile` and meta tensors), its autograd formula, and one implementation
registered for the cpu and cuda keys that runs the backend `fastlora.backends.select` picks
(Rust on CPU, Triton on CUDA or under `FASTLORA_BACKEND=triton`). Block scales travel as
`fastlora.scales.BlockScales`, flattened into the op's arguments (`BlockScales.op_args`).
Arguments are validated before they get here (the public API, the call plans); the
`ops.<op>.<op>` functions call the op through the dispatcher only where it has a part
(`_eager`).
"""

from . import lora, lora_batched, matmul, quantize

__all__ = ["lora", "lora_batched", "matmul", "quantize"]
