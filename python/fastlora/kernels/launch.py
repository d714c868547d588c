"""Direct launches: a Triton kernel's compiled binary called through Triton's compiled-kernel
launcher, without the JIT's per-call work.

`kernel[grid](*args, **constants)` binds every argument, computes its specialization (dtypes,
16-byte alignment of pointers, integers equal to 1 or divisible by 16), hashes it with the
constants and looks the binary up: about 30 us of host time per launch on an H200's host
(`benches/GPU_NOTES.md`), more than a one-row GEMV runs on the GPU. A `DirectLaunch` serves
one launch site and configuration (a kernel and its constants): it keeps the binary of each
argument key it has seen (every tensor's dtype and 16-byte alignment, every integer in full,
the type of anything else: all a specialization can depend on) and launches a call with a
known key through `CompiledKernel.run` with the grid and the current stream only.

The first direct launch of each binary is checked against the ordinary launch of the same
call, whose outputs it must reproduce. An error, a difference, a Triton whose compiled
kernels lack this launcher, or the interpreter leave the site on ordinary launches for good;
a launch hook (profilers read launch metadata) or a CUDA graph capture in progress takes the
ordinary launch for that call. A wrong result is never the fallback.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

_COMPILED_ATTRIBUTES = ("run", "function", "packed_metadata")


def _hooks_installed() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None:  # a Triton without `knobs`: its hooks live elsewhere, take no chances
        return True
    # A hook is a callable or None (Triton 3.4-3.6), or a chain of them (3.9).
    return any(hook is not None and getattr(hook, "calls", True)
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def _current_stream() -> int:
    driver = triton.runtime.driver.active
    return driver.get_current_stream(driver.get_current_device())


def _argument_key(args: Sequence) -> tuple:
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a if isinstance(a, int)
                 else type(a) for a in args)


class DirectLaunch:
    """Launches `kernel` with `constants` (compile-time constants and launch options such
    as `num_warps`), directly where its binary for the call is known and checked; `outputs`
    are the positions of the arguments the kernel writes (what the first-use check compares)."""

    def __init__(self, kernel, constants: dict, outputs: Sequence[int], *, enabled: bool | None = None,
                 stream: Callable[[], int] = _current_stream) -> None:
        self.kernel, self.constants, self.outputs = kernel, constants, tuple(outputs)
        self.enabled = not isinstance(kernel, InterpretedFunction) if enabled is None else enabled
        self.stream = stream
        self._binaries: dict[tuple, object] = {}
        # Every parameter's value after the positional ones: a constant, or its default.
        self._trailing = {p.name: p.default for p in getattr(kernel, "params", ()) if p.has_default}
        self._trailing.update({name: value for name, value in constants.items() if name in kernel.arg_names})

    def __call__(self, grid: tuple[int, int, int], *args) -> None:
        if not self.enabled or _hooks_installed():
            self.kernel[grid](*args, **self.constants)
            return
        key = _argument_key(args)
        compiled = self._binaries.get(key)
        if compiled is not None:
            self._run(compiled, grid, args)
            return
        compiled = self.kernel[grid](*args, **self.constants)
        if args[self.outputs[0]].is_cuda and torch.cuda.is_current_stream_capturing():
            return  # the check synchronizes: it waits for a call outside the capture
        if self._reproduces(compiled, grid, args):
            self._binaries[key] = compiled
        else:
            self.enabled = False
            warnings.warn(f"fastlora: direct launches of {getattr(self.kernel, '__name__', self.kernel)} did not "
                          "reproduce the ordinary launch; this launch site uses ordinary launches", stacklevel=2)

    def _run(self, compiled, grid: tuple[int, int, int], args: Sequence) -> None:
        names = self.kernel.arg_names
        values = [*args, *(self._trailing[name] for name in names[len(args):])]
        compiled.run(grid[0], grid[1], grid[2], self.stream(), compiled.function, compiled.packed_metadata,
                     None, None, None, *values)

    def _reproduces(self, compiled, grid: tuple[int, int, int], args: Sequence) -> bool:
        """Whether a direct launch of `compiled` on copies of the outputs writes what the
        ordinary launch wrote (within float tolerance: split programs add in any order)."""
        if compiled is None or not all(hasattr(compiled, name) for name in _COMPILED_ATTRIBUTES):
            return False
        trial = list(args)
        for i in self.outputs:
            trial[i] = torch.full_like(args[i], float("nan"))
        try:
            self._run(compiled, grid, trial)
        except Exception:  # another Triton's launcher: the ordinary launch stays
            return False
        for i in self.outputs:
            got, want = trial[i].float(), args[i].float()
            scale = torch.nan_to_num(want, nan=0.0, posinf=0.0, neginf=0.0).abs().max().item() if want.numel() else 0
            if not torch.allclose(got, want, rtol=1e-2, atol=1e-2 * scale, equal_nan=True):
                return False
        return True


_sites: dict[tuple, DirectLaunch] = {}


def launch(kernel, grid: tuple[int, int, int], args: Sequence, constants: dict, outputs: Sequence[int]) -> None:
    """`kernel[grid](*args, **constants)` through the `DirectLaunch` of this kernel and these
    constants (made on first use)."""
    key = (kernel, *constants.items())
    site = _sites.get(key)
    if site is None:
        site = _sites[key] = DirectLaunch(kernel, constants, outputs)
    site(grid, *args)
