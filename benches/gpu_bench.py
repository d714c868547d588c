"""fastlora's Triton kernels on a CUDA GPU: correctness at real sizes, then speed against
bitsandbytes and dense cuBLAS bf16.

    python benches/gpu_bench.py                 # on a CUDA machine
    python benches/gpu_bench.py --dry-run       # tiny CPU shapes under Triton's interpreter

Sections, in this order (each reports its own failure and the run goes on):

1. checks: every kernel against `fastlora.reference` on random bf16 data, weights
   4096x4096, 11008x4096 and 4096x14336, M = 1, 16, 4096: quantize bytes (and the nested
   8-bit scales), dequantize values, x @ W.T, dy @ W and the fused LoRA forward within
   bf16 tolerance of a float64 product.
2. sweep: every one-row GEMV configuration (tile x split) at M = 1 and 4 and every
   dequantize configuration, on the weights of Llama-3.2-1B, Llama-2-7B and Llama-3-8B;
   each candidate's result is checked, and the fastest per shape goes to
   `<results-dir>/configs/<family>.json`, the table `fastlora.kernels.tuning` reads once it
   is committed as `fastlora/kernels/configs/<family>.json`. The sections after it launch
   with that table.
3. bandwidth: a device-to-device copy (read + write bytes per second), and from it the
   M = 1 floor: the time to read the packed weight and its scales once.
4. dequantize: fastlora vs `bitsandbytes.functional.dequantize_4bit`.
5. matmul: for each weight and M: fastlora's default dispatch, the fused kernel forced, the
   dequantize + cuBLAS path forced, the fused kernel with double-quantized scales decoded in
   the kernel, `bitsandbytes.matmul_4bit`, dense bf16 cuBLAS; and dy @ W. From the fused
   and the cuBLAS timings it prints the crossover row count for
   `fastlora.kernels.matmul.DEQUANTIZE_CUBLAS_MIN_ROWS`. Then the host time per call of each
   layer of the small-M path (Python, op dispatch, kernel launches) on a tiny weight.
6. lora_layer: Linear4bit + LoRA r=16 forward + backward at M = 4096: fastlora's
   `LoraLinear`, `bitsandbytes.nn.Linear4bit` with a PEFT-style LoRA in plain torch, and a
   dense bf16 `nn.Linear` with the same LoRA; time and peak memory.
7. decode: greedy decoding at batch 1 of a Llama-3.2-1B-shaped model (random weights, LoRA
   r=16 on every linear layer): fastlora, bitsandbytes + peft and the dense bf16 model, each
   eager (`generate` with its dynamic cache) and graph-captured (`generate` with the static
   cache, which transformers compiles with `mode="reduce-overhead"`: CUDA graphs); tokens/s.
   Needs transformers and peft (the section fails with a note without them).

Timings are `triton.testing.do_bench` medians in ms (CUDA events). Results, with the
device name and versions, go to `benches/results/gpu-<device>-<date>.json`, and every check
and timing is appended to the `.jsonl` beside it as it is measured (a run cut off by its
time limit keeps what it had); a table is printed. Runs with python 3.12, torch 2.11,
triton 3.6, bitsandbytes and fastlora wheels.
"""

from __future__ import annotations

import os
import sys

# The dry run runs the Triton kernels on CPU tensors: the interpreter must be chosen before
# triton is imported, and the public API must be told to use it.
DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["FASTLORA_BACKEND"] = "triton"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastlora  # noqa: E402
from fastlora import reference  # noqa: E402
from fastlora.formats import dynamic_map  # noqa: E402
from fastlora.kernels import dequantize as fl_dequantize  # noqa: E402
from fastlora.kernels import lora as fl_lora  # noqa: E402
from fastlora.kernels import matmul as fl_matmul  # noqa: E402
from fastlora.kernels import tuning  # noqa: E402

WEIGHTS = [(4096, 4096), (11008, 4096), (4096, 14336)]  # (out_features, in_features)
ROWS = [1, 16, 4096]
DRY_WEIGHTS = [(40, 128)]
DRY_ROWS = [1, 16, 40]
# The config tables' shapes: Llama-3.2-1B (hidden 2048, KV 512, MLP 8192), Llama-2-7B (4096,
# MLP 11008), Llama-3-8B (KV 1024, MLP 14336); (out_features, in_features).
SWEEP_WEIGHTS = [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (4096, 4096), (11008, 4096), (4096, 11008),
                 (1024, 4096), (14336, 4096), (4096, 14336)]
SWEEP_ROWS = [1, 4]
SWEEP_SPLITS = (1, 2, 4, 8, 16)
LORA_RANK = 16
# Llama-3.2-1B's shape; the dry run's is tiny.
DECODE_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
DRY_DECODE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=64, vocab_size=512, tie_word_embeddings=True)
DECODE_PROMPT, DECODE_TOKENS = 16, 64
DTYPE = torch.bfloat16
# Allowed error of a bf16 result relative to sum(|a| * |b|) (W and y each rounded once).
BF16_TOL = 2**-7
RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Report:
    """Collects results; `section` runs a block and records its failure instead of raising."""

    def __init__(self, log: Path | None = None) -> None:
        self.checks: list[dict] = []
        self.timings: list[dict] = []
        self.errors: list[dict] = []
        self.notes: dict[str, object] = {}
        self.log = log

    def _append(self, kind: str, row: dict) -> None:
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(json.dumps({"kind": kind, **row}) + "\n")

    @contextlib.contextmanager
    def section(self, name: str):
        print(f"== {name}", flush=True)
        try:
            yield
        except Exception as exc:  # one failing section must not stop the others
            self.errors.append({"section": name, "error": repr(exc), "traceback": traceback.format_exc()})
            self._append("error", self.errors[-1])
            print(f"   FAILED: {exc!r}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        self._append("check", self.checks[-1])
        print(f"   {'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)

    def timing(self, section: str, case: str, impl: str, ms: float, **extra) -> None:
        row = {"section": section, "case": case, "impl": impl, "ms": ms, **extra}
        self.timings.append(row)
        self._append("timing", row)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        print(f"   {case:<28} {impl:<34} {ms:9.4f} ms {shown}", flush=True)


def bench_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None) -> float:
    """Median time of `fn` in ms: CUDA events via do_bench on a GPU, a wall clock otherwise."""
    if device.type == "cuda":
        import triton.testing

        # 200 ms of warm-up, not do_bench's 25: the first large case of a run read 2.7x slow
        # (GPU_NOTES.md), likely the clocks still ramping from idle.
        return float(triton.testing.do_bench(fn, warmup=200, grad_to_none=grad_to_none, return_mode="median"))
    fn()  # the dry run: only the code path matters, one timed call will do
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_weight(n: int, k: int, device: torch.device) -> torch.Tensor:
    return (torch.randn(n, k, device=device) * 0.02).to(DTYPE)


def worst_error_ratio(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, tol: float) -> float:
    """max |actual - expected| / (tol * bound): at most 1 passes."""
    return ((actual.double() - expected).abs() / (tol * bound + 1e-30)).max().item()


# ---------------------------------------------------------------------------------------------
# 1. checks
# ---------------------------------------------------------------------------------------------


def run_checks(report: Report, weights, rows, device: torch.device) -> None:
    compute_dtype = DTYPE if device.type == "cuda" else torch.float32  # bf16 is broken in the interpreter
    tol = BF16_TOL if compute_dtype == DTYPE else 1e-5
    for n, k in weights:
        with report.section(f"checks {n}x{k}"):
            w = random_weight(n, k, device)
            w.view(-1)[:64] = 0  # an all-zero block
            packed, absmax = fl_dequantize.quantize_4bit(w, 64, "nf4")
            # The reference quantizers run on CPU (the oracle); the offset is the device's mean.
            ref_packed, ref_absmax = reference.quantize_4bit(w.cpu(), 64, "nf4")
            report.check(f"quantize_4bit bytes {n}x{k}",
                         torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax))
            offset = absmax.mean()
            qabsmax, absmax2 = fl_dequantize.quantize_blockwise(absmax - offset, dynamic_map(device), 256)
            ref_q, ref_absmax2 = reference.quantize_blockwise((absmax - offset).cpu(), dynamic_map(), 256)
            report.check(f"nested scales bytes {n}x{k}",
                         torch.equal(qabsmax.cpu(), ref_q) and torch.equal(absmax2.cpu(), ref_absmax2))
            nested = fl_dequantize.NestedScales(absmax2, dynamic_map(device), offset)
            scales = reference.dequantize_nested_absmax(qabsmax, absmax2, offset, dynamic_map(device))
            dense = fl_dequantize.dequantize_4bit(packed, qabsmax, 64, "nf4", (n, k), DTYPE, nested=nested)
            expected = reference.dequantize_4bit(packed, scales, 64, "nf4", (n, k), DTYPE)
            if device.type == "cuda":
                report.check(f"dequantize_4bit (nested, bf16) {n}x{k}", torch.equal(dense, expected))
            weight = reference.dequantize_4bit(packed, scales, 64, "nf4", (n, k), torch.float32).double()
            del dense, expected
            for m in rows:
                x = torch.randn(m, k, device=device).to(compute_dtype)
                y = fl_matmul.matmul_4bit(x, packed, qabsmax, n, k, 64, "nf4", False, nested=nested)
                ratio = worst_error_ratio(y, x.double() @ weight.t(), x.double().abs() @ weight.abs().t(), tol)
                report.check(f"x @ W.T M={m} {n}x{k}", ratio <= 1, f"error/tolerance {ratio:.3g}")
                g = torch.randn(m, n, device=device).to(compute_dtype)
                dx = fl_matmul.matmul_4bit(g, packed, qabsmax, n, k, 64, "nf4", True, nested=nested)
                ratio = worst_error_ratio(dx, g.double() @ weight, g.double().abs() @ weight.abs(), tol)
                report.check(f"dy @ W M={m} {n}x{k}", ratio <= 1, f"error/tolerance {ratio:.3g}")
                A = torch.randn(LORA_RANK, k, device=device) / math.sqrt(k)
                B = torch.randn(n, LORA_RANK, device=device) / 4
                y = fl_lora.lora_linear_4bit(x, x, packed, scales, None, A, B, 2.0, 64, "nf4")
                u = x.double() @ A.double().t()
                ratio = worst_error_ratio(
                    y, x.double() @ weight.t() + 2.0 * u @ B.double().t(),
                    x.double().abs() @ weight.abs().t() + 2.0 * u.abs() @ B.double().abs().t(), tol,
                )
                report.check(f"LoRA forward r={LORA_RANK} M={m} {n}x{k}", ratio <= 1, f"error/tolerance {ratio:.3g}")
                del x, y, g, dx
            del weight
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 3-5. bandwidth, dequantize, matmul
# ---------------------------------------------------------------------------------------------


def run_bandwidth(report: Report, device: torch.device) -> float:
    """Device copy bandwidth in bytes per second (read + write)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 20)
    src = torch.empty(numel, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    bandwidth = 2 * numel / (ms * 1e-3)
    report.timing("bandwidth", f"copy {numel >> 20} MiB", "torch copy_", ms, TB_per_s=bandwidth / 1e12)
    report.notes["copy_bandwidth_TB_per_s"] = bandwidth / 1e12
    return bandwidth


def bitsandbytes_modules():
    import bitsandbytes
    import bitsandbytes.functional

    return bitsandbytes, bitsandbytes.functional


def run_dequantize(report: Report, weights, device: torch.device) -> None:
    for n, k in weights:
        with report.section(f"dequantize {n}x{k}"):
            w = random_weight(n, k, device)
            packed, state = fastlora.quantize_4bit(w, compress_statistics=True)
            moved = packed.numel() + state.absmax.numel() + n * k * w.element_size()
            ms = bench_ms(lambda: fastlora.dequantize_4bit(packed, state), device)
            report.timing("dequantize", f"{n}x{k}", "fastlora", ms, GB_per_s=moved / (ms * 1e6))
            _, bnb_functional = bitsandbytes_modules()
            bnb_packed, bnb_state = bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            ms = bench_ms(lambda: bnb_functional.dequantize_4bit(bnb_packed, bnb_state), device)
            report.timing("dequantize", f"{n}x{k}", "bitsandbytes", ms, GB_per_s=moved / (ms * 1e6))


def run_matmul(report: Report, weights, rows, device: torch.device, bandwidth: float | None) -> None:
    compute_dtype = DTYPE if device.type == "cuda" else torch.float32
    crossover: dict[str, int | None] = {}
    for n, k in weights:
        with report.section(f"matmul {n}x{k}"):
            w = random_weight(n, k, device)
            packed, state = fastlora.quantize_4bit(w, compress_statistics=True)
            scales = state.block_scales().decoded()
            nested = fl_dequantize.NestedScales(state.state2.absmax, state.state2.code, state.offset)
            bnb, bnb_functional = bitsandbytes_modules()
            bnb_packed, bnb_state = bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
            dense_w = w.to(compute_dtype)
            packed_bytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel()
            fused_faster_up_to = None
            for m in rows:
                case = f"M={m} {n}x{k}"
                x = torch.randn(m, k, device=device).to(compute_dtype)
                g = torch.randn(m, n, device=device).to(compute_dtype)
                flops = 2 * m * n * k
                times = {
                    "fastlora": bench_ms(lambda: fastlora.matmul_4bit(x, packed, state), device),
                    "fastlora fused, nested scales in-kernel": bench_ms(lambda: fl_matmul.matmul_4bit(
                        x, packed, state.absmax, n, k, 64, "nf4", False, nested=nested), device),
                    "bitsandbytes.matmul_4bit": bench_ms(lambda: bnb.matmul_4bit(x, bnb_packed.t(), bnb_state), device),
                    "dense cuBLAS": bench_ms(lambda: x @ dense_w.t(), device),
                }
                backward = {"dense cuBLAS": bench_ms(lambda: g @ dense_w, device)}
                for impl, path in (("fastlora fused forced", "fused"), ("fastlora dequantize+cuBLAS forced", "cublas")):
                    with fl_matmul.forced_path(path):
                        times[impl] = bench_ms(lambda: fastlora.matmul_4bit(x, packed, state), device)
                        backward[impl] = bench_ms(
                            lambda: fl_matmul.matmul_4bit(g, packed, scales, n, k, 64, "nf4", True), device)
                for impl, ms in times.items():
                    extra = {"TFLOP_per_s": flops / (ms * 1e9),
                             "speedup_vs_bitsandbytes": times["bitsandbytes.matmul_4bit"] / ms}
                    if m == 1 and bandwidth:  # the floor: reading the packed weight and scales once
                        extra["floor_ms"] = packed_bytes / bandwidth * 1e3
                        extra["over_floor"] = ms / extra["floor_ms"]
                    report.timing("matmul x@W.T", case, impl, ms, **extra)
                for impl, ms in backward.items():
                    report.timing("matmul dy@W", case, impl, ms, TFLOP_per_s=flops / (ms * 1e9))
                if times["fastlora fused forced"] <= times["fastlora dequantize+cuBLAS forced"]:
                    fused_faster_up_to = m
                x = g = None  # freed before the next shape's tensors
            crossover[f"{n}x{k}"] = fused_faster_up_to
            dense_w = w = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report.notes["fused_faster_up_to_rows"] = crossover
    print(f"   the fused kernel is faster up to these row counts (of {rows}): {crossover}; set "
          "fastlora.kernels.matmul.DEQUANTIZE_CUBLAS_MIN_ROWS just above them", flush=True)


def run_host_overhead(report: Report, device: torch.device) -> None:
    """Host time per call on a tiny weight, with no synchronization inside the loop: what
    Python, the op dispatch and the kernel launches cost on the CPU. At M = 1 the GPU work is
    a few microseconds, so this, not the kernel, sets the time of a small matmul."""
    cases: dict[str, Callable[[], object]] = {}
    with report.section("host overhead setup"):
        compute_dtype = DTYPE if device.type == "cuda" else torch.float32
        n = k = 256
        w = random_weight(n, k, device)
        x = torch.randn(1, k, device=device).to(compute_dtype)
        packed, state = fastlora.quantize_4bit(w, compress_statistics=True)
        plain_packed, plain_state = fastlora.quantize_4bit(w)
        flat = plain_packed.reshape(-1)
        offset = state.offset.reshape(()).to(torch.float32)
        bnb, bnb_functional = bitsandbytes_modules()
        bnb_packed, bnb_state = bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        cases = {
            "torch x + 1 (one aten launch)": lambda: x + 1,
            "triton dequantize_blockwise kernel": lambda: fl_dequantize.dequantize_blockwise(
                state.absmax, state.state2.absmax, state.state2.code, 256, offset),
            "triton fused matmul kernel (autotuned launch)": lambda: fl_matmul.matmul_4bit(
                x, flat, plain_state.absmax, n, k, 64, "nf4", False),
            "torch.ops.fastlora.matmul_4bit": lambda: torch.ops.fastlora.matmul_4bit(
                x, flat, plain_state.absmax, n, k, 64, "nf4", False),
            "fastlora.matmul_4bit, fp32 scales": lambda: fastlora.matmul_4bit(x, plain_packed, plain_state),
            "fastlora.matmul_4bit, double-quantized": lambda: fastlora.matmul_4bit(x, packed, state),
            "bitsandbytes.matmul_4bit, double-quantized": lambda: bnb.matmul_4bit(x, bnb_packed.t(), bnb_state),
        }
    calls = 300 if device.type == "cuda" else 3
    for name, fn in cases.items():
        with report.section(f"host overhead {name}"):
            for _ in range(3):
                fn()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            host_ms = (time.perf_counter() - start) * 1e3 / calls
            synchronize(device)
            report.timing("host overhead", f"M=1 {n}x{k}", name, host_ms, us_per_call=host_ms * 1e3)


# ---------------------------------------------------------------------------------------------
# 6. Linear4bit + LoRA layer
# ---------------------------------------------------------------------------------------------


class PlainLora(nn.Module):
    """PEFT's LoRA in plain torch over any base layer: `base(x) + B(A(x)) * scaling`, fp32 adapters."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, device) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device)
        nn.init.normal_(self.lora_B.weight, std=0.01)
        self.scaling = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + (self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling).to(y.dtype)


def run_lora_layer(report: Report, weights, m: int, device: torch.device) -> None:
    compute_dtype = DTYPE if device.type == "cuda" else torch.float32
    for n, k in weights:
        with report.section(f"lora layer {n}x{k}"):
            dense = nn.Linear(k, n, bias=False, device=device, dtype=compute_dtype).requires_grad_(False)
            layers: dict[str, Callable[[], nn.Module]] = {
                "fastlora": lambda: fastlora.LoraLinear(
                    fastlora.Linear4bit.from_linear(dense, compute_dtype=compute_dtype), r=LORA_RANK, lora_alpha=32,
                    init_lora_weights=False),
                "bitsandbytes + torch LoRA": lambda: PlainLora(bnb_linear(dense, compute_dtype, device), k, n,
                                                               LORA_RANK, device),
                "dense bf16 + torch LoRA": lambda: PlainLora(dense, k, n, LORA_RANK, device),
            }
            for impl, build in layers.items():
                with report.section(f"lora layer {n}x{k} {impl}"):
                    layer = build()
                    params = [p for p in layer.parameters() if p.requires_grad]  # the adapters
                    x = torch.randn(m, k, device=device).to(compute_dtype).requires_grad_()

                    def step() -> None:
                        layer(x).float().square().mean().backward()

                    step()  # compiles and autotunes outside the measurement
                    synchronize(device)
                    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    step()
                    synchronize(device)
                    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                    ms = bench_ms(step, device, grad_to_none=[x, *params])
                    report.timing("lora layer fwd+bwd", f"M={m} {n}x{k} r={LORA_RANK}", impl, ms,
                                  peak_MiB=None if peak is None else peak / 2**20,
                                  peak_over_start_MiB=None if peak is None else (peak - before) / 2**20)
                    layer = x = None  # freed before empty_cache
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


def bnb_linear(dense: nn.Linear, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    bnb, _ = bitsandbytes_modules()
    layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    return layer.to(device)


# ---------------------------------------------------------------------------------------------
# 7. decode
# ---------------------------------------------------------------------------------------------


def decode_models(shape: dict, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], nn.Module]]:
    """Builders of the three stacks over one random base (built on `device`) and LoRA r=16 on
    every linear layer: fastlora, bitsandbytes + peft, the dense model with fastlora's LoRA."""
    from fastlora.bench import bitsandbytes_peft_model, llama_config
    from fastlora.train import modeling

    transformers = modeling._hf()
    config = llama_config(**shape)

    def base() -> nn.Module:
        torch.manual_seed(0)
        with device:
            return transformers.AutoModelForCausalLM.from_config(config, **modeling.dtype_kwarg(dtype))

    return {
        "fastlora": lambda: fastlora.prepare_model(base(), r=LORA_RANK, lora_alpha=2 * LORA_RANK),
        "bitsandbytes + peft": lambda: bitsandbytes_peft_model(base(), LORA_RANK, 2 * LORA_RANK,
                                                               compute_dtype=dtype, device=device),
        "dense + LoRA": lambda: fastlora.prepare_model(base(), r=LORA_RANK, lora_alpha=2 * LORA_RANK, quantize=False),
    }


def generate_ms(model: nn.Module, ids: torch.Tensor, tokens: int, static: bool, device: torch.device,
                warmups: int) -> float:
    """Wall time of one greedy `generate` of exactly `tokens` tokens, after `warmups` calls
    (on a GPU two: the static cache's compilation and CUDA-graph recording happen there)."""
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        for _ in range(warmups):
            model.generate(ids, **kwargs)
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        synchronize(device)
        elapsed = (time.perf_counter() - start) * 1e3
    if out.shape != (1, ids.shape[1] + tokens):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected (1, {ids.shape[1] + tokens})")
    return elapsed


def run_decode(report: Report, shape: dict, prompt: int, tokens: int, device: torch.device) -> None:
    dtype = DTYPE if device.type == "cuda" else torch.float32
    builders = decode_models(shape, device, dtype)
    ids = torch.randint(0, shape["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    case = f"batch 1, {tokens} tokens after {prompt}"
    for impl, build in builders.items():
        with report.section(f"decode {impl}"):
            model = build().eval()
            for mode, static in (("eager", False), ("graph-captured (static cache)", True)):
                with report.section(f"decode {impl} {mode}"):
                    ms = generate_ms(model, ids, tokens, static, device, warmups=2 if device.type == "cuda" else 0)
                    report.timing("decode", case, f"{impl} {mode}", ms, tokens_per_s=tokens / ms * 1e3)
            model = None  # freed before empty_cache
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__, "fastlora": fastlora.__version__}
    for name in ("triton", "bitsandbytes"):
        try:
            found[name] = __import__(name).__version__
        except Exception as exc:  # recorded, not fatal: the sections that need it report it
            found[name] = f"unavailable: {exc!r}"
    return found


# ---------------------------------------------------------------------------------------------
# 2. the configuration sweep
# ---------------------------------------------------------------------------------------------


def sweep_ms(fn: Callable[[], object], device: torch.device) -> float:
    """`bench_ms` made short (the sweep times hundreds of candidates): 25 ms of warm-up and
    50 ms of repeats on a GPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=50, return_mode="median"))
    return bench_ms(fn, device)


def run_sweep(report: Report, weights, rows, device: torch.device, results_dir: Path) -> Path:
    """Times every GEMV and dequantize configuration per shape, checks each one's result, and
    writes the fastest to the family's config table; returns the table's path."""
    compute_dtype = DTYPE if device.type == "cuda" else torch.float32
    tol = BF16_TOL if compute_dtype == DTYPE else 1e-5
    kernels: dict[str, dict[str, dict]] = {"gemv": {}, "dequantize": {}}
    for n, k in weights:
        with report.section(f"sweep {n}x{k}"):
            w = random_weight(n, k, device)
            packed, state = fastlora.quantize_4bit(w, compress_statistics=True)
            nested = fl_dequantize.NestedScales(state.state2.absmax, state.state2.code, state.offset)
            # The default configuration's result (checked against the reference in section 1).
            weight = fl_dequantize.dequantize_4bit(packed, state.absmax, 64, "nf4", (n, k), torch.float32,
                                                   nested=nested)
            dense = torch.empty(n, k, dtype=compute_dtype, device=device)
            times = {}
            for config in fl_dequantize.DEQUANTIZE_CONFIGS:
                dense.fill_(float("nan"))
                fl_dequantize.dequantize_4bit(packed, state.absmax, 64, "nf4", (n, k), compute_dtype, nested=nested,
                                              out=dense, config=config)
                report.check(f"sweep dequantize {n}x{k} {config}", torch.equal(dense, weight.to(compute_dtype)))
                times[config] = sweep_ms(lambda config=config: fl_dequantize.dequantize_4bit(
                    packed, state.absmax, 64, "nf4", (n, k), compute_dtype, nested=nested, out=dense,
                    config=config), device)
                report.timing("sweep dequantize", f"{n}x{k}", f"BYTES={config[0]} warps={config[1]}", times[config])
            best = min(times, key=times.__getitem__)
            kernels["dequantize"][tuning.shape_key(n * k)] = {
                "BYTES": best[0], "num_warps": best[1], "ms": times[best],
                "default_ms": times[fl_dequantize.DEQUANTIZE_CONFIGS[0]]}
            dense = None
            for m in rows:
                x = torch.randn(m, k, device=device).to(compute_dtype)
                exact = x.double() @ weight.double().t()
                bound = x.double().abs() @ weight.double().abs().t()
                out = torch.empty(m, n, dtype=compute_dtype, device=device)
                heuristic = fl_matmul.gemv_config(n, k, m, device)
                times, worst = {}, 0.0
                for tile in fl_matmul._GEMV_TILES:
                    for split in SWEEP_SPLITS:
                        if split > max(1, k // 2 // tile[1]):
                            continue
                        config = (*tile, split)
                        out.fill_(float("nan"))
                        fl_matmul.launch_gemv(x, packed, state.absmax, n, k, 64, "nf4", nested, None, None, out,
                                              config)
                        worst = max(worst, worst_error_ratio(out, exact, bound, tol))
                        times[config] = sweep_ms(lambda config=config: fl_matmul.launch_gemv(
                            x, packed, state.absmax, n, k, 64, "nf4", nested, None, None, out, config), device)
                        report.timing("sweep gemv", f"M={m} {n}x{k}", "BLOCK_OUT={} BLOCK_BYTES={} warps={} "
                                      "SPLIT={}".format(*config), times[config])
                report.check(f"sweep gemv M={m} {n}x{k}: every configuration", worst <= 1,
                             f"worst error/tolerance {worst:.3g}")
                best = min(times, key=times.__getitem__)
                kernels["gemv"][tuning.shape_key(n, k, m)] = {
                    "BLOCK_OUT": best[0], "BLOCK_BYTES": best[1], "num_warps": best[2], "SPLIT": best[3],
                    "ms": times[best], "heuristic_ms": times.get(heuristic)}
                x = exact = bound = out = None
            del weight
            if device.type == "cuda":
                torch.cuda.empty_cache()
    family = tuning.family(device)
    path = results_dir / "configs" / f"{family}.json"
    about = {"family": family, "versions": versions(),
             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu dry run",
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    tuning.write_table(path, kernels, about)
    print(f"   config table: {path}", flush=True)
    return path


def print_table(report: Report) -> None:
    print("\n| section | case | implementation | ms | |")
    print("|---|---|---|---:|---|")
    for row in report.timings:
        extra = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                          if k not in ("section", "case", "impl", "ms"))
        print(f"| {row['section']} | {row['case']} | {row['impl']} | {row['ms']:.4f} | {extra} |")
    failed = [c["name"] for c in report.checks if not c["ok"]]
    print(f"\nchecks: {len(report.checks) - len(failed)} passed, {len(failed)} failed {failed if failed else ''}")
    print(f"sections failed: {[e['section'] for e in report.errors]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on CPU tensors under Triton's interpreter (exercises the code paths)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["checks", "dequantize", "matmul", "lora", "sweep", "decode"])
    args = parser.parse_args(argv)
    if args.dry_run:
        device, weights, rows, lora_rows = torch.device("cpu"), DRY_WEIGHTS, DRY_ROWS, DRY_ROWS[-1]
        sweep_weights = DRY_WEIGHTS
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run for the CPU smoke test", file=sys.stderr)
            return 2
        device, weights, rows, lora_rows = torch.device("cuda"), WEIGHTS, ROWS, 4096
        sweep_weights = SWEEP_WEIGHTS
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu dry run ({platform.machine()})"
    print(f"fastlora GPU bench on {device_name}: {versions()}", flush=True)

    date = datetime.datetime.now(datetime.timezone.utc)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    path = args.results_dir / f"gpu-{slug}-{date:%Y-%m-%d}.json"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    report = Report(path.with_suffix(".jsonl"))
    bandwidth = None
    if "checks" not in args.skip:
        run_checks(report, weights, rows, device)
    if "sweep" not in args.skip:
        with report.section("sweep table"):
            # The sections after it launch with the table just measured.
            tuning.CONFIG_DIR = run_sweep(report, sweep_weights, SWEEP_ROWS, device, args.results_dir).parent
    with report.section("bandwidth"):
        bandwidth = run_bandwidth(report, device)
    if "dequantize" not in args.skip:
        run_dequantize(report, weights, device)
    if "matmul" not in args.skip:
        run_matmul(report, weights, rows, device, bandwidth)
    if "matmul" not in args.skip:
        run_host_overhead(report, device)
    if "lora" not in args.skip:
        run_lora_layer(report, weights, lora_rows, device)
    if "decode" not in args.skip:
        with report.section("decode"):
            shape, prompt, tokens = ((DRY_DECODE_SHAPE, 4, 2) if args.dry_run
                                     else (DECODE_SHAPE, DECODE_PROMPT, DECODE_TOKENS))
            run_decode(report, shape, prompt, tokens, device)

    path.write_text(json.dumps({
        "device": device_name, "date": date.isoformat(), "dry_run": args.dry_run, "versions": versions(),
        "checks": report.checks, "timings": report.timings, "notes": report.notes, "errors": report.errors,
    }, indent=1))
    print_table(report)
    print(f"\nresults: {path}")
    return 1 if report.errors or not all(c["ok"] for c in report.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
