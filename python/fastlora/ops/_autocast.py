"""Autocast for fastlora's ops. Under `torch.autocast` an op's activations (and the LoRA
op's adapter and bias) are cast to the autocast dtype, as autocast casts `F.linear`'s input,
weight and bias; the packed weight, its block scales and code tables keep their dtypes (the
kernels read them as stored), which `torch.library.register_autocast` would not do: it
casts every floating-point tensor argument.
"""

from __future__ import annotations

import torch

_LIB = torch.library.Library("fastlora", "FRAGMENT")


def register(name: str, cast: frozenset[int]) -> None:
    """Casts the arguments at positions `cast` of `fastlora::name` under CPU and CUDA autocast."""
    op = getattr(torch.ops.fastlora, name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        kernel = _autocast_kernel(op, device_type, getattr(torch._C.DispatchKey, key), cast)
        op.py_impl(getattr(torch._C.DispatchKey, key))(kernel)  # what tracing (the Python dispatcher) calls
        _LIB.impl(name, lambda _keyset, *args, _kernel=kernel: _kernel(*args), key, with_keyset=True)


def cast_args(dtype: torch.dtype, args: tuple, cast: frozenset[int]) -> tuple:
    """`args` with the floating-point tensors at positions `cast` cast to `dtype`."""
    cast_args, done = [], {}
    for i, a in enumerate(args):
        if i in cast and isinstance(a, torch.Tensor) and a.is_floating_point():
            # One cast per tensor: the LoRA op's x_drop is x without dropout, and must stay so.
            if id(a) not in done:
                done[id(a)] = a.to(dtype)
            a = done[id(a)]
        cast_args.append(a)
    return tuple(cast_args)


_AUTOCAST_KEYS: dict[str, torch._C.DispatchKeySet] = {}


def below(device_type: str):
    """A guard under which `device_type`'s autocast is skipped, as inside an autocast kernel."""
    keys = _AUTOCAST_KEYS.get(device_type)
    if keys is None:
        key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
        keys = _AUTOCAST_KEYS[device_type] = torch._C.DispatchKeySet(key)
    return torch._C._ExcludeDispatchKeyGuard(keys)


def _autocast_kernel(op, device_type: str, dispatch_key, cast: frozenset[int]):
    below_autocast = torch._C.DispatchKeySet(dispatch_key)

    def kernel(*args):
        casted = cast_args(torch.get_autocast_dtype(device_type), args, cast)
        with torch._C._ExcludeDispatchKeyGuard(below_autocast):
            return op(*casted)

    return kernel
