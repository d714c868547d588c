"""`Linear4bit`: a linear layer whose weight is frozen in bitsandbytes' 4-bit format.

The packed bytes are the `weight` parameter (frozen, as in bitsandbytes); the quantization
statistics are plain buffers, so `.to()`, DDP and FSDP move and shard them like any tensor
and nothing lives in parameter attributes. `state_dict()` uses bitsandbytes' keys
(`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
`weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), so a state dict saved
from a `bitsandbytes.nn.Linear4bit` (or a Hugging Face 4-bit checkpoint) loads here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks, ops
from ..formats import NESTED_BLOCKSIZE
from ..functional import quantize_4bit
from ..plan import WeightPlan
from ..quant_state import QuantState
from ..scales import BlockScales, NestedScales

# Buffers that hold quantization statistics: never cast by `.to(dtype)`/`.half()`.
_STAT_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")
_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_input(x: object, in_features: int, compute_dtype: torch.dtype | None) -> None:
    """Raises before the kernels see an input that does not fit (they would fail obscurely).
    Its device is checked by the layer's call plan."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _checks.FLOAT_DTYPES:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if compute_dtype is None:
            raise TypeError(f"x has dtype {x.dtype}: without a compute_dtype it must be float32, bfloat16 or float16")
    shape = x.shape
    if not shape or shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}), got {tuple(shape)}")


class AtomicLoad:
    """`load_state_dict` all or nothing: torch loads what fits and only then raises for missing
    or unexpected keys (a submodule is never told `strict`), so a failed load is rolled back."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        backup = {k: v.detach().clone() for k, v in self.state_dict().items()}
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            super().load_state_dict(backup)
            raise


class Linear4bit(AtomicLoad, nn.Module):
    """`y = x @ dequantize(W).T + bias` with W stored in 4 bits (NF4 by default).

    `compute_dtype` is the dtype the product runs in (default: the input's); the output is
    cast back to the input's dtype. The weight is quantized once, at construction or by
    `from_linear`, and stays frozen.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        if compute_dtype is not None and compute_dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be float32, bfloat16, float16 or None, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype
        self.quant_type = _checks.quant_type(quant_type)
        self.blocksize = _checks.blocksize(blocksize)
        self.compress_statistics = bool(compress_statistics)
        self.quant_storage = quant_storage
        # Initialized as nn.Linear would be, then quantized.
        dense = torch.empty((out_features, in_features), device=device)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self._quantize_from(dense)
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> Linear4bit:
        """Quantizes an `nn.Linear`'s weight (keeping its dtype as the state's dtype) and
        copies its bias. `kwargs` are `Linear4bit`'s options (not the feature sizes)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        for reserved in ("in_features", "out_features", "bias", "device"):
            if reserved in kwargs:
                raise TypeError(f"from_linear takes {reserved} from the linear layer, not as an argument")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.compute_dtype = kwargs.pop("compute_dtype", None)
        if layer.compute_dtype is not None and layer.compute_dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be float32, bfloat16, float16 or None, got {layer.compute_dtype!r}")
        layer.quant_type = _checks.quant_type(kwargs.pop("quant_type", "nf4"))
        layer.blocksize = _checks.blocksize(kwargs.pop("blocksize", 64))
        layer.compress_statistics = bool(kwargs.pop("compress_statistics", True))
        layer.quant_storage = kwargs.pop("quant_storage", torch.uint8)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        layer._quantize_from(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        else:
            layer.register_parameter("bias", None)
        return layer

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None,
                       compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """A layer over a weight already in 4 bits (bitsandbytes' packed bytes and its
        `QuantState`, e.g. from a checkpoint), taken as it is: nothing is quantized again.
        The packed tensor's dtype (uint8, or a `quant_storage` view) is kept."""
        if not isinstance(quant_state, QuantState):
            raise TypeError(f"quant_state must be a fastlora.QuantState, got {type(quant_state).__name__}")
        if len(quant_state.shape) != 2:
            raise ValueError(f"quant_state.shape must be (out_features, in_features), got {tuple(quant_state.shape)}")
        out_features, in_features = (int(d) for d in quant_state.shape)
        if not isinstance(packed, torch.Tensor) or packed.dtype == torch.bool or not packed.is_contiguous():
            raise ValueError("packed must be a contiguous tensor of packed 4-bit codes")
        needed = (out_features * in_features + 1) // 2
        if packed.numel() * packed.element_size() != needed:
            raise ValueError(f"packed holds {packed.numel() * packed.element_size()} bytes, a weight of shape "
                             f"{(out_features, in_features)} needs {needed}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if compute_dtype is not None and compute_dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be float32, bfloat16, float16 or None, got {compute_dtype!r}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.compute_dtype = compute_dtype
        layer.quant_storage = packed.dtype
        layer._set_state(packed.reshape(-1, 1), quant_state)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
        else:
            layer.register_parameter("bias", None)
        return layer

    def _quantize_from(self, dense: torch.Tensor) -> None:
        packed, state = quantize_4bit(
            dense, blocksize=self.blocksize, quant_type=self.quant_type,
            compress_statistics=self.compress_statistics, quant_storage=self.quant_storage,
        )
        self._set_state(packed, state)

    def _set_state(self, packed: torch.Tensor, state: QuantState) -> None:
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight_dtype = state.dtype
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.compress_statistics = state.nested
        self._plan = None
        for name in _STAT_BUFFERS:
            self._buffers.pop(name, None)
        # Persistent, though `_save_to_state_dict` writes them under bitsandbytes' keys itself:
        # loaders treat non-persistent buffers as derived values they may recompute
        # (transformers replaces them with uninitialized memory after loading a checkpoint).
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code)
        if state.nested:
            self.register_buffer("nested_absmax", state.state2.absmax)
            self.register_buffer("nested_quant_map", state.state2.code)
            self.register_buffer("nested_offset", torch.as_tensor(state.offset, dtype=torch.float32))
        self.nested_blocksize = state.state2.blocksize if state.nested else NESTED_BLOCKSIZE

    @property
    def quant_state(self) -> QuantState:
        """The weight's bitsandbytes-style `QuantState`, built from the layer's buffers."""
        state2 = None
        if self.compress_statistics:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_quant_map, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
        return QuantState(
            absmax=self.absmax, shape=(self.out_features, self.in_features), code=self.quant_map,
            blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.weight_dtype,
            offset=self.nested_offset if self.compress_statistics else None, state2=state2,
        )

    def _check_storage(self, weight: torch.Tensor) -> None:
        if weight.dtype != self.quant_storage:
            # A float quant_storage's words are not numbers: a cast canonicalizes the NaN bit
            # patterns among them, so the codes cannot be recovered.
            raise ValueError(
                f"Linear4bit.weight holds {weight.dtype} but the layer stores its 4-bit codes as {self.quant_storage}: "
                "something cast the packed weight (peft.prepare_model_for_kbit_training casts float16/bfloat16 "
                "parameters to float32), which corrupts it; use quant_storage=torch.uint8 (the default)")

    def packed_bytes(self) -> torch.Tensor:
        self._check_storage(self.weight)
        return self.weight.view(torch.uint8).reshape(-1)

    def block_scales(self) -> BlockScales:
        """The block scales as the ops take them, from the layer's buffers."""
        if not self.compress_statistics:
            return BlockScales(self.absmax)
        return BlockScales(self.absmax, NestedScales(self.nested_absmax, self.nested_quant_map, self.nested_offset,
                                                     self.nested_blocksize))

    def plan(self) -> WeightPlan:
        """The layer's call plan (`fastlora.plan`), made again when the weight changed."""
        plan, weight = self._plan, self._parameters["weight"]
        if plan is None or not plan.is_current(weight) or plan.scales.absmax is not self._buffers["absmax"]:
            self._check_storage(weight)  # no tensor op: see WeightPlan
            plan = self._plan = WeightPlan(weight, self.block_scales(), self.out_features, self.in_features,
                                           self.blocksize, self.quant_type)
        return plan

    def dequantize(self) -> torch.Tensor:
        """The dense weight in its original dtype (for merging and inspection)."""
        return self.plan().dequantize(self.weight_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense `nn.Linear` holding the dequantized weight and the bias, in `dtype`
        (default: the weight's original dtype)."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                           device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize().to(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = self.compute_dtype
        compiling = torch.compiler.is_compiling()  # traced: the op on the layer's tensors (a plan is eager state)
        if not compiling and (compute_dtype is None or getattr(x, "dtype", None) == compute_dtype):
            y = self.plan().decode(x, self._parameters["bias"])  # a decoding call, in one step
            if y is not None:
                return y
        check_input(x, self.in_features, compute_dtype)
        xc = x if compute_dtype is None or x.dtype == compute_dtype else x.to(compute_dtype)
        bias = self._parameters["bias"]
        if bias is not None and bias.dtype != xc.dtype:
            bias = bias.to(xc.dtype)
        if compiling:
            y = ops.matmul.matmul_4bit(xc, self.packed_bytes(), self.block_scales(), self.out_features,
                                       self.in_features, self.blocksize, self.quant_type, False)
            if bias is not None:
                y = y + bias
        else:
            y = self.plan().matmul(xc, bias)  # the plan checks x's device
        return y if xc is x else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, compress_statistics={self.compress_statistics}"
        )

    def _apply(self, fn, recurse=True):
        # `.to(dtype)`, `.half()` and friends must move the 4-bit data, never cast it.
        before = {name: t.data for name, t in self._quant_tensors().items()}
        self._plan = None
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                restored = old.to(new.device)
                if name == "weight":
                    self.weight = nn.Parameter(restored, requires_grad=False)
                else:
                    self._buffers[name] = restored
        return self

    def __getstate__(self):
        # A plan holds native handles (not copyable); copies and pickles make their own.
        return {**super().__getstate__(), "_plan": None}

    def _quant_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"weight": self.weight}
        tensors.update({name: self._buffers[name] for name in _STAT_BUFFERS if name in self._buffers})
        return tensors

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Loads bitsandbytes-format keys. Everything is checked before anything changes;
        a state that does not fit raises `ValueError` naming the key."""
        weight_key, bias_key = prefix + "weight", prefix + "bias"
        sub = {k[len(weight_key) + 1:]: v for k, v in state_dict.items() if k.startswith(weight_key + ".")}
        known = {k for k in sub if k in _STATE_KEYS or k.startswith("quant_state.")}
        # nn.Module's own strict check (this override replaces it): every other key under the
        # prefix is unexpected. The layer has no children, so all of them are its keys.
        expected = {weight_key, bias_key} | {weight_key + "." + k for k in known}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)
        if self.bias is None and bias_key in state_dict:
            unexpected_keys.append(bias_key)
        elif self.bias is not None and bias_key not in state_dict:
            missing_keys.append(bias_key)
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
            return
        if not any(k.startswith("quant_state.bitsandbytes__") for k in known):
            raise ValueError(
                f"{weight_key}.quant_state.bitsandbytes__{self.quant_type}: missing; not a 4-bit state dict")
        try:
            # Copies: the layer must not alias the caller's state dict tensors.
            copies = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sub.items() if k in known}
            state = QuantState.from_dict(copies, device=self.weight.device)
        except ValueError as exc:
            raise ValueError(f"{weight_key}.{exc}") from None
        if state.quant_type != self.quant_type:
            raise ValueError(f"{weight_key}.quant_state: holds {state.quant_type}, this layer is {self.quant_type}")
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{weight_key}: shape {tuple(state.shape)} does not fit a layer of shape "
                f"({self.out_features}, {self.in_features})"
            )
        packed = state_dict[weight_key]
        if not isinstance(packed, torch.Tensor) or packed.dtype == torch.bool or not packed.is_contiguous():
            raise ValueError(f"{weight_key}: expected a contiguous packed tensor")
        needed = (self.out_features * self.in_features + 1) // 2
        if packed.numel() * packed.element_size() != needed:
            raise ValueError(f"{weight_key}: holds {packed.numel() * packed.element_size()} bytes, needs {needed}")
        bias = state_dict.get(bias_key)
        if self.bias is not None and bias is not None and (
            not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,)
        ):
            raise ValueError(
                f"{bias_key}: expected shape ({self.out_features},), got {tuple(getattr(bias, 'shape', ()))}")
        storage = packed.reshape(-1).view(torch.uint8).reshape(-1, 1).to(self.weight.device)
        if self.quant_storage != torch.uint8 and needed % torch.empty((), dtype=self.quant_storage).element_size() == 0:
            storage = storage.reshape(-1).view(self.quant_storage).unsqueeze(1)
        self._set_state(storage.clone(), state)
        if self.bias is not None and bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)
