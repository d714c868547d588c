"""Op: the LoRA term of a mixed batch, each row through its own adapter (many adapters over
one 4-bit base, as serving stacks run them):
`y[t] = scaling[i] * (x[t] @ A[i].T) @ B[i].T` with `i = indices[t]`, and 0 where `i` is -1.

The adapters arrive stacked, `A` `(n, r, K)` and `B` `(n, O, r)`, ranks padded to `r` (zero
rows of `A` add nothing). Inference only: no autograd formula is registered (a batch mixing
adapters trains none of them).
"""

from __future__ import annotations

import torch

from .. import backends
from . import _eager

torch.library.define(
    "fastlora::lora_batched", "(Tensor x, Tensor A, Tensor B, Tensor indices, Tensor scaling) -> Tensor"
)


@torch.library.register_fake("fastlora::lora_batched")
def _(x, A, B, indices, scaling) -> torch.Tensor:
    return x.new_empty((x.shape[0], B.shape[1]))


def _implementation(x, A, B, indices, scaling) -> torch.Tensor:
    return backends.select(x.device).lora_batched(x, A, B, indices, scaling)


torch.library.register_kernel("fastlora::lora_batched", ("cpu", "cuda"))(_implementation)


def lora_batched(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
                 scaling: torch.Tensor) -> torch.Tensor:
    """The op on checked arguments (through the dispatcher only where it has a part)."""
    return _eager.call(torch.ops.fastlora.lora_batched, _implementation, x, A, B, indices, scaling)
