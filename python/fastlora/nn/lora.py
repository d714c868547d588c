"""`LoraLinear`: a LoRA adapter over a frozen base layer, with PEFT's semantics.

`y = base(x) + scaling * lora_B(lora_A(dropout(x)))`, scaling `lora_alpha / r` (or
`lora_alpha / sqrt(r)` with rsLoRA). Over a `Linear4bit` base the whole layer is one fused op
(`torch.ops.fastlora.lora_linear_4bit`); over an `nn.Linear` base it is plain torch.
Parameter names (`lora_A.weight`, `lora_B.weight`) are PEFT's, less the adapter name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from .linear4bit import AtomicLoad, Linear4bit, check_input

INIT_CHOICES = (True, False, "gaussian")


def check_lora_args(r: object, lora_alpha: object, lora_dropout: object, init_lora_weights: object) -> None:
    """Raises `ValueError` naming the first LoRA setting that is out of range."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha)
            or lora_alpha <= 0):
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if not (isinstance(init_lora_weights, bool) or init_lora_weights == "gaussian"):  # `1 in INIT_CHOICES` holds
        raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {init_lora_weights!r}")


def fused_lora_forward(base: Linear4bit, x: torch.Tensor, dropout: nn.Module, A: torch.Tensor, B: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """`base(x) + scaling * (dropout(x) @ A.T) @ B.T` in fastlora's fused 4-bit LoRA op (the
    forward of `LoraLinear` and of PEFT's layer over a `Linear4bit`, `fastlora.peft`)."""
    check_input(x, base.in_features, base.compute_dtype)
    dtype = base.compute_dtype or x.dtype
    xc = x if x.dtype == dtype else x.to(dtype)
    x_drop = dropout(xc)
    if torch.compiler.is_compiling():  # traced: the op on the layer's tensors (a plan is eager state)
        y = ops.lora.lora_linear_4bit(xc, x_drop, base.packed_bytes(), base.block_scales(), base.bias, A, B, scaling,
                                      base.blocksize, base.quant_type)
    else:
        y = base.plan().lora_linear(xc, x_drop, base.bias, A, B, scaling)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class LoraLinear(AtomicLoad, nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear | Linear4bit,
        r: int = 16,
        lora_alpha: float = 32,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Linear4bit)):
            raise TypeError(f"base_layer must be an nn.Linear or fastlora.Linear4bit, got {type(base_layer).__name__}")
        check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, bool(use_rslora)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initializations: kaiming-uniform A (or gaussian with std 1/r) and zero B,
        so a fresh adapter leaves the base's output unchanged; `False` keeps random B."""
        if init_lora_weights is False:
            return
        with torch.no_grad():
            if init_lora_weights == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A` in fp32 (what merging adds to the base weight)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self) -> None:
        """Adds the adapter into an `nn.Linear` base weight. A 4-bit base cannot hold the sum
        without requantizing (lossy): use `fastlora.merge_and_unload` for a dense model."""
        if isinstance(self.base_layer, Linear4bit):
            raise TypeError("cannot merge into a 4-bit weight; use fastlora.merge_and_unload(model) for dense weights")
        if not self.merged:
            with torch.no_grad():
                w = self.base_layer.weight
                w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                w = self.base_layer.weight
                w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def merged_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense `nn.Linear` holding `W + scaling * B @ A` (and the bias) in `dtype`
        (default: the base weight's dtype)."""
        base = self.base_layer
        dense = base.dequantize() if isinstance(base, Linear4bit) else base.weight.detach()
        # Taken before unmerging below turns `dense` into fp32.
        dtype = dtype or (base.compute_dtype or base.weight_dtype if isinstance(base, Linear4bit) else dense.dtype)
        if self.merged:
            dense = dense.float() - self.delta_weight()  # the base already holds the delta
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=dense.device,
                           dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_((dense.float() + self.delta_weight()).to(dtype))
            if base.bias is not None:
                linear.bias.copy_(base.bias.to(dtype))
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        if isinstance(base, Linear4bit):
            return fused_lora_forward(base, x, self.lora_dropout, self.lora_A.weight, self.lora_B.weight,
                                      self.scaling)
        y = base(x)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (lora * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"
