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

Under activation checkpointing (torch's non-reentrant `checkpoint`), that Function's saved
tensors are saved ahead of its product, in a graph node of their own (`_SavedAhead`): the
recomputation stops as soon as the last tensor backward needs is saved again, so the region's
last 4-bit product (a decoder layer's `down_proj`, whose output no backward reads) is not
recomputed, where saving at the end of the op would have run it first.
"""

from __future__ import annotations

import threading
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
# The innermost saved-tensor hooks (pack, unpack), or None; private, so where it is missing
# (another torch version) nothing is saved ahead.
_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
# The pack hooks of torch's non-reentrant checkpoint (its forward, its recomputation), by name
# where a torch marks them no other way.
_CHECKPOINT_PACK_HOOKS = ("_checkpoint_hook.__init__.<locals>.pack_hook",
                          "_recomputation_hook.__init__.<locals>.pack_hook")


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
        return _apply(autograd, args)
    casted = _autocast.cast_args(torch.get_autocast_dtype(device_type), args, cast)
    with _autocast.below(device_type):
        return _apply(autograd, casted)


def _checkpointing() -> bool:
    """Whether saved tensors are packed by torch's non-reentrant checkpoint (its forward or
    its recomputation)."""
    if _saved_tensor_hooks is None:
        return False
    hooks = _saved_tensor_hooks(False)
    if hooks is None:
        return False
    pack = hooks[0]
    return bool(getattr(pack, "_checkpoint_internal", False)) or (
        getattr(pack, "__module__", None) == "torch.utils.checkpoint"
        and getattr(pack, "__qualname__", None) in _CHECKPOINT_PACK_HOOKS)


class _Recorder:
    """Stands in for the ctx in an op's `setup_context` run before its product: keeps what it
    saves and the fields it sets, for the Function's ctx to take. So that `setup_context` may
    only save inputs (the output is None here) and set fields: anything else of a ctx is an
    AttributeError under checkpointing."""

    def __init__(self) -> None:
        object.__setattr__(self, "fields", {})
        object.__setattr__(self, "tensors", ())

    def save_for_backward(self, *tensors) -> None:
        object.__setattr__(self, "tensors", tensors)

    def __setattr__(self, name: str, value) -> None:
        self.fields[name] = value


class _SavedAhead(torch.autograd.Function):
    """Saves an op's tensors in a node of its own, before the op computes; its output (an
    empty token) joins nothing, and the op's backward reads the node's `saved_tensors`.
    `anchor`, an input of the op that requires grad, makes it a graph node whatever is saved
    (the 4-bit product saves only frozen tensors)."""

    @staticmethod
    def forward(ctx, anchor, *tensors):
        ctx.save_for_backward(*tensors)
        return torch.empty(0)

    @staticmethod
    def backward(ctx, grad):  # never runs: the token joins nothing
        return (None,) * len(ctx.needs_input_grad)


# The saved-ahead node and recorded fields for the Function being applied on this thread.
_pending = threading.local()


def _apply(autograd: type[torch.autograd.Function], args: tuple):
    """`autograd.apply(*args)`, its saved tensors saved ahead under checkpointing."""
    anchor = next((a for a in args if isinstance(a, torch.Tensor) and a.requires_grad), None)
    if anchor is None or not torch.is_grad_enabled() or not _checkpointing():
        return autograd.apply(*args)  # (without a gradient to compute nothing is saved)
    recorder = _Recorder()
    autograd.op_setup_context(recorder, args, None)
    # The token, not its node: a tensor owns its grad_fn in every torch, a node's ctx not.
    token = _SavedAhead.apply(anchor, *recorder.tensors)
    _pending.ahead = (token, recorder.fields)
    try:
        return autograd.apply(*args)
    finally:
        _pending.ahead = None


class _SavedAheadContext:
    """The ctx that an op's `backward` reads where its tensors were saved ahead."""

    def __init__(self, ctx) -> None:
        self._ctx = ctx

    @property
    def saved_tensors(self) -> tuple:
        # The op's own (empty) saved tensors first: after a backward without retain_graph
        # they are freed, and reading them raises torch's error for a second backward, which
        # the saved-ahead node, whose backward never runs, would not.
        _ = self._ctx.saved_tensors
        return self._ctx.saved_ahead.grad_fn.saved_tensors

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


def autograd_function(name: str, implementation: Callable, setup_context: Callable,
                      backward: Callable) -> type[torch.autograd.Function]:
    """The `torch.autograd.Function` that `call` runs in an op's place: `implementation`, then
    `setup_context(ctx, args, output)`, and `backward(ctx, grad)`, the op's registered parts,
    on all of the op's arguments (so torch.library's default-filling is not needed). Under
    checkpointing (`_apply`) `setup_context` has run before, on a `_Recorder`: the ctx takes
    its fields and reads the saved tensors from the saved-ahead node."""

    def forward(ctx, *args):
        ahead = getattr(_pending, "ahead", None)
        _pending.ahead = None  # only this Function's own forward takes it, not one nested in it
        y = implementation(*args)
        if ahead is None:
            ctx.saved_ahead = None
            setup_context(ctx, args, y)
        else:
            ctx.saved_ahead, fields = ahead
            for field, value in fields.items():
                setattr(ctx, field, value)
        return y

    def run_backward(ctx, grad):
        return backward(ctx if ctx.saved_ahead is None else _SavedAheadContext(ctx), grad)

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"The op's autograd where `{__name__}.call` skips the dispatcher.",
        "forward": staticmethod(forward),
        "backward": staticmethod(run_backward),
        "op_setup_context": staticmethod(setup_context),  # not `setup_context`: torch would call it itself
    })
