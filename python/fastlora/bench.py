"""`fastlora bench`: fastlora, bitsandbytes and dense torch side by side, in one process.

Each case times every implementation round-robin (so machine noise hits them alike) and
reports medians and ratios. Memory is the growth of the peak resident set during one call,
measured in a fresh subprocess per implementation (Linux `VmHWM`) after the heap's free pages
went back to the system, so it counts Rust, torch and bitsandbytes allocations alike and no
allocator cache from earlier calls hides any.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import fastlora

Impl = Callable[[], object]


@dataclass
class Case:
    name: str
    times_ms: dict[str, float] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    return bnb_functional


def dequantize_case(n: int, k: int) -> dict[str, Impl]:
    w = torch.randn(n, k)
    packed, state = fastlora.quantize_4bit(w, quant_type="nf4")
    impls: dict[str, Impl] = {"fastlora": lambda: fastlora.dequantize_4bit(packed, state)}
    bnb = _bnb_functional()
    if bnb is not None:
        bnb_packed, bnb_state = bnb.quantize_4bit(w, quant_type="nf4")
        impls["bitsandbytes"] = lambda: bnb.dequantize_4bit(bnb_packed, bnb_state)
    impls["dense copy"] = lambda: w.clone()
    return impls


def dequantize_out_case(n: int, k: int) -> dict[str, Impl]:
    """As `dequantize_case`, fastlora writing into one buffer kept across calls (`out=`): the
    decode without a fresh allocation's page faults. bitsandbytes has no CPU `out=`
    (`dequantize_4bit.out` is not registered for CPU), so its column is its ordinary call."""
    w = torch.randn(n, k)
    out = torch.empty(n, k)
    packed, state = fastlora.quantize_4bit(w, quant_type="nf4")
    impls: dict[str, Impl] = {"fastlora": lambda: fastlora.dequantize_4bit(packed, state, out=out)}
    bnb = _bnb_functional()
    if bnb is not None:
        bnb_packed, bnb_state = bnb.quantize_4bit(w, quant_type="nf4")
        impls["bitsandbytes"] = lambda: bnb.dequantize_4bit(bnb_packed, bnb_state)
    impls["dense copy"] = lambda: out.copy_(w)
    return impls


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _autocast(dtype: str):
    """bf16: `torch.autocast` on the CPU, as `fastlora train --precision bf16` trains (fp32
    weights, bf16 products) on every stack alike; fp32: nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def matmul_case(m: int, n: int, k: int, dtype: str = "fp32") -> dict[str, Impl]:
    w = (torch.randn(n, k) * 0.02).to(DTYPES[dtype])
    x = torch.randn(m, k, dtype=DTYPES[dtype])
    packed, state = fastlora.quantize_4bit(w, quant_type="nf4")
    impls: dict[str, Impl] = {"fastlora": lambda: fastlora.matmul_4bit(x, packed, state)}
    bnb = _bnb_functional()
    if bnb is not None:
        import bitsandbytes

        bnb_packed, bnb_state = bnb.quantize_4bit(w, quant_type="nf4")
        impls["bitsandbytes"] = lambda: bitsandbytes.matmul_4bit(x, bnb_packed.t(), bnb_state)
    impls["dense"] = lambda: torch.nn.functional.linear(x, w)
    return impls


class _PlainLora(nn.Module):
    """Any frozen base layer plus a LoRA adapter in plain torch, as PEFT computes it."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.01)
        self.scaling = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def layer_case(m: int, n: int, k: int, r: int, dtype: str = "fp32") -> dict[str, Impl]:
    """Forward + backward of a frozen base + LoRA r, gradients for x and the adapter (bf16:
    under autocast)."""
    dense = nn.Linear(k, n, bias=False)
    dense.weight.requires_grad_(False)
    x = torch.randn(m, k, requires_grad=True)
    grad = torch.randn(m, n, dtype=DTYPES[dtype])

    def step(layer: nn.Module) -> Impl:
        def run() -> None:
            with _autocast(dtype):
                y = layer(x)
            y.backward(grad)
            x.grad = None
            layer.zero_grad(set_to_none=True)

        return run

    ours = fastlora.LoraLinear(fastlora.Linear4bit.from_linear(dense), r=r, init_lora_weights=False)
    impls: dict[str, Impl] = {"fastlora": step(ours)}
    try:
        import bitsandbytes as bnb

        base = bnb.nn.Linear4bit(k, n, bias=False, quant_type="nf4", compress_statistics=True)
        base.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        base = base.to("cpu")
        impls["bitsandbytes"] = step(_PlainLora(base, k, n, r))
    except ImportError:
        pass
    impls["dense"] = step(_PlainLora(dense, k, n, r))
    return impls


def bitsandbytes_peft_model(model: nn.Module, r: int, alpha: float, init: dict | None = None,
                            compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                            ) -> nn.Module:
    """The stack users run today: every linear layer of `model` (fastlora's "all-linear")
    replaced by `bitsandbytes.nn.Linear4bit` (NF4, double quantization, quantized on
    `device`), then `peft.get_peft_model`. `init` ({module name: (A, B)}) sets the initial
    adapters. The model is returned on `device`."""
    import bitsandbytes as bnb
    import peft

    from .model import find_target_modules

    names = find_target_modules(model, "all-linear")
    for name in names:
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        layer = layer.to(device)  # quantizes
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                             target_modules=sorted({n.split(".")[-1] for n in names}), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    if init is not None:
        with torch.no_grad():
            for name, module in model.named_modules():
                if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
                    a, b = init[name.removeprefix("base_model.model.")]
                    module.lora_A["default"].weight.copy_(a)
                    module.lora_B["default"].weight.copy_(b)
    return model


# The shape of a real small chat model (SmolLM-135M: 30 layers, hidden 576, 9 heads, 3 KV
# heads, intermediate 1536, vocabulary 49152, tied embeddings), random weights.
SMOLLM_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
               "vocab_size": 49152, "tie_word_embeddings": True}


def llama_config(**fields):
    """The shipped tiny Llama's config (`fastlora.train.modeling.embedded_model_dir`) with
    `fields` set: the shape of any Llama, for models built with random weights."""
    from .train import modeling

    config = modeling._hf().AutoConfig.from_pretrained(str(modeling.embedded_model_dir()))
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def _llama_models(hidden: int, layers: int, r: int, use_cache: bool, **shape) -> tuple[dict[str, nn.Module], int]:
    """A Llama built from the shipped tiny config at the given width and depth (`shape`:
    other config fields, e.g. `SMOLLM_135M`), three ways: fastlora (4-bit base + LoRA),
    bitsandbytes + peft (left out when not installed), and the unquantized model with
    plain-torch LoRA; all from one base and one adapter initialization. Returns the models
    and the vocabulary size."""
    from .model import lora_layers
    from .train import modeling

    transformers = modeling._hf()
    config = llama_config(**{"hidden_size": hidden, "intermediate_size": (hidden * 11 // 4) // 64 * 64,
                             "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
                             "num_key_value_heads": hidden // 64, "head_dim": 64, "use_cache": use_cache, **shape})

    def base() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return transformers.AutoModelForCausalLM.from_config(config, **modeling.dtype_kwarg(torch.float32))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        ours = fastlora.prepare_model(base(), r=r, lora_alpha=2 * r)
    init = {name: (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone())
            for name, layer in lora_layers(ours).items()}
    models = {"fastlora": ours}
    try:
        models["bitsandbytes"] = bitsandbytes_peft_model(base(), r, 2 * r, init)
    except ImportError:  # bitsandbytes or peft not installed: that row is left out
        pass
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        models["dense"] = fastlora.prepare_model(base(), r=r, lora_alpha=2 * r, quantize=False)
    return models, config.vocab_size


def model_step_case(rows: int, length: int, hidden: int, layers: int, r: int, vocab: int | None = None,
                    dtype: str = "fp32") -> dict[str, Impl]:
    """One QLoRA training step's forward + backward of a Llama (`_llama_models`) with full
    gradient checkpointing on every stack, so the layers are compared like for like
    (`fastlora train` on CPU recomputes less by default: benches/train_compare.py); bf16:
    under autocast, as `fastlora train --precision bf16` trains."""
    from .train.trainer import enable_gradient_checkpointing

    models, vocab = _llama_models(hidden, layers, r, use_cache=False, **({"vocab_size": vocab} if vocab else {}))
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))

    def step(model: nn.Module) -> Impl:
        enable_gradient_checkpointing(model)
        model.train()

        def run() -> torch.Tensor:
            with _autocast(dtype):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()

        return run

    return {name: step(model) for name, model in models.items()}


def model_decode_case(prompt: int, tokens: int, hidden: int, layers: int, r: int, **shape) -> dict[str, Impl]:
    """Greedy decoding with the KV cache, one token per forward, of a Llama with its adapters
    attached (`_llama_models`): every linear layer multiplies a single row, so per-call host
    overhead counts as much as the kernels."""
    models, vocab = _llama_models(hidden, layers, r, use_cache=True, **shape)
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))

    # transformers 5.2x renamed the KV cache argument and output `past_key_values` -> `cache`
    # (the old name warns, and goes in 5.40); peft's wrapper passes either through.
    from transformers import LlamaForCausalLM

    cache = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

    def decode(model: nn.Module) -> Impl:
        model.eval()

        def run() -> torch.Tensor:
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True)
                for _ in range(tokens - 1):
                    token = out.logits[:, -1:].argmax(-1)
                    out = model(input_ids=token, use_cache=True, **{cache: getattr(out, cache)})
            return out.logits[:, -1].argmax(-1)

        return run

    return {name: decode(model) for name, model in models.items()}


def decode_135m_case(prompt: int, tokens: int, layers: int, vocab: int, r: int) -> dict[str, Impl]:
    """`model_decode_case` on the SmolLM-135M shape (`layers` and `vocab` shrink it for --quick)."""
    return model_decode_case(prompt, tokens, SMOLLM_135M["hidden_size"], layers, r,
                             **dict(SMOLLM_135M, vocab_size=vocab))


def _random_adapters(model: nn.Module, names: list[str], directory: Path, gen: torch.Generator) -> dict[str, Path]:
    """Saves one adapter per name (the model's LoRA layers with random A and B, B nonzero so
    that each changes the output) and returns their directories."""
    dirs = {}
    for name in names:
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=gen) * (0.2 if "lora_A" in param_name else 0.1))
        dirs[name] = fastlora.save_adapter(model, directory / name)
    return dirs


def mixed_adapter_models(rows: int, layers: int, vocab: int, r: int) -> tuple[nn.Module, nn.Module | None, list[str]]:
    """A 4-bit Llama of the SmolLM-135M shape (`layers`, `vocab` shrink it) with `rows`
    random adapters (r on all seven projections) loaded by name, twice: fastlora, and
    bitsandbytes + peft loading the same adapter files (None when either is not installed).
    Returns both models and the adapter names."""
    import tempfile

    from .train import modeling

    transformers = modeling._hf()
    config = transformers.AutoConfig.from_pretrained(str(modeling.embedded_model_dir()))
    for key, value in dict(SMOLLM_135M, vocab_size=vocab, num_hidden_layers=layers, head_dim=64).items():
        setattr(config, key, value)

    def base() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return transformers.AutoModelForCausalLM.from_config(config, **modeling.dtype_kwarg(torch.float32)).eval()

    names = [f"a{i}" for i in range(rows)]
    ours = fastlora.prepare_model(base(), r=r, lora_alpha=2 * r, adapter_name=names[0])
    theirs = None
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _random_adapters(ours, names, Path(tmp), torch.Generator().manual_seed(0))
        for name in names:  # the first fills the adapter prepare_model made, the rest are added
            fastlora.load_adapter(ours, dirs[name], adapter_name=name)
        try:
            theirs = bitsandbytes_peft_model(base(), r, 2 * r).eval()
            for name in names:
                theirs.load_adapter(str(dirs[name]), adapter_name=name)
        except ImportError:  # bitsandbytes or peft not installed
            theirs = None
    return ours, theirs, names


def decode_mixed_case(rows: int, prompt: int, tokens: int, layers: int, vocab: int, r: int) -> dict[str, Impl]:
    """Greedy decoding with the KV cache of `rows` rows, each through its own adapter
    (`mixed_adapter_models`): fastlora's `adapters_per_row`; PEFT's mixed batch
    (`adapter_names=`) over bitsandbytes; and fastlora with the whole batch on one adapter
    ("one adapter": the mixed batch's cost over a plain batch)."""
    ours, theirs, names = mixed_adapter_models(rows, layers, vocab, r)
    ids = torch.randint(0, vocab, (rows, prompt), generator=torch.Generator().manual_seed(1))
    options = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "pad_token_id": 0}

    def mixed() -> torch.Tensor:
        with torch.no_grad(), fastlora.adapters_per_row(ours, names):
            return ours.generate(input_ids=ids, **options)

    def one_adapter() -> torch.Tensor:
        with torch.no_grad():
            return ours.generate(input_ids=ids, **options)

    impls: dict[str, Impl] = {"fastlora": mixed}
    if theirs is not None:
        impls["bitsandbytes"] = lambda: theirs.generate(input_ids=ids, adapter_names=names, **options)
    impls["one adapter"] = one_adapter
    return impls


def _repeated(fn: Callable[[], object], calls: int) -> Impl:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def layer_call_case(size: int, r: int, calls: int) -> dict[str, Impl]:
    """`calls` one-row calls under `torch.no_grad()` of a frozen size x size layer, as decoding
    makes them: `Linear4bit` (r = 0) or `LoraLinear` r (fastlora), bitsandbytes' `Linear4bit`
    (+ the same LoRA in plain torch, as PEFT computes it), dense `nn.Linear` (+ that LoRA)."""
    dense = nn.Linear(size, size)
    dense.requires_grad_(False)
    x = torch.randn(1, size)
    base = fastlora.Linear4bit.from_linear(dense)
    ours = fastlora.LoraLinear(base, r=r, init_lora_weights=False) if r else base
    layers: dict[str, nn.Module] = {"fastlora": ours}
    try:
        import bitsandbytes as bnb

        theirs = bnb.nn.Linear4bit(size, size, quant_type="nf4", compress_statistics=True)
        theirs.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        theirs.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        layers["bitsandbytes"] = _PlainLora(theirs.to("cpu"), size, size, r) if r else theirs.to("cpu")
    except ImportError:
        pass
    layers["dense"] = _PlainLora(dense, size, size, r) if r else dense

    def call(layer: nn.Module) -> Impl:
        def run() -> None:
            with torch.no_grad():
                for _ in range(calls):
                    layer(x)

        return run

    return {name: call(layer) for name, layer in layers.items()}


def host_call_case(size: int, calls: int) -> dict[str, Impl]:
    """`calls` one-row `fastlora.matmul_4bit` calls on a tiny weight, against the native kernel
    alone on the same prepared weight ("native": the host time is the difference),
    `bitsandbytes.matmul_4bit` and torch's `F.linear`."""
    from .backends import cpu

    w = torch.randn(size, size)
    x = torch.randn(1, size)
    packed, state = fastlora.quantize_4bit(w, compress_statistics=True)
    prepared = cpu.prepare(packed.reshape(-1), state.block_scales(), size, size, 64, "nf4")
    y = torch.empty(1, size)
    impls: dict[str, Impl] = {
        "fastlora": _repeated(lambda: fastlora.matmul_4bit(x, packed, state), calls),
        "native": _repeated(lambda: prepared.native.matmul(x.data_ptr(), 1, y.data_ptr(), "float32", False), calls),
    }
    bnb = _bnb_functional()
    if bnb is not None:
        import bitsandbytes

        bnb_packed, bnb_state = bnb.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        impls["bitsandbytes"] = _repeated(lambda: bitsandbytes.matmul_4bit(x, bnb_packed.t(), bnb_state), calls)
    impls["dense"] = _repeated(lambda: torch.nn.functional.linear(x, w), calls)
    return impls


# key: (builder of the implementations, measure memory); shapes are (m, n, k[, r]), or for
# model_step (batch rows, tokens per row, hidden size, layers, r), for model_decode (prompt
# tokens, tokens generated, hidden size, layers, r).
FULL_SHAPES = {"dequantize": (4096, 4096), "dequantize_out": (4096, 4096), "matmul_m1": (1, 11008, 4096),
               "matmul_m512": (512, 4096, 4096), "matmul_m512_bf16": (512, 4096, 4096, "bf16"),
               "layer": (512, 4096, 4096, 16), "layer_bf16": (512, 4096, 4096, 16, "bf16"),
               "model_step": (4, 128, 512, 8, 16), "model_step_1024": (2, 256, 1024, 4, 16, 8192),
               "model_step_1024_bf16": (2, 256, 1024, 4, 16, 8192, "bf16"),
               "model_decode": (16, 32, 512, 8, 16), "decode_135m": (16, 32, 30, 49152, 16),
               "decode_mixed": (8, 16, 16, 30, 49152, 16), "host_call": (64, 1000),
               "linear_64": (64, 0, 1000), "lora_64": (64, 16, 1000), "linear_576": (576, 0, 200),
               "lora_576": (576, 16, 200), "linear_4096": (4096, 0, 20), "lora_4096": (4096, 16, 20)}
QUICK_SHAPES = {"dequantize": (1024, 1024), "dequantize_out": (1024, 1024), "matmul_m1": (1, 2752, 1024),
                "matmul_m512": (64, 1024, 1024), "matmul_m512_bf16": (64, 1024, 1024, "bf16"),
                "layer": (64, 1024, 1024, 16), "layer_bf16": (64, 1024, 1024, 16, "bf16"),
                "model_step": (2, 32, 128, 2, 8), "model_step_1024": (2, 32, 128, 2, 8, 512),
                "model_step_1024_bf16": (2, 32, 128, 2, 8, 512, "bf16"), "model_decode": (4, 8, 128, 2, 8),
                "decode_135m": (4, 4, 1, 512, 4), "decode_mixed": (3, 4, 3, 1, 512, 4), "host_call": (64, 10),
                "linear_64": (64, 0, 10), "lora_64": (64, 4, 10), "linear_576": (576, 0, 5), "lora_576": (576, 4, 5),
                "linear_4096": (256, 0, 2), "lora_4096": (256, 4, 2)}
CASES: dict[str, tuple[Callable[..., dict[str, Impl]], bool]] = {
    "dequantize": (dequantize_case, False),
    "dequantize_out": (dequantize_out_case, False),
    "matmul_m1": (matmul_case, True),
    "matmul_m512": (matmul_case, True),
    "matmul_m512_bf16": (matmul_case, True),
    "layer": (layer_case, True),
    "layer_bf16": (layer_case, True),
    "model_step": (model_step_case, True),
    "model_step_1024": (model_step_case, True),
    "model_step_1024_bf16": (model_step_case, True),
    "model_decode": (model_decode_case, True),
    "decode_135m": (decode_135m_case, True),
    "decode_mixed": (decode_mixed_case, False),
    "host_call": (host_call_case, False),
    **{f"{kind}_{size}": (layer_call_case, False) for kind in ("linear", "lora") for size in (64, 576, 4096)},
}


# Optional packages a case cannot run without; a missing one skips the case with a note.
# (A missing bitsandbytes or peft only leaves that column empty.)
REQUIRES = {"model_step": ("transformers",), "model_step_1024": ("transformers",),
            "model_step_1024_bf16": ("transformers",), "model_decode": ("transformers",),
            "decode_135m": ("transformers",), "decode_mixed": ("transformers",)}
# Cases in bf16 run where the CPU multiplies bf16 natively; elsewhere torch's bf16 products
# are slower than its fp32 ones, and no one trains that way.
NATIVE_BF16_CASES = ("matmul_m512_bf16", "layer_bf16", "model_step_1024_bf16")
INSTALL_HINT = "pip install 'fastlora[bench]'"


def missing_packages(key: str) -> list[str]:
    missing = []
    for name in REQUIRES.get(key, ()):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def title(key: str, quick: bool) -> str:
    shape = (QUICK_SHAPES if quick else FULL_SHAPES)[key]
    if key == "dequantize":
        return f"dequantize nf4 {shape[0]}x{shape[1]} -> fp32"
    if key == "dequantize_out":
        return f"dequantize nf4 {shape[0]}x{shape[1]} -> fp32 into a reused out= (bitsandbytes: no CPU out=)"
    if key.startswith("layer"):
        m, n, k, r, *dtype = shape
        return f"Linear4bit + LoRA r={r} fwd+bwd {(dtype or ['fp32'])[0]} M={m} {n}x{k}"
    if key.startswith("model_step"):
        rows, length, hidden, layers, r, *rest = shape
        vocab = f" vocab {rest[0]}" if rest else ""
        dtype = "bf16 autocast" if rest[1:] == ["bf16"] else "fp32"
        return (f"QLoRA step (fwd+bwd, full checkpointing) {dtype} Llama {layers}x{hidden}{vocab} r={r}, "
                f"{rows}x{length} tokens")
    if key == "model_decode":
        prompt, tokens, hidden, layers, r = shape
        return f"greedy decode with KV cache fp32 Llama {layers}x{hidden} r={r}, {tokens} tokens after {prompt}"
    if key == "decode_135m":
        prompt, tokens, layers, vocab, r = shape
        return (f"greedy decode with KV cache fp32 SmolLM-135M shape ({layers} layers, vocab {vocab}) r={r}, "
                f"{tokens} tokens after {prompt}")
    if key == "decode_mixed":
        rows, prompt, tokens, layers, vocab, r = shape
        return (f"greedy decode, {rows} rows on {rows} adapters (bitsandbytes: peft adapter_names=), fp32 "
                f"SmolLM-135M shape ({layers} layers, vocab {vocab}) r={r}, {tokens} tokens after {prompt}")
    if key == "host_call":
        size, calls = shape
        return f"matmul_4bit {calls} one-row calls {size}x{size} (native: the kernel alone)"
    if key.startswith(("linear_", "lora_")):
        size, r, calls = shape
        layer = f"LoraLinear r={r}" if r else "Linear4bit"
        return f"{layer} {calls} one-row calls {size}x{size}, no grad"
    m, n, k, *dtype = shape
    return f"matmul_4bit {(dtype or ['fp32'])[0]} M={m} {n}x{k}"


def build(key: str, quick: bool) -> dict[str, Impl]:
    return CASES[key][0](*(QUICK_SHAPES if quick else FULL_SHAPES)[key])


def _median_ms(impls: dict[str, Impl], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for fn in impls.values():
        fn()  # warm-up: first-call costs are not the steady state
    for _ in range(repeats):
        for name, fn in impls.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _release_free_heap() -> None:
    """Returns the heap's free pages to the system (glibc's `malloc_trim`). Without it a call's
    growth depended on how much freed memory building the models happened to leave in the
    heap: the same case measured 1.6 or 16 MiB for bitsandbytes and 15, 59 or 75 MiB for
    fastlora in fresh processes (benches/CPU_NOTES.md)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the growth is measured against whatever the heap holds


def memory_probe(case: str, impl: str, quick: bool) -> float:
    """Peak RSS growth (MiB) of one call of `impl` in `case`, in this (fresh) process."""
    fn = build(case, quick)[impl]
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _peak_mib(case: str, impl: str, quick: bool) -> float | None:
    code = (
        "import sys, fastlora.bench as b; "
        f"print(b.memory_probe({case!r}, {impl!r}, {quick!r}))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def run_case(key: str, quick: bool, repeats: int) -> Case:
    measure_memory = CASES[key][1]
    impls = build(key, quick)
    case = Case(title(key, quick), _median_ms(impls, repeats))
    del impls
    if measure_memory and sys.platform == "linux":
        for impl in case.times_ms:
            peak = _peak_mib(key, impl, quick)
            if peak is not None:
                case.peak_mib[impl] = peak
    return case


def format_table(cases: list[Case]) -> str:
    lines = [
        "| case | fastlora ms | bitsandbytes ms | dense ms | vs bitsandbytes | vs dense "
        "| peak MiB fastlora / bnb / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        t = case.times_ms
        ours = t["fastlora"]
        bnb = t.get("bitsandbytes")
        dense = t.get("dense", t.get("dense copy"))
        mem = " / ".join(f"{case.peak_mib[k]:.0f}" if k in case.peak_mib else "-"
                         for k in ("fastlora", "bitsandbytes", "dense"))
        cells = [f"{ours:.2f}", "-" if bnb is None else f"{bnb:.2f}", "-" if dense is None else f"{dense:.2f}",
                 "-" if bnb is None else f"{bnb / ours:.2f}x faster",
                 "-" if dense is None else f"{ours / dense:.2f}x the time"]
        lines.append(f"| {case.name} | {' | '.join(cells)} | {mem} |")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": fastlora.get_num_threads(),
        "thread_pool": fastlora.thread_pool(),
        "simd": fastlora.simd_level(),
        "fp32_gemm": fastlora.fp32_gemm(),
        "torch": torch.__version__,
        "bitsandbytes": _version("bitsandbytes"),
        "python": platform.python_version(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(quick: bool = False, repeats: int | None = None, json_path: str | None = None,
        cases: list[str] | None = None) -> list[Case]:
    """Runs the suite, prints a markdown table, optionally writes JSON; returns the cases."""
    repeats = repeats or (3 if quick else 9)
    keys = cases or list(CASES)
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        raise ValueError(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    info = machine()
    print(f"fastlora bench {info['date']}: {info['cpu']}, {info['threads']} threads ({info['thread_pool']}), "
          f"simd={info['simd']}, fp32 GEMM {info['fp32_gemm']}, "
          f"torch {info['torch']}, bitsandbytes {info['bitsandbytes'] or 'not installed'}, median of {repeats}")
    if info["bitsandbytes"] is None:
        print(f"note: bitsandbytes is not installed, so its column stays empty ({INSTALL_HINT})")
    results = []
    for key in keys:
        missing = missing_packages(key)
        if missing:
            print(f"note: skipped {title(key, quick)}: needs {', '.join(missing)} ({INSTALL_HINT})", flush=True)
            continue
        if key in NATIVE_BF16_CASES and not fastlora.native_bf16():
            print(f"note: skipped {title(key, quick)}: this CPU has no native bf16 (AMX-BF16 or AVX512-BF16)",
                  flush=True)
            continue
        results.append(run_case(key, quick, repeats))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
        if "native" in results[-1].times_ms:
            calls = (QUICK_SHAPES if quick else FULL_SHAPES)[key][-1]
            host_us = (results[-1].times_ms["fastlora"] - results[-1].times_ms["native"]) / calls * 1e3
            print(f"note: host time of fastlora.matmul_4bit above the native kernel: {host_us:.1f} us per call")
        if "one adapter" in results[-1].times_ms:
            times = results[-1].times_ms
            print(f"note: the mixed batch takes {times['fastlora'] / times['one adapter']:.2f}x the time of the same "
                  "batch on one adapter")
    print()
    print(format_table(results))
    if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"machine": info, "repeats": repeats, "cases": [asdict(c) for c in results]}, f, indent=2)
        os.replace(tmp, json_path)
    return results
