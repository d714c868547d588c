"""Call plans: everything a frozen 4-bit weight's calls need that does not depend on the input,
prepared once.

A `WeightPlan` is made by a layer (`Linear4bit`, `LoraLinear`) when it is first called after
being built, loaded, moved or given a new state, and checks the weight then: packed size,
block scales, devices. A call checks only its input's dtype and shape (the layer) and device
(the plan). Each backend prepares its own part on first use (`backends.<name>.prepare`: on
CPU the decoded fp32 scales and a native handle on the packed bytes; on the Triton backend
the kernels' arguments), kept per backend so that `FASTLORA_BACKEND` may change between calls.

A plan never outlives what it was made from: the layer drops it in `_apply` (`.to`,
`.cuda`, `.half`, ...) and when its state is replaced (`load_state_dict`, quantizing again),
and `current` rebuilds it when the packed weight is no longer the tensor, or no longer the
memory, it was made from (FSDP2 frees and re-gathers parameter storage).
"""

from __future__ import annotations

import torch

from . import backends, ops
from .ops import _eager
from .scales import BlockScales


class WeightPlan:
    __slots__ = ("weight", "weight_ptr", "scales", "n", "k", "blocksize", "quant_type", "device", "_prepared",
                 "_last")

    def __init__(self, weight: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
                 quant_type: str) -> None:
        # No tensor ops here: a plan may be made inside a checkpointed region, whose recompute
        # must issue the same ops as its forward (selective checkpointing replays them).
        nbytes = weight.numel() * weight.element_size()
        if nbytes != (n * k + 1) // 2 or not weight.is_contiguous():
            raise ValueError(f"weight holds {nbytes} bytes, a ({n}, {k}) weight needs {(n * k + 1) // 2} contiguous")
        scales.check(-(-n * k // blocksize))
        if scales.device != weight.device:
            raise ValueError(f"weight is on {weight.device} but its block scales are on {scales.device}")
        self.weight, self.weight_ptr = weight, weight.data_ptr()
        self.scales = scales
        self.n, self.k, self.blocksize, self.quant_type = n, k, blocksize, quant_type
        self.device = weight.device
        self._prepared: dict[str | None, object] = {}
        self._last: tuple = (object(), None)  # (backend setting, its part) of the last call

    @property
    def packed(self) -> torch.Tensor:
        """The packed bytes as a flat uint8 view (made per use: see `__init__`)."""
        return self.weight.view(torch.uint8).reshape(-1)

    def is_current(self, weight: torch.Tensor) -> bool:
        return weight is self.weight and weight.data_ptr() == self.weight_ptr

    def _backend_part(self):
        # Keyed by the backend setting, so a change of FASTLORA_BACKEND between calls is seen.
        setting = backends.setting()
        last_setting, part = self._last
        if setting == last_setting:
            return part
        part = self._prepared.get(setting)
        if part is None:
            backend = backends.select(self.device)
            part = self._prepared[setting] = backend.prepare(
                self.packed, self.scales, self.n, self.k, self.blocksize, self.quant_type)
        self._last = (setting, part)
        return part

    def decode(self, x: torch.Tensor, bias: torch.Tensor | None, lora: tuple | None = None) -> torch.Tensor | None:
        """`x @ W.T (+ bias)` (with `lora` = (A, B, scaling), plus `scaling * (x @ A.T) @ B.T`)
        for a layer's decoding call (the caller has checked that nothing compiles), in one
        step: eager, no autograd graph, a few rows of a contiguous CPU input on a backend that
        has a decoding call (the CPU's). None where the call is not of that kind, or on the
        first call after the backend setting changed: the caller then takes `matmul` or
        `lora_linear`, which check everything and raise the usual errors. Per-call host time is
        what a one-row decoding step of a model pays per layer, so this path checks only what
        it relies on."""
        setting, part = self._last
        if setting != backends.setting() or part.decode is None or not _eager.direct_on_cpu(x, bias, lora):
            return None
        return part.decode(x, bias, lora)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T (+ bias)` for an input of checked dtype and shape (its device is checked
        here) and a bias of shape (n,), through the op where autograd, tracing or a mode needs
        it, else straight into the backend's prepared weight."""
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the layer's weight is on {self.device}")
        if _eager.direct(x, bias):
            return self._backend_part().matmul(x, bias=bias)
        y = ops.matmul.matmul_4bit(x, self.packed, self.scales, self.n, self.k, self.blocksize, self.quant_type,
                                   False)
        return y if bias is None else y + bias.to(y.dtype)

    def lora_linear(self, x: torch.Tensor, x_drop: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                    B: torch.Tensor, scaling: float) -> torch.Tensor:
        """`x @ W.T + bias + scaling * (x_drop @ A.T) @ B.T` for a checked input."""
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the layer's weight is on {self.device}")
        if x_drop is x and _eager.direct(x, bias, A, B):
            return self._backend_part().matmul(x, lora=(A, B, scaling), bias=bias)
        return ops.lora.lora_linear_4bit(x, x_drop, self.packed, self.scales, bias, A, B, scaling, self.blocksize,
                                         self.quant_type)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        absmax, *nested = self.scales.op_args()
        return torch.ops.fastlora.dequantize_4bit(self.packed, absmax, self.blocksize, self.quant_type,
                                                  [self.n, self.k], dtype, *nested)
