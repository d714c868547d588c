"""`LoraLinear`: LoRA adapters over a frozen base layer, with PEFT's semantics.

`y = base(x) + scaling * lora_B(lora_A(dropout(x)))`, scaling `lora_alpha / r` (or
`lora_alpha / sqrt(r)` with rsLoRA). Over a `Linear4bit` base the whole layer is one fused op
(`torch.ops.fastlora.lora_linear_4bit`); over an `nn.Linear` base it is plain torch.

A layer holds named adapters and runs its active one; only the active one's weights are
submodules (`lora_A.weight`, `lora_B.weight`: PEFT's names, less the adapter name), so the
state dict, the optimizer and distributed wrappers see exactly what trains, and switching
rebinds modules instead of copying weights. In a mixed batch (`fastlora.adapters_per_row`)
each row runs through its own adapter in one `fastlora::lora_batched` op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


def _passes_input(dropout: nn.Module) -> bool:
    """Whether `dropout(x)` is x itself (no dropout, or not training)."""
    return type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and (not dropout.training or dropout.p == 0))


def fused_lora_forward(base: Linear4bit, x: torch.Tensor, dropout: nn.Module, A: torch.Tensor, B: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """`base(x) + scaling * (dropout(x) @ A.T) @ B.T` in fastlora's fused 4-bit LoRA op (the
    forward of `LoraLinear` and of PEFT's layer over a `Linear4bit`, `fastlora.peft`)."""
    compute_dtype = base.compute_dtype
    compiling = torch.compiler.is_compiling()  # traced: the op on the layer's tensors (a plan is eager state)
    if not compiling and (compute_dtype is None or getattr(x, "dtype", None) == compute_dtype) \
            and _passes_input(dropout):
        y = base.plan().decode(x, base._parameters["bias"], (A, B, scaling))  # a decoding call, in one step
        if y is not None:
            return y
    check_input(x, base.in_features, compute_dtype)
    dtype = compute_dtype or x.dtype
    xc = x if x.dtype == dtype else x.to(dtype)
    x_drop = dropout(xc)
    if compiling:
        y = ops.lora.lora_linear_4bit(xc, x_drop, base.packed_bytes(), base.block_scales(), base.bias, A, B, scaling,
                                      base.blocksize, base.quant_type)
    else:
        y = base.plan().lora_linear(xc, x_drop, base.bias, A, B, scaling)
    # Back to x's dtype only where x was cast to the compute dtype: under autocast the op's
    # output has the autocast dtype, as F.linear's has.
    return y if xc is x else y.to(x.dtype)


@dataclass(eq=False)
class LoraAdapter:
    """One adapter at one layer: its two products, its dropout and its settings."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    r: int
    lora_alpha: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r

    def modules(self) -> tuple[nn.Module, ...]:
        return self.lora_A, self.lora_B, self.lora_dropout


@dataclass(eq=False)
class RowAdapters:
    """A layer's adapters stacked for a mixed batch: `rows[b]` is batch row b's index into
    the stacks (-1: the base alone), `A` `(n, r, K)` and `B` `(n, O, r)` with ranks padded by
    zeros, `scaling` `(n,)`; no stacks when no row uses an adapter of this layer. The per-token
    indices are kept per input shape (a decoding step repeats the shape of the one before)."""

    rows: torch.Tensor
    A: torch.Tensor | None
    B: torch.Tensor | None
    scaling: torch.Tensor | None
    _indices: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def indices(self, batch: int, tokens: int) -> torch.Tensor:
        key = (batch, tokens)
        found = self._indices.get(key)
        if found is None:
            if batch % len(self.rows):
                raise ValueError(f"adapters_per_row names {len(self.rows)} rows, but the model got a batch of "
                                 f"{batch} (it must be a multiple: generate's num_return_sequences or num_beams "
                                 "repeat each row)")
            # Rows repeated by generate stay together (repeat_interleave), and a batch flattened
            # to (B*S, K) is batch-major, so repeating each row's index covers both.
            found = self.rows.repeat_interleave(tokens // len(self.rows))
            self._indices[key] = found
        return found


class LoraLinear(AtomicLoad, nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear | Linear4bit,
        r: int = 16,
        lora_alpha: float = 32,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Linear4bit)):
            raise TypeError(f"base_layer must be an nn.Linear or fastlora.Linear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.adapters: dict[str, LoraAdapter] = {}
        self.active_adapter: str | None = None
        self.row_adapters: RowAdapters | None = None
        self.merged = False
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        self.set_adapter(adapter_name)

    def add_adapter(self, name: str, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: bool | str = True) -> LoraAdapter:
        """A new adapter beside the others (inactive, frozen until `set_adapter` picks it)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        check_lora_args(r, lora_alpha, lora_dropout, init_lora_weights)
        device = self.base_layer.weight.device
        adapter = LoraAdapter(
            lora_A=nn.Linear(self.in_features, r, bias=False, device=device),
            lora_B=nn.Linear(r, self.out_features, bias=False, device=device),
            lora_dropout=nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity(),
            r=r, lora_alpha=lora_alpha, use_rslora=bool(use_rslora),
        )
        _reset_lora_parameters(adapter, init_lora_weights)
        for module in adapter.modules():
            module.train(self.training).requires_grad_(False)
        self.adapters[name] = adapter
        return adapter

    def set_adapter(self, name: str | None) -> None:
        """Makes `name` the adapter this layer runs and trains (PEFT's rule: the others are
        frozen); a name this layer does not have (or None) leaves the base alone."""
        self._check_no_rows("switch adapters")
        if self.merged:
            raise ValueError("cannot switch adapters while one is merged into the base; unmerge first")
        for adapter in self.adapters.values():
            for p in (adapter.lora_A.weight, adapter.lora_B.weight):
                p.requires_grad_(False)
        adapter = self.adapters.get(name)
        self.active_adapter = name if adapter is not None else None
        if adapter is None:
            self.lora_A = self.lora_B = None
            self.lora_dropout = nn.Identity()
            return
        self.lora_A, self.lora_B, self.lora_dropout = adapter.modules()
        self.lora_A.weight.requires_grad_(True)
        self.lora_B.weight.requires_grad_(True)
        adapter.lora_dropout.train(self.training)

    def _check_no_rows(self, what: str) -> None:
        if self.row_adapters is not None:
            raise ValueError(f"cannot {what} inside fastlora.adapters_per_row")

    def delete_adapter(self, name: str) -> None:
        self._check_no_rows("delete an adapter")
        if name == self.active_adapter:
            self.set_adapter(None)
        del self.adapters[name]

    def _active(self) -> LoraAdapter:
        if self.active_adapter is None:  # not AttributeError: nn.Module would replace the message
            raise RuntimeError(f"this layer has no active adapter (the base alone runs); it has {list(self.adapters)}")
        return self.adapters[self.active_adapter]

    # The active adapter's settings, under PEFT's names.
    r = property(lambda self: self._active().r)
    lora_alpha = property(lambda self: self._active().lora_alpha)
    use_rslora = property(lambda self: self._active().use_rslora)
    scaling = property(lambda self: self._active().scaling)

    def _apply(self, fn, recurse: bool = True):
        """`.to()`, `.cuda()`, `.half()` and the like reach the inactive adapters too (only
        the active one is a submodule)."""
        super()._apply(fn, recurse)
        for name, adapter in self.adapters.items():
            if name != self.active_adapter:
                adapter.lora_A._apply(fn, recurse)
                adapter.lora_B._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for adapter in self.adapters.values():
            adapter.lora_dropout.train(mode)
        return self

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initializations of the active adapter: kaiming-uniform A (or gaussian with
        std 1/r) and zero B, so a fresh adapter leaves the base's output unchanged; `False`
        keeps random B."""
        _reset_lora_parameters(self._active(), init_lora_weights)

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A` of the active adapter in fp32 (what merging adds to the base weight)."""
        adapter = self._active()
        return (adapter.lora_B.weight.float() @ adapter.lora_A.weight.float()) * adapter.scaling

    def merge(self) -> None:
        """Adds the active adapter into an `nn.Linear` base weight. A 4-bit base cannot hold the
        sum without requantizing (lossy): use `fastlora.merge_and_unload` for a dense model."""
        if isinstance(self.base_layer, Linear4bit):
            raise TypeError("cannot merge into a 4-bit weight; use fastlora.merge_and_unload(model) for dense weights")
        self._check_no_rows("merge")
        if not self.merged and self.active_adapter is not None:
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
        """A dense `nn.Linear` holding `W + scaling * B @ A` of the active adapter (W alone
        without one) and the bias, in `dtype` (default: the base weight's dtype)."""
        base = self.base_layer
        dense = base.dequantize() if isinstance(base, Linear4bit) else base.weight.detach()
        # Taken before unmerging below turns `dense` into fp32.
        dtype = dtype or (base.compute_dtype or base.weight_dtype if isinstance(base, Linear4bit) else dense.dtype)
        delta = self.delta_weight() if self.active_adapter is not None else 0.0
        if self.merged:
            dense = dense.float() - delta  # the base already holds the delta
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=dense.device,
                           dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_((dense.float() + delta).to(dtype))
            if base.bias is not None:
                linear.bias.copy_(base.bias.to(dtype))
        return linear

    def stack_adapters(self, rows: list[str | None]) -> RowAdapters:
        """The adapters `rows` names, stacked for a mixed batch (`fastlora.adapters_per_row`).
        The stacks are a copy, in the dtype of the first adapter's weights, kept while the
        batch runs."""
        names = list(dict.fromkeys(n for n in rows if n in self.adapters))
        device = self.base_layer.weight.device
        if not names:
            return RowAdapters(torch.full((len(rows),), -1, dtype=torch.long, device=device), None, None, None)
        adapters = [self.adapters[n] for n in names]
        weight = adapters[0].lora_A.weight
        rank = max(a.r for a in adapters)
        A = weight.new_zeros((len(names), rank, self.in_features))
        B = weight.new_zeros((len(names), self.out_features, rank))
        with torch.no_grad():
            for i, adapter in enumerate(adapters):
                A[i, :adapter.r] = adapter.lora_A.weight
                B[i, :, :adapter.r] = adapter.lora_B.weight
        scaling = torch.tensor([a.scaling for a in adapters], dtype=torch.float32, device=weight.device)
        index = {n: i for i, n in enumerate(names)}
        local = torch.tensor([index.get(n, -1) for n in rows], dtype=torch.long, device=weight.device)
        return RowAdapters(local, A, B, scaling)

    def _forward_rows(self, x: torch.Tensor, rows: RowAdapters) -> torch.Tensor:
        y = self.base_layer(x)
        x2 = x.reshape(-1, self.in_features)
        indices = rows.indices(x.shape[0] if x.dim() > 1 else 1, x2.shape[0])
        if rows.A is None:
            return y
        xc = x2 if x2.dtype == rows.A.dtype else x2.to(rows.A.dtype)
        term = ops.lora_batched.lora_batched(xc, rows.A, rows.B, indices, rows.scaling)
        return y + term.view(y.shape).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The submodules and weights from their dicts, not through nn.Module's `__getattr__`
        # (a fraction of a microsecond per name, on a call of a few microseconds).
        modules = self._modules
        base = modules["base_layer"]
        if self.row_adapters is not None:
            return self._forward_rows(x, self.row_adapters)
        lora_a = modules["lora_A"]
        if self.merged or lora_a is None:
            return base(x)
        if isinstance(base, Linear4bit):
            return fused_lora_forward(base, x, modules["lora_dropout"], lora_a._parameters["weight"],
                                      modules["lora_B"]._parameters["weight"], self.scaling)
        y = base(x)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return y + (lora * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        if self.active_adapter is None:
            return f"adapters={list(self.adapters)}, active=None"
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}, "
                f"active={self.active_adapter!r}" + (f", adapters={list(self.adapters)}" if len(self.adapters) > 1
                                                       else ""))


def _reset_lora_parameters(adapter: LoraAdapter, init_lora_weights: bool | str) -> None:
    if init_lora_weights is False:
        return
    with torch.no_grad():
        if init_lora_weights == "gaussian":
            nn.init.normal_(adapter.lora_A.weight, std=1 / adapter.r)
        else:
            nn.init.kaiming_uniform_(adapter.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(adapter.lora_B.weight)
