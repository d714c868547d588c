"""The thread count of the Rust CPU kernels: torch's own (`torch.get_num_threads()`) unless
the user sets one with `fastlora.set_num_threads`."""

from __future__ import annotations

import torch

from . import _native

_user_threads: int | None = None


def set_num_threads(n: int | None) -> None:
    """Use `n` threads in fastlora's CPU kernels; `None` follows torch's thread count."""
    global _user_threads
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    _user_threads = n


def get_num_threads() -> int:
    return _user_threads if _user_threads is not None else torch.get_num_threads()


_synced: int | None = None


def sync() -> None:
    """Sizes the kernels' pool before a call (a comparison when unchanged)."""
    global _synced
    n = get_num_threads()
    if n != _synced:
        _native.set_num_threads(n)
        _synced = n
