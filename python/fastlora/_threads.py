"""The threads of the Rust CPU kernels: how many (torch's count, `torch.get_num_threads()`,
unless the user sets one with `fastlora.set_num_threads`) and which (`thread_pool()`).

Where torch runs its parallel loops on OpenMP (the PyPI wheels), the kernels run on that same
OpenMP team, found here among the libraries torch loaded; a kernel right after a torch op then
finds the team awake instead of fighting it for the cores. Elsewhere they run on a rayon pool
of their own. `FASTLORA_THREAD_POOL=rayon` forces the pool; `openmp` insists on torch's team
(an error at import where there is none); `auto`, the default, takes the team when it can.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import _native

POOL_SETTINGS = ("auto", "openmp", "rayon")
_OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")

_user_threads: int | None = None


def set_num_threads(n: int | None) -> None:
    """Use `n` threads in fastlora's CPU kernels; `None` follows torch's thread count."""
    global _user_threads
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    _user_threads = n


def get_num_threads() -> int:
    return _user_threads if _user_threads is not None else torch.get_num_threads()


def thread_pool() -> str:
    """"openmp" when the kernels run on torch's OpenMP team, "rayon" on their own pool."""
    return _native.thread_pool()


_synced: int | None = None


def sync() -> None:
    """Sizes the kernels' loops before a call (a comparison when unchanged)."""
    global _synced
    n = get_num_threads()
    if n != _synced:
        _native.set_num_threads(n)
        _synced = n


def torch_openmp_runtime() -> str | None:
    """The path of the OpenMP runtime torch runs its loops on, when it runs them on OpenMP and
    this process's loaded libraries name exactly one candidate (torch's own copy first)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.split(maxsplit=5)[5].strip() for line in maps if line.count(" ") >= 5 and "/" in line}
    except OSError:  # not Linux
        return None
    candidates = sorted(p for p in loaded if Path(p).name.startswith(_OPENMP_RUNTIMES))
    torch_dir = str(Path(torch.__file__).resolve().parent)
    own = [p for p in candidates if p.startswith(torch_dir)]
    if len(own) == 1:
        return own[0]
    return candidates[0] if len(candidates) == 1 else None


def _choose_pool() -> None:
    setting = os.environ.get("FASTLORA_THREAD_POOL", "auto").strip().lower() or "auto"
    if setting not in POOL_SETTINGS:
        raise ValueError(f"FASTLORA_THREAD_POOL must be one of {', '.join(POOL_SETTINGS)}, got {setting!r}")
    if setting == "rayon":
        return
    runtime = torch_openmp_runtime()
    if runtime is not None:
        try:
            _native.use_openmp(runtime)
            return
        except ValueError as exc:
            if setting == "openmp":
                raise ValueError(f"FASTLORA_THREAD_POOL=openmp: {exc}") from None
    elif setting == "openmp":
        raise ValueError("FASTLORA_THREAD_POOL=openmp: torch here does not run its loops on an OpenMP runtime "
                         "fastlora can find")


_choose_pool()
