"""Launch configurations measured on GPUs: one table per GPU family
(`kernels/configs/<family>.json`, e.g. `sm_90.json`), written by the sweep of
`benches/gpu_bench.py` and committed; the launchers look a shape up here before falling back
to their heuristics (a shape the table lacks, a family without a table). No autotuning runs
on a call: the sweep did it once, on the GPU, for the shapes of real models.

A table maps a kernel name ("gemv", "dequantize") and a shape key (`shape_key`) to the
chosen launch parameters, which must be one of the configurations the kernel module lists
(and the offline compile check covers); anything else in a table is ignored. Under Triton's
interpreter the family is "interpreter", so the CPU dry run of the sweep can write a table
that the tests then read.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
INTERPRETER = "interpreter"


@functools.cache
def _cuda_family(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def family(device: torch.device) -> str:
    """The table a launch on `device` reads: "sm_<major><minor>", or "interpreter" for CPU tensors."""
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_family(device.index if device.index is not None else torch.cuda.current_device())


def shape_key(*sizes: int) -> str:
    return "x".join(str(s) for s in sizes)


@functools.cache
def _table(directory: Path, family: str) -> dict:
    """The table's kernels; empty (the heuristics) for a family without one, and, with a
    warning, for a file that is not a table: a launch never fails on it."""
    path = directory / f"{family}.json"
    try:
        kernels = json.loads(path.read_text()).get("kernels", {})
        if not isinstance(kernels, dict) or not all(isinstance(v, dict) for v in kernels.values()):
            raise ValueError("'kernels' must map kernel names to objects")
        return kernels
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        warnings.warn(f"fastlora: ignoring the launch table {path} ({exc}); the launchers use their heuristics",
                      stacklevel=3)
        return {}


def lookup(kernel: str, device: torch.device, *sizes: int) -> dict | None:
    """The measured launch parameters of `kernel` for this shape on `device`'s family, or None."""
    entry = _table(CONFIG_DIR, family(device)).get(kernel, {}).get(shape_key(*sizes))
    return entry if isinstance(entry, dict) else None


def write_table(path: Path, kernels: dict[str, dict[str, dict]], about: dict) -> None:
    """Writes a table atomically (a temporary file, then a rename): `kernels` as `lookup`
    reads it, `about` (device, versions, date) beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"about": about, "kernels": kernels}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _table.cache_clear()
