"""`fastlora bench`: fastlora, bitsandbytes and dense torch side by side, in one process.

Each case times every implementation round-robin (so machine noise hits them alike) and
reports medians and the ratios to the other implementations. Memory is the growth of the
process's peak resident set during one call (Linux `VmHWM`, reset before each call), which
counts Rust, torch and bitsandbytes allocations alike.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from . import functional


@dataclass
class Case:
    name: str
    times_ms: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up: first-call allocation and dispatch costs are not the steady state
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def _peak_growth_mib(fn: Callable[[], object]) -> float | None:
    """Peak RSS growth of one call, or None where /proc cannot reset the peak."""
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmHWM")
        fn()
        return (_rss_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _bnb():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def bench_dequantize(n: int, k: int, repeats: int) -> Case:
    w = torch.randn(n, k)
    packed, state = functional.quantize_4bit(w, quant_type="nf4")
    fns: dict[str, Callable[[], object]] = {
        "fastlora": lambda: functional.dequantize_4bit(packed, state),
    }
    bnb = _bnb()
    if bnb is not None:
        bnb_packed, bnb_state = bnb.quantize_4bit(w, quant_type="nf4")
        fns["bitsandbytes"] = lambda: bnb.dequantize_4bit(bnb_packed, bnb_state)
    fns["dense copy"] = lambda: w.clone()
    return Case(f"dequantize nf4 {n}x{k} -> fp32", _median_ms(fns, repeats))


def bench_matmul(m: int, n: int, k: int, repeats: int) -> Case:
    w = torch.randn(n, k) * 0.02
    x = torch.randn(m, k)
    packed, state = functional.quantize_4bit(w, quant_type="nf4")
    fns: dict[str, Callable[[], object]] = {
        "fastlora": lambda: functional.matmul_4bit(x, packed, state),
    }
    bnb = _bnb()
    if bnb is not None:
        import bitsandbytes

        bnb_packed, bnb_state = bnb.quantize_4bit(w, quant_type="nf4")
        fns["bitsandbytes"] = lambda: bitsandbytes.matmul_4bit(x, bnb_packed.t(), bnb_state)
    fns["dense"] = lambda: torch.nn.functional.linear(x, w)
    case = Case(f"matmul_4bit fp32 M={m} {n}x{k}", _median_ms(fns, repeats))
    for name in ("fastlora", "bitsandbytes"):
        if name in fns:
            peak = _peak_growth_mib(fns[name])
            if peak is not None:
                case.peak_mib[name] = peak
    case.peak_mib["dense fp32 weight"] = w.numel() * 4 / 2**20
    return case


def _format(cases: list[Case]) -> str:
    lines = []
    for case in cases:
        base = case.times_ms.get("fastlora")
        parts = []
        for name, ms in case.times_ms.items():
            ratio = "" if name == "fastlora" or not base else f" (fastlora {ms / base:.2f}x faster)"
            parts.append(f"{name} {ms:8.2f} ms{ratio}")
        lines.append(f"{case.name}\n    " + "\n    ".join(parts))
        if case.peak_mib:
            mem = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in case.peak_mib.items())
            lines.append(f"    peak memory growth: {mem}")
    return "\n".join(lines)


def run(quick: bool = False, repeats: int | None = None, json_path: str | None = None) -> list[Case]:
    """Runs the benchmark suite, prints the table, optionally writes JSON; returns the cases."""
    repeats = repeats or (3 if quick else 9)
    big, ffn = (1024, 2752) if quick else (4096, 11008)
    cases = [
        bench_dequantize(big, big, repeats),
        bench_matmul(1, ffn, big, repeats),
        bench_matmul(512 if not quick else 64, big, big, repeats),
    ]
    print(_header())
    print(_format(cases))
    if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"machine": _machine(), "cases": [asdict(c) for c in cases]}, f, indent=2)
        os.replace(tmp, json_path)
    return cases


def _machine() -> dict[str, object]:
    from . import get_num_threads, simd_level

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "threads": get_num_threads(),
        "simd": simd_level(),
        "torch": torch.__version__,
    }


def _header() -> str:
    m = _machine()
    return f"fastlora bench  {m['date']}  {m['cpu']}  threads={m['threads']}  simd={m['simd']}  torch {m['torch']}"
