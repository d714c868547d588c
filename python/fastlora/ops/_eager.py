"""How an op is called: through the torch dispatcher, or straight into its backend.

Going through `torch.ops.fastlora.*` costs 25-50 us of host time per call (argument boxing,
the autograd wrapper, the redispatch), as much as a whole small CPU product and a large part
of a GPU call's launch time; with autograd and autocast (a training step) 150-250 us
(torch.library's autograd wrapper and the Python autocast kernel). When nothing traces
(compile, export, `torch.jit.trace`), no tensor subclass, Python mode or functorch transform
intercepts ops and the tensors are real CPU/CUDA tensors, the dispatcher would only forward
the call, or record the op's own autograd and apply its own autocast casts: `call` then runs
the backend's implementation itself where no graph is recorded and autocast is off, and
otherwise the op's `torch.autograd.Function` (the same forward, `setup_context` and
`backward`) on the arguments autocast would cast. Every op and call plan goes through `call`,
`direct` or `direct_on_cpu`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import _autocast

_PLAIN_TYPES = (torch.Tensor, nn.Parameter)
# Private checks for Python dispatch/function modes and functorch transforms (vmap, grad).
# Where one is missing (another torch version) every call goes through the dispatcher.
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_function_modes = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_functorch = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_CHECKABLE = None not in (_dispatch_modes, _function_modes, _functorch, _any_autocast)
# What `torch.jit.is_tracing()` returns outside TorchScript, without its Python wrapper.
_is_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)


def direct(*tensors: torch.Tensor | None) -> bool:
    """Whether a call with these tensor arguments may skip the dispatcher."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace the mode checks below
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or not (t.is_cpu or t.is_cuda) or (grad and t.requires_grad)):
            return False
    return _unobserved()


def direct_on_cpu(x: torch.Tensor, bias: torch.Tensor | None, lora: tuple | None = None) -> bool:
    """`direct(x, bias)` (with `lora` = (A, B, scaling), `direct(x, bias, A, B)`) for a plain
    CPU tensor x, asked by a caller that has checked that nothing compiles (a layer's decoding
    call: the fewest checks that decide it). The other tensors' devices are the caller's to check."""
    if type(x) is not torch.Tensor or not x.is_cpu:
        return False
    grad = torch.is_grad_enabled()
    if grad and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if bias is not None and type(bias) not in _PLAIN_TYPES:
        return False
    if lora is not None:
        a, b = lora[0], lora[1]
        if type(a) not in _PLAIN_TYPES or type(b) not in _PLAIN_TYPES:
            return False
        if grad and (a.requires_grad or b.requires_grad):
            return False
    return _unobserved()


def _unobserved(autocast_ok: bool = False) -> bool:
    """No Python mode, functorch transform, trace (or, unless `autocast_ok`, autocast) would see the call."""
    if not _CHECKABLE or _dispatch_modes() or _function_modes() or _functorch() is not None:
        return False
    if not autocast_ok and _any_autocast():
        return False
    return not _is_tracing()


def _autograd_direct(tensors: list[torch.Tensor | None]) -> bool:
    """Whether the op's own autograd Function may stand in for the dispatcher: `direct` but
    for gradients and autocast."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TYPES or not (t.is_cpu or t.is_cuda)):
            return False
    return _unobserved(autocast_ok=True)


def call(op: Callable, implementation: Callable, *args, autograd: type[torch.autograd.Function] | None = None,
         cast: frozenset[int] = frozenset()):
    """`implementation(*args)` where the dispatcher would only forward the call; where it would
    record the op's autograd or cast for autocast, `autograd.apply` on the arguments at
    positions `cast` cast to the autocast dtype (as `_autocast.register` casts them); else
    `op(*args)`."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if direct(*tensors):
        return implementation(*args)
    if autograd is None or not _autograd_direct(tensors):
        return op(*args)
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return autograd.apply(*args)
    casted = _autocast.cast_args(torch.get_autocast_dtype(device_type), args, cast)
    with _autocast.below(device_type):
        return autograd.apply(*casted)


def autograd_function(name: str, implementation: Callable, setup_context: Callable,
                      backward: Callable) -> type[torch.autograd.Function]:
    """The `torch.autograd.Function` that `call` runs in an op's place: `implementation`, then
    `setup_context(ctx, args, output)`, and `backward(ctx, grad)`, the op's registered parts,
    on all of the op's arguments (so torch.library's default-filling is not needed)."""

    def forward(ctx, *args):
        y = implementation(*args)
        setup_context(ctx, args, y)
        return y

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"The op's autograd where `{__name__}.call` skips the dispatcher.",
        "forward": staticmethod(forward),
        "backward": staticmethod(lambda ctx, grad: backward(ctx, grad)),
    })
