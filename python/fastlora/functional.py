"""The functional API: bitsandbytes-compatible 4-bit quantization and matmul.

`quantize_4bit`, `dequantize_4bit` and `matmul_4bit` take and return what their
`bitsandbytes.functional` namesakes do, so packed weights and `QuantState`s move between
the two libraries unchanged. Arguments are checked here; the work is done by the
`torch.ops.fastlora` custom ops (Rust on CPU, Triton/reference on CUDA).
"""

from __future__ import annotations

import math
import weakref

import torch

from . import _checks, ops
from .formats import NESTED_BLOCKSIZE, code_tensor, dynamic_map
from .plan import WeightPlan
from .quant_state import QuantState
from .scales import BlockScales


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantizes `A` blockwise to 4 bits; returns the packed bytes and their `QuantState`.

    The packed tensor has shape `((A.numel() + 1) // 2, 1)` and dtype `quant_storage` (a
    view of the same bytes). With `compress_statistics` the per-block scales are themselves
    quantized to 8 bits ("double quantization"). `A` must be finite: NaN or Inf raise.
    """
    A = _checks.float_tensor("A", A)
    if A.numel() == 0:
        raise ValueError("A must have at least one element")
    blocksize = _checks.blocksize(blocksize)
    quant_type = _checks.quant_type(quant_type)
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage must be a torch.dtype, got {quant_storage!r}")
    packed_bytes = (A.numel() + 1) // 2
    storage_size = torch.empty((), dtype=quant_storage).element_size()
    if packed_bytes % storage_size:
        raise ValueError(
            f"quant_storage={quant_storage} needs the packed size ({packed_bytes} bytes) to be a multiple of "
            f"{storage_size}"
        )
    _checks.finite("A", A)

    packed, absmax = torch.ops.fastlora.quantize_4bit(A.contiguous(), blocksize, quant_type)
    code = code_tensor(quant_type, A.device)
    if compress_statistics:
        offset = absmax.mean()
        nested_code = dynamic_map(A.device)
        quantized, nested_absmax = torch.ops.fastlora.quantize_blockwise(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        state2 = QuantState(
            absmax=nested_absmax, code=nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
        state = QuantState(
            absmax=quantized, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type,
            dtype=A.dtype, offset=offset, state2=state2,
        )
    else:
        state = QuantState(
            absmax=absmax, shape=A.shape, code=code, blocksize=blocksize, quant_type=quant_type, dtype=A.dtype
        )
    if quant_storage != torch.uint8:
        packed = packed.view(-1).view(quant_storage).unsqueeze(1)
    return packed, state


def _packed_bytes(packed: object, state: QuantState) -> torch.Tensor:
    """The packed tensor as a flat uint8 view, checked against the state it belongs to."""
    packed = _checks.tensor("packed", packed)
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    if packed.dtype == torch.bool or packed.dtype.is_complex:
        raise TypeError(f"packed has dtype {packed.dtype}; expected uint8 or a quant_storage view of it")
    flat = packed.reshape(-1).view(torch.uint8)
    numel = math.prod(state.shape)
    if flat.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed holds {flat.numel()} bytes but quant_state.shape {tuple(state.shape)} needs {(numel + 1) // 2}"
        )
    return flat


def _check_state(quant_state: object) -> QuantState:
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a fastlora.QuantState, got {type(quant_state).__name__}")
    _checks.blocksize(quant_state.blocksize)
    _checks.quant_type(quant_state.quant_type)
    _checks.tensor("quant_state.absmax", quant_state.absmax)
    if quant_state.nested:
        _checks.tensor("quant_state.state2.absmax", quant_state.state2.absmax)
        _checks.tensor("quant_state.state2.code", quant_state.state2.code)
        if quant_state.offset is None:
            raise ValueError("quant_state.offset is missing for a nested state")
    return quant_state


def _scales(quant_state: QuantState) -> BlockScales:
    """The checked block scales of a checked state."""
    blocks = -(-math.prod(quant_state.shape) // quant_state.blocksize)
    return quant_state.block_scales().check(blocks, name="quant_state.absmax")


def dequantize_4bit(packed: torch.Tensor, quant_state: QuantState, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense tensor: original shape and dtype, `code[nibble] * absmax[block]`.

    With `out` (a contiguous float tensor of the weight's shape, any of the three float
    dtypes, on the weight's device), the values are written there and `out` is returned: a
    caller that dequantizes the same weight repeatedly reuses one buffer instead of paying for
    a fresh allocation's page faults every time (bitsandbytes' `out=`)."""
    state = _check_state(quant_state)
    flat = _packed_bytes(packed, state)
    _checks.same_device(packed=flat, absmax=state.absmax)
    absmax, *nested = _scales(state).op_args()
    if out is None:
        return torch.ops.fastlora.dequantize_4bit(
            flat, absmax, state.blocksize, state.quant_type, list(state.shape), state.dtype, *nested
        )
    _checks.float_tensor("out", out)
    if tuple(out.shape) != tuple(state.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}; the weight has shape {tuple(state.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    _checks.same_device(packed=flat, out=out)
    torch.ops.fastlora.dequantize_4bit_out(flat, absmax, state.blocksize, state.quant_type, *nested, out=out)
    return out


def matmul_4bit(
    x: torch.Tensor, packed: torch.Tensor, quant_state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ dequantize_4bit(packed, quant_state).T + bias` in x's dtype, without building the
    dense weight. The weight has shape `(out_features, in_features)`; x is `(..., in_features)`.
    Differentiable in `x` and `bias`.

    The weight's checks and preparation are kept for the next call with the same `packed` and
    `quant_state` (a call plan, `fastlora.plan`), so repeated calls check only `x` and `bias`."""
    if torch.compiler.is_compiling():  # traced: the op on the state's tensors (a plan is eager state)
        return _traced_matmul(x, packed, quant_state, bias)
    plan = _plans.get(quant_state) if isinstance(quant_state, QuantState) else None
    if plan is None or not plan.is_current(packed) or not _made_from(plan, quant_state):
        plan = _matmul_plan(packed, quant_state)
    y = plan.decode(x, bias)  # a decoding call, in one step; None where it is not one
    if y is not None:
        return y
    n, k = plan.n, plan.k
    if not isinstance(x, torch.Tensor) or x.dtype not in _checks.FLOAT_DTYPES:
        _checks.float_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) for a weight of shape ({n}, {k}), got {tuple(x.shape)}")
    if x.device != plan.device:
        raise ValueError(f"tensors must be on one device: x on {x.device}, packed on {plan.device}")
    if bias is not None:
        bias = _checks.float_tensor("bias", bias)
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        _checks.same_device(x=x, bias=bias)
    y = plan.matmul(x)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def _traced_matmul(x: torch.Tensor, packed: torch.Tensor, quant_state: QuantState,
                   bias: torch.Tensor | None) -> torch.Tensor:
    state = _check_state(quant_state)
    n, k = state.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have shape (..., {k}) for a weight of shape ({n}, {k}), got {tuple(x.shape)}")
    absmax, *nested = _scales(state).op_args()
    y = torch.ops.fastlora.matmul_4bit(x, _packed_bytes(packed, state), absmax, n, k, state.blocksize,
                                       state.quant_type, False, *nested)
    return y if bias is None else y + bias.to(y.dtype)


# The call plan of each live QuantState's last weight (dropped with the state).
_plans: weakref.WeakKeyDictionary[QuantState, WeightPlan] = weakref.WeakKeyDictionary()


def _made_from(plan: WeightPlan, state: QuantState) -> bool:
    """Whether `plan` still describes `state` (its fields may have been reassigned)."""
    scales = plan.scales
    if state.absmax is not scales.absmax or (state.blocksize, state.quant_type) != (plan.blocksize, plan.quant_type):
        return False
    if tuple(state.shape) != (plan.n, plan.k):
        return False
    nested = scales.nested
    if nested is None:
        return state.state2 is None
    state2 = state.state2
    return (state2 is not None and state2.absmax is nested.absmax and state2.code is nested.code
            and state.offset is nested.offset)


def _matmul_plan(packed: object, quant_state: object) -> WeightPlan:
    state = _check_state(quant_state)
    if len(state.shape) != 2:
        raise ValueError(f"quant_state.shape must be 2-D (out_features, in_features), got {tuple(state.shape)}")
    n, k = state.shape
    flat = _packed_bytes(packed, state)
    _checks.same_device(packed=flat, absmax=state.absmax)
    plan = WeightPlan(packed, _scales(state), n, k, state.blocksize, state.quant_type)
    _plans[state] = plan
    return plan


def lora_batched(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
                 scaling: torch.Tensor | float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA term of a batch whose rows use different adapters (many adapters over one
    base): `y[t] = scaling[i] * (x[t] @ A[i].T) @ B[i].T` with `i = indices[t]`, and 0 for the
    rows whose index is -1 (the base alone).

    x is `(T, K)`; the `n` adapters come stacked, `A` `(n, r, K)` and `B` `(n, O, r)` in x's
    dtype, ranks padded to `r` with zero rows of `A`; `indices` `(T,)` integers in `[-1, n)`;
    `scaling` one value per adapter `(n,)` (or one for all). With `out` `(T, O)`, the term is
    added into it (the base layer's output) and `out` is returned. Inference only."""
    x = _checks.float_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (T, K), got {tuple(x.shape)}")
    A, B = _checks.tensor("A", A), _checks.tensor("B", B)
    if A.dim() != 3 or A.shape[2] != x.shape[1]:
        raise ValueError(f"A must have shape (n, r, {x.shape[1]}), got {tuple(A.shape)}")
    n, r, k = A.shape
    if B.dim() != 3 or B.shape[0] != n or B.shape[2] != r:
        raise ValueError(f"B must have shape ({n}, O, {r}), got {tuple(B.shape)}")
    o = B.shape[1]
    if min(r, k, o) == 0:
        raise ValueError(f"A and B need a rank, an input and an output size above 0, got r={r}, K={k}, O={o}")
    for name, t in (("A", A), ("B", B)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; it must have x's dtype {x.dtype}")
    indices = _checks.tensor("indices", indices)
    if indices.dtype not in (torch.int32, torch.int64) or indices.shape != (x.shape[0],):
        raise ValueError(f"indices must be {x.shape[0]} int32 or int64 values (one per row of x), got "
                         f"{indices.dtype} of shape {tuple(indices.shape)}")
    if not isinstance(scaling, torch.Tensor):
        scaling = torch.full((n,), float(scaling), device=x.device)
    if not scaling.dtype.is_floating_point or scaling.shape != (n,):
        raise ValueError(f"scaling must be {n} float values (one per adapter), got {scaling.dtype} of shape "
                         f"{tuple(scaling.shape)}")
    _checks.same_device(x=x, A=A, B=B, indices=indices, scaling=scaling, out=out)
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= n):
        raise ValueError(f"indices must lie in [-1, {n}), got values from {int(indices.min())} to {int(indices.max())}")
    if out is not None:
        _checks.float_tensor("out", out)
        if out.shape != (x.shape[0], o) or out.dtype != x.dtype:
            raise ValueError(f"out must be a {x.dtype} tensor of shape ({x.shape[0]}, {o}), got {out.dtype} of "
                             f"shape {tuple(out.shape)}")
    if n == 0:  # every row is -1
        y = x.new_zeros((x.shape[0], o))
    else:
        y = ops.lora_batched.lora_batched(x, A, B, indices.long(), scaling.float())
    return y if out is None else out.add_(y)
