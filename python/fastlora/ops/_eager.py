"""How an op is called: through the torch dispatcher, or straight into its backend.

Going through `torch.ops.fastlora.*` costs 25-50 us of host time per call (argument boxing,
the autograd wrapper, the redispatch), as much as a whole small CPU product and a large part
of a GPU call's launch time. When no autograd graph is recorded, nothing traces (compile,
export, `torch.jit.trace`), no tensor subclass or Python mode intercepts ops and the tensors
are real CPU/CUDA tensors, and autocast is off, the dispatcher would only forward the call: `call` then runs the
backend's implementation itself. Every op and call plan goes through `call`, `direct` or
`direct_on_cpu`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_PLAIN_TYPES = (torch.Tensor, nn.Parameter)
# Private checks for Python dispatch/function modes and functorch transforms (vmap, grad).
# Where one is missing (another torch version) every call goes through the dispatcher.
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_function_modes = getattr(torch._C, "_is_torch_function_mode_enabled", None)
_functorch = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_CHECKABLE = None not in (_dispatch_modes, _function_modes, _functorch, _autocast)
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


def direct_on_cpu(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """`direct(x, bias)` for a plain CPU tensor x, asked by a caller that has checked that
    nothing compiles (a layer's decoding call: the fewest checks that decide it). The bias's
    device is the caller's to check."""
    if type(x) is not torch.Tensor or not x.is_cpu:
        return False
    grad = torch.is_grad_enabled()
    if grad and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if bias is not None and type(bias) not in _PLAIN_TYPES:
        return False
    return _unobserved()


def _unobserved() -> bool:
    """No Python mode, functorch transform, autocast or trace would see the call."""
    if not _CHECKABLE or _dispatch_modes() or _function_modes() or _functorch() is not None or _autocast():
        return False
    return not _is_tracing()


def call(op: Callable, implementation: Callable, *args):
    """`implementation(*args)` where the dispatcher would only forward the call, else `op(*args)`."""
    if direct(*(a for a in args if isinstance(a, torch.Tensor))):
        return implementation(*args)
    return op(*args)
