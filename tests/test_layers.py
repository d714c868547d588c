"""The torch layer: the differentiable custom ops (`fastlora::matmul_4bit`,
`fastlora::lora_linear_4bit`) against a float64 dense computation, `Linear4bit` (its
bitsandbytes state dict, device/dtype moves, bad state dicts), `LoraLinear` (PEFT's
semantics, dropout, merging) and `torch.compile(fullgraph=True)` over fastlora layers.

The float64 references use the exact fp32 weight the kernels multiply by (code value times
fp32 block scale, decoded here by `fastlora.reference`, not by the Rust kernels).
"""

from __future__ import annotations

import copy
import math

import bitsandbytes as bnb
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
import oracles
from fastlora import reference
from fastlora.formats import dynamic_map
from fastlora.ops import _eager

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANT_TYPES = ("nf4", "fp4")
# Error allowed relative to the magnitude bound sum(|a| * |b|) of each output element:
# fp32 accumulation over up to ~200 terms, or one rounding to a 16-bit type (and a few more
# for the LoRA term, which is added to y after it is rounded to y's dtype).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand(shape, dtype=torch.float32, gen=None, scale=None) -> torch.Tensor:
    """Normal values at a random scale (never all zeros)."""
    if scale is None:
        scale = 10 ** (torch.rand((), generator=gen).item() * 2 - 1)
    return (torch.randn(shape, generator=gen) * scale + 0.01).to(dtype)


def exact_weight(packed: torch.Tensor, state: fastlora.QuantState) -> torch.Tensor:
    """The float64 weight the kernels multiply by, decoded by the plain-PyTorch reference."""
    scales = state.absmax_fp32()
    return reference.dequantize_4bit(
        packed, scales, state.blocksize, state.quant_type, state.shape, torch.float32
    ).double()


def layer_weight(layer: fastlora.Linear4bit) -> torch.Tensor:
    return exact_weight(layer.packed_bytes(), layer.quant_state)


def assume_representable(dtype: torch.dtype, *bounds: torch.Tensor) -> None:
    """Discards an example whose results may exceed the dtype's range (fp16 tops out at 65504):
    such a result is inf in any implementation, not an error of the kernel's."""
    limit = torch.finfo(dtype).max / 2
    assume(all(bound.max().item() < limit for bound in bounds))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected).abs()
    # Plus a few units of the subnormal spacing: fp16 outputs below ~6e-5 lose relative precision.
    finfo = torch.finfo(actual.dtype)
    limit = tol * bound + 4 * finfo.tiny * finfo.eps
    ratio = err / limit
    i = ratio.argmax()
    assert ratio.reshape(-1)[i] <= 1.0, (
        f"{what}: error {err.reshape(-1)[i].item():.3g} at {actual.reshape(-1)[i].item():.6g} (expected "
        f"{expected.reshape(-1)[i].item():.6g}) is {ratio.reshape(-1)[i].item():.3g}x the allowed error"
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict, as raw bytes, plus each parameter's requires_grad."""
    out = {k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in module.state_dict().items()}
    out.update({f"{k}.requires_grad": torch.tensor(p.requires_grad) for k, p in module.named_parameters()})
    out.update({f"{k}.dtype:{v.dtype}": torch.tensor(0) for k, v in module.state_dict().items()})
    return out


def assert_unchanged(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = snapshot(module)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed"


# ---------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------

shapes = st.sampled_from([(33, 65), (65, 33), (130, 64), (16, 130), (1, 33), (64, 1)])
batch_shapes = st.sampled_from([(1,), (3,), (2, 5), (17,), (4, 7), (2, 1, 3)])
blocksizes = st.sampled_from([32, 64, 128, 256])


@FAST
@given(
    nk=shapes, batch=batch_shapes, blocksize=blocksizes, quant_type=st.sampled_from(QUANT_TYPES),
    dtype=st.sampled_from(DTYPES), nested=st.booleans(), with_bias=st.booleans(), seed=st.integers(0, 2**32 - 1),
)
def test_matmul_4bit_forward_and_backward_against_float64(nk, batch, blocksize, quant_type, dtype, nested, with_bias,
                                                          seed):
    g = torch.Generator().manual_seed(seed)
    n, k = nk
    packed, state = fastlora.quantize_4bit(rand((n, k), dtype, g), blocksize=blocksize, quant_type=quant_type,
                                           compress_statistics=nested)
    w = exact_weight(packed, state)
    x = rand((*batch, k), dtype, g).requires_grad_()
    bias = rand((n,), dtype, g).requires_grad_() if with_bias else None

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fastlora.matmul_4bit(x, packed, state, bias)
    # Only the packed weight and its block scales as stored are kept for backward (uint8
    # codes plus the second-level state when double-quantized): never a dense weight, nor x.
    blocks = -(-n * k // blocksize)
    scales = ([("torch.uint8", blocks), ("torch.float32", -(-blocks // 256)), ("torch.float32", 256),
               ("torch.float32", 1)] if nested else [("torch.float32", blocks)])
    assert sorted((str(t.dtype), t.numel()) for t in saved) == sorted(
        [("torch.uint8", packed.numel()), *scales]
    ), [(t.dtype, t.shape) for t in saved]

    assert y.dtype == dtype and y.shape == (*batch, n)
    x64 = x.detach().double()
    expected = x64 @ w.t() + (bias.detach().double() if with_bias else 0)
    bound = x64.abs() @ w.abs().t() + (bias.detach().double().abs() if with_bias else 0)
    assume_representable(dtype, bound)
    assert_within(y, expected, bound, TOL[dtype], "y")

    grad = rand(y.shape, dtype, g)
    y.backward(grad)
    g64 = grad.double()
    assume_representable(dtype, g64.abs() @ w.abs())
    assert x.grad.dtype == dtype
    assert_within(x.grad, g64 @ w, g64.abs() @ w.abs(), TOL[dtype], "dx")
    if with_bias:
        rows = g64.reshape(-1, n)
        assert_within(bias.grad, rows.sum(0), rows.abs().sum(0), TOL[dtype], "dbias")


@FAST
@given(
    nk=shapes, batch=batch_shapes, r=st.integers(1, 9), blocksize=blocksizes, quant_type=st.sampled_from(QUANT_TYPES),
    dtype=st.sampled_from(DTYPES), nested=st.booleans(), bias_mode=st.sampled_from(["none", "frozen", "trainable"]),
    bias_fp32=st.booleans(), separate_drop=st.booleans(), scaling=st.sampled_from([0.5, 2.0, 16 / math.sqrt(3)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_lora_linear_4bit_op_gradients_against_float64(nk, batch, r, blocksize, quant_type, dtype, nested, bias_mode,
                                                       bias_fp32, separate_drop, scaling, seed):
    """y = x @ W.T + bias + scaling * (x_drop @ A.T) @ B.T, with fp32 adapters over every
    activation dtype; grads in x, x_drop (dropout's output), bias, A and B."""
    g = torch.Generator().manual_seed(seed)
    n, k = nk
    packed, state = fastlora.quantize_4bit(rand((n, k), dtype, g), blocksize=blocksize, quant_type=quant_type,
                                           compress_statistics=nested)
    w = exact_weight(packed, state)
    x = rand((*batch, k), dtype, g).requires_grad_()
    # x_drop is either a separate tensor (dropout's output) or x itself (no dropout).
    x_drop = rand((*batch, k), dtype, g).requires_grad_() if separate_drop else x
    bias = None
    if bias_mode != "none":
        bias = rand((n,), torch.float32 if bias_fp32 else dtype, g).requires_grad_(bias_mode == "trainable")
    A = rand((r, k), torch.float32, g).requires_grad_()
    B = rand((n, r), torch.float32, g).requires_grad_()

    y = torch.ops.fastlora.lora_linear_4bit(
        x, x_drop, packed.reshape(-1), state.block_scales().decoded(), bias, A, B, scaling, blocksize, quant_type
    )
    assert y.dtype == dtype and y.shape == (*batch, n)

    leaves = {"x": x, "A": A, "B": B}
    if separate_drop:
        leaves["x_drop"] = x_drop
    if bias is not None:
        leaves["bias"] = bias
    ref = {name: t.detach().double().requires_grad_(t.requires_grad) for name, t in leaves.items()}
    xd64 = ref["x_drop"] if separate_drop else ref["x"]
    b64 = ref["bias"] if bias is not None else 0
    expected = ref["x"] @ w.t() + b64 + scaling * (xd64 @ ref["A"].t()) @ ref["B"].t()
    a = {name: t.detach().double().abs() for name, t in ref.items()}
    ad = a["x_drop"] if separate_drop else a["x"]
    bound = a["x"] @ w.abs().t() + (a["bias"] if bias is not None else 0) + scaling * (ad @ a["A"].t()) @ a["B"].t()
    assume_representable(dtype, bound)
    assert_within(y, expected, bound, TOL[dtype], "y")

    grad = rand(y.shape, dtype, g)
    y.backward(grad)
    expected.backward(grad.double())
    g64 = grad.double().abs()
    gu = scaling * g64 @ a["B"]  # |dL/du| bound, u = x_drop @ A.T
    bounds = {
        "x": g64 @ w.abs() + (gu @ a["A"] if not separate_drop else 0),
        "x_drop": gu @ a["A"],
        "A": gu.reshape(-1, r).t() @ ad.reshape(-1, k),
        "B": scaling * g64.reshape(-1, n).t() @ (ad @ a["A"].t()).reshape(-1, r),
        "bias": g64.reshape(-1, n).sum(0),
    }
    assume_representable(dtype, *bounds.values())
    for name, t in leaves.items():
        if not t.requires_grad:
            assert t.grad is None
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, name
        # The adapters' grads are computed in the adapters' dtype (fp32) whatever x's dtype.
        tol = TOL[torch.float32] * 2 if name in ("A", "B") else TOL[t.dtype]
        assert_within(t.grad, ref[name].grad, bounds[name], tol, f"d{name}")


def test_lora_op_saves_no_dense_weight(gen):
    layer = fastlora.LoraLinear(fastlora.Linear4bit(130, 96), r=4, init_lora_weights=False)
    x = rand((5, 130), gen=gen).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert saved and all(t.numel() < 96 * 130 or t.dtype == torch.uint8 for t in saved)


@pytest.mark.parametrize(
    "op,args",
    [
        ("matmul_4bit", lambda p, s, x: (x, p, s, 33, 65, 64, "nf4", False)),
        ("matmul_4bit", lambda p, s, x: (torch.randn(3, 33, requires_grad=True), p, s, 33, 65, 64, "nf4", True)),
        ("lora_linear_4bit", lambda p, s, x: (
            x, x.detach().clone().requires_grad_(), p, s, torch.randn(33, requires_grad=True),
            torch.randn(4, 65, requires_grad=True), torch.randn(33, 4, requires_grad=True), 2.0, 64, "nf4")),
        ("lora_linear_4bit", lambda p, s, x: (
            x.bfloat16(), x.bfloat16(), p, s, None, torch.randn(4, 65, requires_grad=True),
            torch.randn(33, 4, requires_grad=True), 0.5, 64, "nf4")),
        ("dequantize_4bit", lambda p, s, x: (p, s, 64, "nf4", [33, 65], torch.bfloat16)),
        ("quantize_4bit", lambda p, s, x: (x.detach().bfloat16(), 32, "fp4")),
    ],
)
def test_custom_ops_pass_opcheck(op, args):
    """Schema, fake implementation (shapes for torch.compile), autograd registration."""
    packed, state = fastlora.quantize_4bit(torch.randn(33, 65), blocksize=64)
    x = torch.randn(3, 65, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.fastlora, op).default, args(packed.reshape(-1), state.absmax, x))


def test_nested_scale_ops_pass_opcheck():
    packed, state = fastlora.quantize_4bit(torch.randn(64, 96), blocksize=32, compress_statistics=True)
    s2 = state.state2
    nested = (s2.absmax, s2.code, state.offset, 256)
    p = packed.reshape(-1)
    x = torch.randn(3, 96, requires_grad=True)
    # The 4-bit ops with double-quantized scales passed as stored (decoded inside the op).
    torch.library.opcheck(torch.ops.fastlora.matmul_4bit.default,
                          (x, p, state.absmax, 64, 96, 32, "nf4", False, *nested))
    torch.library.opcheck(torch.ops.fastlora.lora_linear_4bit.default, (
        x, x, p, state.absmax, None, torch.randn(4, 96, requires_grad=True), torch.randn(64, 4, requires_grad=True),
        2.0, 32, "nf4", *nested))
    torch.library.opcheck(torch.ops.fastlora.dequantize_4bit.default,
                          (p, state.absmax, 32, "nf4", [64, 96], torch.float16, *nested))
    torch.library.opcheck(torch.ops.fastlora.dequantize_4bit_out.default,
                          (p, state.absmax, 32, "nf4", *nested), {"out": torch.full((64, 96), float("nan"))})
    torch.library.opcheck(torch.ops.fastlora.dequantize_blockwise.default,
                          (state.absmax, s2.absmax, s2.code, 256, state.offset))
    torch.library.opcheck(torch.ops.fastlora.quantize_blockwise.default, (state.block_scales().decoded(), s2.code, 256))


# ---------------------------------------------------------------------------------------------
# Linear4bit
# ---------------------------------------------------------------------------------------------


def test_public_signatures():
    import inspect

    def defaults(fn):
        return {name: p.default for name, p in inspect.signature(fn).parameters.items()}

    assert defaults(fastlora.Linear4bit) == {
        "in_features": inspect.Parameter.empty, "out_features": inspect.Parameter.empty, "bias": True,
        "compute_dtype": None, "compress_statistics": True, "quant_type": "nf4", "blocksize": 64,
        "quant_storage": torch.uint8, "device": None,
    }
    assert defaults(fastlora.matmul_4bit) == {"x": inspect.Parameter.empty, "packed": inspect.Parameter.empty,
                                              "quant_state": inspect.Parameter.empty, "bias": None}
    prepare = defaults(fastlora.prepare_model)
    assert {k: prepare[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "quant_type",
                                    "compress_statistics", "blocksize", "compute_dtype")} == {
        "r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0, "use_rslora": False,
        "quant_type": "nf4", "compress_statistics": True, "blocksize": 64, "compute_dtype": None,
    }


def test_linear4bit_constructor_defaults_and_forward(gen):
    layer = fastlora.Linear4bit(65, 33)
    assert (layer.quant_type, layer.blocksize, layer.compress_statistics) == ("nf4", 64, True)
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert layer.weight.numel() == (65 * 33 + 1) // 2
    assert layer.bias.shape == (33,) and layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["bias"]
    # Initialized as nn.Linear: kaiming-uniform, bound 1/sqrt(in_features) before quantization
    # (the double-quantized scales may round a block's maximum up by under 1%).
    w = layer.dequantize()
    assert w.shape == (33, 65) and w.dtype == torch.float32
    assert 0.5 / math.sqrt(65) < w.abs().max() <= 1.01 / math.sqrt(65)
    x = rand((4, 65), gen=gen)
    torch.testing.assert_close(layer(x).double(), x.double() @ layer_weight(layer).t() + layer.bias.double(),
                               rtol=1e-5, atol=1e-6)
    no_bias = fastlora.Linear4bit(64, 32, bias=False, quant_type="fp4", blocksize=128, compress_statistics=False)
    assert no_bias.bias is None and no_bias.absmax.dtype == torch.float32 and no_bias.absmax.numel() == 16
    assert "fp4" in repr(no_bias)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"in_features": 0}, ValueError),
        ({"out_features": True}, ValueError),
        ({"in_features": 3.0}, ValueError),
        ({"compute_dtype": torch.float64}, ValueError),
        ({"quant_type": "int4"}, ValueError),
        ({"blocksize": 48}, ValueError),
        ({"quant_storage": "uint8"}, TypeError),
        ({"quant_storage": torch.int64, "in_features": 3, "out_features": 3}, ValueError),
    ],
)
def test_linear4bit_rejects_bad_arguments(kwargs, error):
    args = {"in_features": 64, "out_features": 32, **kwargs}
    with pytest.raises(error, match=next(iter(kwargs))):
        fastlora.Linear4bit(**args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_from_linear_quantizes_the_weight_and_copies_the_bias(dtype, quant_type, gen):
    linear = nn.Linear(130, 33).to(dtype)
    layer = fastlora.Linear4bit.from_linear(linear, quant_type=quant_type, blocksize=32)
    packed, state = fastlora.quantize_4bit(linear.weight.detach(), blocksize=32, quant_type=quant_type,
                                           compress_statistics=True)
    assert torch.equal(layer.packed_bytes(), packed.reshape(-1))
    assert layer.weight_dtype == dtype and layer.dequantize().dtype == dtype
    assert torch.equal(layer.dequantize(), fastlora.dequantize_4bit(packed, state))
    assert torch.equal(layer.bias, linear.bias) and layer.bias.data_ptr() != linear.bias.data_ptr()
    assert layer.bias.requires_grad
    x = rand((3, 130), dtype, gen)
    y = layer(x)
    assert y.dtype == dtype
    bound = x.double().abs() @ layer_weight(layer).abs().t() + linear.bias.double().abs()
    assert_within(y, x.double() @ layer_weight(layer).t() + linear.bias.double(), bound, TOL[dtype], "y")


def test_from_linear_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        fastlora.Linear4bit.from_linear(nn.Conv1d(3, 3, 1))
    for reserved in ("in_features", "bias", "device"):
        with pytest.raises(TypeError, match=reserved):
            fastlora.Linear4bit.from_linear(nn.Linear(8, 8), **{reserved: 8})
    with pytest.raises(TypeError, match="unexpected"):
        fastlora.Linear4bit.from_linear(nn.Linear(8, 8), rank=3)
    with pytest.raises(ValueError, match="compute_dtype"):
        fastlora.Linear4bit.from_linear(nn.Linear(8, 8), compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="quant_type"):
        fastlora.Linear4bit.from_linear(nn.Linear(8, 8), quant_type="nf8")
    with pytest.raises(ValueError, match="NaN"):
        linear = nn.Linear(8, 8)
        with torch.no_grad():
            linear.weight[0, 0] = float("nan")
        fastlora.Linear4bit.from_linear(linear)


def test_linear4bit_rejects_inputs_that_do_not_fit(gen):
    layer = fastlora.Linear4bit(64, 32)
    with pytest.raises(ValueError, match="64"):
        layer(rand((2, 32), gen=gen))
    with pytest.raises(ValueError, match="64"):
        layer(rand((2, 2, 32), gen=gen))
    with pytest.raises(TypeError, match="float64"):
        layer(rand((2, 64), torch.float64, gen))
    lora = fastlora.LoraLinear(layer, r=2)
    with pytest.raises(ValueError, match="64"):
        lora(rand((3, 32), gen=gen))


def test_compute_dtype_sets_the_product_dtype_and_keeps_the_input_dtype(gen):
    layer = fastlora.Linear4bit(64, 48, compute_dtype=torch.bfloat16)
    x = rand((5, 64), gen=gen)
    y = layer(x)
    assert y.dtype == torch.float32
    # The product and the bias run in bf16 (output rounded to bf16), then come back to fp32.
    xb = x.bfloat16()
    expected = (fastlora.matmul_4bit(xb, layer.weight, layer.quant_state) + layer.bias.bfloat16()).float()
    assert torch.equal(y, expected)


def bnb_layer(in_features, out_features, quant_type, nested, quant_storage=torch.uint8, bias=True):
    """A bitsandbytes Linear4bit, quantized on CPU (`.to("cpu")` quantizes a fresh layer)."""
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compress_statistics=nested, quant_type=quant_type,
                              quant_storage=quant_storage)
    with torch.no_grad():
        layer.weight.data.normal_(0, 0.3)
        if bias:
            layer.bias.normal_()
    return layer.to("cpu")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_state_dict_matches_bitsandbytes_and_loads_from_it(quant_type, nested, quant_storage, gen):
    ref = bnb_layer(96, 40, quant_type, nested, quant_storage)
    assert ref.weight.bnb_quantized
    sd = ref.state_dict()
    # Load into a layer built with other settings: the state dict decides.
    layer = fastlora.Linear4bit(96, 40, quant_type=quant_type, compress_statistics=not nested, blocksize=128,
                                quant_storage=quant_storage)
    layer.load_state_dict(sd)
    assert layer.compress_statistics == nested and layer.blocksize == 64
    x = rand((2, 3, 96), gen=gen)
    with torch.no_grad():
        expected = oracles.matmul(x, ref.weight.t(), ref.weight.quant_state, bias=ref.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)

    ours = layer.state_dict()
    assert list(ours) == list(sd)  # the same keys, in bitsandbytes' order
    for key in sd:
        assert ours[key].dtype == sd[key].dtype and ours[key].shape == sd[key].shape, key
        assert torch.equal(ours[key].view(torch.uint8), sd[key].view(torch.uint8)), key
    assert f"weight.quant_state.bitsandbytes__{quant_type}" in ours
    assert ("weight.nested_absmax" in ours) == nested

    # Loaded tensors are copies, not aliases of the state dict's tensors.
    own = dict(layer.named_buffers()) | dict(layer.named_parameters())
    source_ptrs = {t.data_ptr() for t in sd.values()}
    assert not any(t.data_ptr() in source_ptrs for t in own.values())


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("nested", [True, False])
def test_own_state_dict_round_trips_byte_identical_and_into_bitsandbytes(quant_type, nested, gen):
    src = fastlora.Linear4bit.from_linear(nn.Linear(130, 33), quant_type=quant_type, compress_statistics=nested,
                                          blocksize=32)
    sd = src.state_dict()
    dst = fastlora.Linear4bit(130, 33, quant_type=quant_type)
    dst.load_state_dict(sd)
    again = dst.state_dict()
    assert list(again) == list(sd)
    for key in sd:
        assert again[key].dtype == sd[key].dtype and torch.equal(again[key], sd[key]), key
    x = rand((4, 130), gen=gen)
    assert torch.equal(dst(x), src(x))

    # bitsandbytes reads it back as transformers does for a pre-quantized checkpoint.
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):  # bnb compiles for odd shapes
        expected = oracles.matmul(x, weight.t(), weight.quant_state, bias=sd["bias"])
    torch.testing.assert_close(src(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_moving_between_dtypes_and_devices_keeps_the_packed_bytes(quant_storage, gen):
    layer = fastlora.Linear4bit(64, 48, compress_statistics=True, quant_storage=quant_storage)
    before = {name: t.detach().clone() for name, t in layer._quant_tensors().items()}
    weight_dtype = layer.weight.dtype
    x = rand((3, 64), gen=gen)
    for move, bias_dtype in [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.float(), torch.float32),
        (lambda m: m.to("cpu"), torch.float32),
        (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16),
        (lambda m: m.float(), torch.float32),
    ]:
        assert move(layer) is layer
        assert layer.weight.dtype == weight_dtype and not layer.weight.requires_grad
        assert isinstance(layer.weight, nn.Parameter)
        for name, old in before.items():
            now = getattr(layer, name)
            assert now.dtype == old.dtype and torch.equal(now.reshape(-1).view(torch.uint8),
                                                          old.reshape(-1).view(torch.uint8)), name
        assert layer.bias.dtype == bias_dtype
        xd = x.to(bias_dtype)
        y = layer(xd)
        assert y.dtype == bias_dtype
        expected = fastlora.matmul_4bit(xd, layer.weight, layer.quant_state) + layer.bias
        assert torch.equal(y, expected)


def test_quant_storage_bfloat16_end_to_end(gen):
    linear = nn.Linear(64, 40)
    layer = fastlora.Linear4bit.from_linear(linear, quant_storage=torch.bfloat16)
    plain = fastlora.Linear4bit.from_linear(linear)
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.shape == (64 * 40 // 4, 1)
    assert torch.equal(layer.packed_bytes(), plain.packed_bytes())
    lora = fastlora.LoraLinear(layer, r=4, init_lora_weights=False)
    lora_plain = fastlora.LoraLinear(plain, r=4, init_lora_weights=False)
    lora_plain.load_state_dict(lora.state_dict())  # bf16-stored bytes into a uint8 layer
    x = rand((3, 64), gen=gen).requires_grad_()
    y = lora(x)
    assert torch.equal(y, lora_plain(x))
    y.sum().backward()
    assert lora.lora_A.weight.grad is not None and layer.weight.grad is None
    sd = layer.state_dict()
    assert sd["weight"].dtype == torch.bfloat16
    fresh = fastlora.Linear4bit(64, 40, quant_storage=torch.bfloat16)
    fresh.load_state_dict(sd)
    assert fresh.weight.dtype == torch.bfloat16 and torch.equal(fresh(x), layer(x))
    assert torch.equal(fastlora.dequantize_4bit(layer.weight, layer.quant_state), plain.dequantize())


# Bad state dicts: each raises naming the key and leaves the layer exactly as it was.


def _corrupt_json(sd, key="weight.quant_state.bitsandbytes__nf4"):
    sd[key] = torch.tensor(list(b'{"quant_type": "nf4", "blocksize": 64,'), dtype=torch.uint8)


def _json_entry(sd, **changes):
    import json

    key = "weight.quant_state.bitsandbytes__nf4"
    plain = json.loads(bytes(sd[key].tolist()))
    plain.update(changes)
    sd[key] = torch.tensor(list(json.dumps(plain).encode()), dtype=torch.uint8)


BAD_STATE_DICTS = [
    ("wrong shape", lambda sd, other: other, ValueError, r"weight: shape \(48, 64\)"),
    ("missing absmax", lambda sd, o: sd.pop("weight.absmax"), ValueError, r"weight\.absmax"),
    ("missing quant_map", lambda sd, o: sd.pop("weight.quant_map"), ValueError, r"weight\.quant_map"),
    ("missing nested", lambda sd, o: sd.pop("weight.nested_absmax"), ValueError, r"weight\.nested_absmax: missing"),
    ("missing json", lambda sd, o: sd.pop("weight.quant_state.bitsandbytes__nf4"), ValueError,
     r"weight\.quant_state\.bitsandbytes__nf4"),
    ("missing weight", lambda sd, o: sd.pop("weight"), RuntimeError, r"Missing key.*\"weight\""),
    ("missing bias", lambda sd, o: sd.pop("bias"), RuntimeError, r"Missing key.*\"bias\""),
    ("extra stat", lambda sd, o: sd.update({"weight.extra": torch.ones(2)}), RuntimeError,
     r"Unexpected key.*weight\.extra"),
    ("extra top-level", lambda sd, o: sd.update({"scale": torch.ones(2)}), RuntimeError, r"Unexpected key.*scale"),
    ("corrupt json", lambda sd, o: _corrupt_json(sd), ValueError, r"weight\.quant_state\.bitsandbytes__nf4.*JSON"),
    ("json shape", lambda sd, o: _json_entry(sd, shape=[64, 32]), ValueError, r"weight: shape \(64, 32\)"),
    ("json blocksize", lambda sd, o: _json_entry(sd, blocksize=48), ValueError, r"weight\.blocksize"),
    ("json dtype", lambda sd, o: _json_entry(sd, dtype="int8"), ValueError, r"weight\.dtype"),
    ("json unknown entry", lambda sd, o: _json_entry(sd, rank=3), ValueError, r"rank"),
    ("absmax dtype", lambda sd, o: sd.update({"weight.absmax": sd["weight.absmax"].float()}), ValueError,
     r"weight\.absmax.*dtype"),
    ("quant_map values", lambda sd, o: sd.update({"weight.quant_map": sd["weight.quant_map"] * 2}), ValueError,
     r"weight\.quant_map"),
    ("truncated weight", lambda sd, o: sd.update({"weight": sd["weight"][:-1]}), ValueError, r"weight: holds"),
    ("bias shape", lambda sd, o: sd.update({"bias": torch.ones(31)}), ValueError, r"bias.*\(32,\)"),
]


@pytest.mark.parametrize("case,corrupt,error,match", BAD_STATE_DICTS, ids=[c[0] for c in BAD_STATE_DICTS])
def test_bad_state_dict_raises_naming_the_key_and_changes_nothing(case, corrupt, error, match):
    layer = fastlora.Linear4bit(64, 32)
    sd = fastlora.Linear4bit(64, 32).state_dict()
    other = fastlora.Linear4bit(64, 48).state_dict()
    result = corrupt(sd, other)
    bad = result if isinstance(result, dict) else sd
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        layer.load_state_dict(bad)
    assert_unchanged(before, layer)


def test_another_quant_type_is_refused_in_a_model_and_changes_nothing():
    model = nn.Sequential(fastlora.Linear4bit(64, 32, quant_type="nf4"), nn.ReLU(),
                          fastlora.Linear4bit(32, 16, quant_type="nf4"))
    sd = nn.Sequential(fastlora.Linear4bit(64, 32, quant_type="fp4"), nn.ReLU(),
                       fastlora.Linear4bit(32, 16, quant_type="fp4")).state_dict()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"0\.weight\.quant_state.*fp4.*nf4"):
        model.load_state_dict(sd)
    assert_unchanged(before, model)


def test_lora_layer_load_is_all_or_nothing():
    layer = fastlora.LoraLinear(fastlora.Linear4bit(64, 32), r=4, init_lora_weights=False)
    sd = fastlora.LoraLinear(fastlora.Linear4bit(64, 32), r=8, init_lora_weights=False).state_dict()
    before = snapshot(layer)
    # The base layer fits and loads first; lora_A/lora_B do not (r=8 into r=4): rolled back.
    with pytest.raises(RuntimeError, match=r"lora_A\.weight.*size mismatch|size mismatch.*lora_A\.weight"):
        layer.load_state_dict(sd)
    assert_unchanged(before, layer)
    sd = fastlora.LoraLinear(fastlora.Linear4bit(64, 32), r=4).state_dict()
    del sd["lora_B.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key.*lora_B\.weight"):
        layer.load_state_dict(sd)
    assert_unchanged(before, layer)


def test_non_strict_load_takes_what_fits():
    layer = fastlora.Linear4bit(64, 32)
    src = fastlora.Linear4bit(64, 32)
    sd = src.state_dict()
    del sd["bias"]
    result = layer.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["bias"]
    assert torch.equal(layer.packed_bytes(), src.packed_bytes())


def test_nested_blocksize_is_honoured(gen):
    """A double-quantized state with a nested block size other than 256 decodes with it."""
    src = fastlora.Linear4bit(160, 64, blocksize=32, compress_statistics=False)  # 320 blocks
    scales = src.absmax
    offset = scales.mean()
    q, nested_absmax = torch.ops.fastlora.quantize_blockwise(scales - offset, dynamic_map(), 128)
    state = fastlora.QuantState(
        absmax=q, shape=(64, 160), code=src.quant_map, blocksize=32, quant_type="nf4", dtype=torch.float32,
        offset=offset, state2=fastlora.QuantState(absmax=nested_absmax, code=dynamic_map(),
                                                  blocksize=128, dtype=torch.float32),
    )
    sd = {"weight": src.weight, "bias": src.bias, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}
    layer = fastlora.Linear4bit(160, 64)
    layer.load_state_dict(sd)
    x = rand((2, 160), gen=gen)
    torch.testing.assert_close(layer(x), fastlora.matmul_4bit(x, src.weight, state, src.bias))
    torch.testing.assert_close(layer.quant_state.block_scales().decoded(), state.block_scales().decoded())
    assert layer.state_dict()["weight.quant_state.bitsandbytes__nf4"].tolist() == sd[
        "weight.quant_state.bitsandbytes__nf4"].tolist()


# ---------------------------------------------------------------------------------------------
# LoraLinear
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"r": 0}, ValueError, "r must"),
        ({"r": 2.0}, ValueError, "r must"),
        ({"r": True}, ValueError, "r must"),
        ({"lora_alpha": 0}, ValueError, "lora_alpha"),
        ({"lora_alpha": -2.0}, ValueError, "lora_alpha"),
        ({"lora_alpha": "16"}, ValueError, "lora_alpha"),
        ({"lora_dropout": 1.0}, ValueError, "lora_dropout"),
        ({"lora_dropout": -0.1}, ValueError, "lora_dropout"),
        ({"lora_dropout": float("nan")}, ValueError, "lora_dropout"),
        ({"init_lora_weights": "pissa"}, ValueError, "init_lora_weights"),
        ({"init_lora_weights": 1}, ValueError, "init_lora_weights"),
    ],
)
def test_lora_linear_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastlora.LoraLinear(nn.Linear(8, 8), **kwargs)


def test_lora_linear_rejects_other_base_layers():
    with pytest.raises(TypeError, match="base_layer"):
        fastlora.LoraLinear(nn.Conv1d(4, 4, 1))


@pytest.mark.parametrize("quantized", [True, False])
def test_default_init_leaves_the_output_unchanged(quantized, gen):
    base = fastlora.Linear4bit(96, 40) if quantized else nn.Linear(96, 40)
    layer = fastlora.LoraLinear(base, r=8, lora_alpha=16)
    assert layer.scaling == 2.0
    assert torch.equal(layer.lora_B.weight, torch.zeros(40, 8))
    a = layer.lora_A.weight
    assert a.shape == (8, 96) and a.dtype == torch.float32 and a.abs().max() <= 1 / math.sqrt(96)
    assert a.std() > 0.3 / math.sqrt(96)  # kaiming-uniform: std 1/sqrt(3 * 96)
    assert [n for n, p in layer.named_parameters() if p.requires_grad][-2:] == ["lora_A.weight", "lora_B.weight"]
    x = rand((2, 5, 96), gen=gen)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_gaussian_and_random_init(gen):
    layer = fastlora.LoraLinear(nn.Linear(512, 64), r=4, init_lora_weights="gaussian")
    assert torch.equal(layer.lora_B.weight, torch.zeros(64, 4))
    assert abs(layer.lora_A.weight.std().item() - 1 / 4) < 0.02  # 2048 samples of N(0, 1/r^2)
    random_b = fastlora.LoraLinear(nn.Linear(64, 64), r=4, init_lora_weights=False)
    assert random_b.lora_B.weight.abs().min() > 0
    x = rand((3, 64), gen=gen)
    assert not torch.allclose(random_b(x), random_b.base_layer(x))


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_forward_and_grads_match_the_formula(use_rslora, quantized, dtype, gen):
    linear = nn.Linear(65, 33).to(dtype)
    base = fastlora.Linear4bit.from_linear(linear, blocksize=32) if quantized else linear
    base.bias.requires_grad_(True)
    layer = fastlora.LoraLinear(base, r=5, lora_alpha=7, use_rslora=use_rslora, init_lora_weights=False)
    assert layer.scaling == pytest.approx(7 / math.sqrt(5) if use_rslora else 7 / 5)
    x = rand((2, 9, 65), dtype, gen).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 9, 33)

    w = layer_weight(base) if quantized else linear.weight.detach().double()
    x64 = x.detach().double().requires_grad_()
    a64 = layer.lora_A.weight.detach().double().requires_grad_()
    b64 = layer.lora_B.weight.detach().double().requires_grad_()
    bias64 = base.bias.detach().double().requires_grad_()
    expected = x64 @ w.t() + bias64 + layer.scaling * (x64 @ a64.t()) @ b64.t()
    bound = (x64.abs() @ w.abs().t() + bias64.abs() + layer.scaling * (x64.abs() @ a64.abs().t()) @ b64.abs().t())
    assert_within(y, expected.detach(), bound.detach(), TOL[dtype] * 2, "y")

    grad = rand(y.shape, dtype, gen)
    y.backward(grad)
    expected.backward(grad.double())
    g = grad.double().abs()
    gu = layer.scaling * g @ b64.detach().abs()
    xa = x64.detach().abs()
    assert_within(x.grad, x64.grad, g @ w.abs() + gu @ a64.detach().abs(), TOL[dtype] * 2, "dx")
    adapter_tol = TOL[torch.float32] * 2 if quantized or dtype == torch.float32 else TOL[dtype]
    assert_within(layer.lora_A.weight.grad, a64.grad, gu.reshape(-1, 5).t() @ xa.reshape(-1, 65), adapter_tol, "dA")
    assert_within(layer.lora_B.weight.grad, b64.grad,
                  layer.scaling * g.reshape(-1, 33).t() @ (xa @ a64.detach().abs().t()).reshape(-1, 5), adapter_tol,
                  "dB")
    assert_within(base.bias.grad, bias64.grad, g.reshape(-1, 33).sum(0), TOL[dtype], "dbias")
    if quantized:
        assert base.weight.grad is None


@pytest.mark.parametrize("quantized", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_applies_to_the_lora_path_only(quantized, dtype, gen):
    linear = nn.Linear(64, 48).to(dtype)
    base = fastlora.Linear4bit.from_linear(linear) if quantized else linear
    layer = fastlora.LoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    x = rand((6, 64), dtype, gen)
    seed = int(torch.randint(0, 2**31, (), generator=gen))

    layer.train()
    torch.manual_seed(seed)
    y = layer(x)
    # The same mask, drawn again from the same seed by the same dropout call.
    lora_in = x if quantized else x.to(torch.float32)
    torch.manual_seed(seed)
    dropped = nn.functional.dropout(lora_in, 0.5, training=True)
    assert (dropped == 0).any() and (dropped != 0).any()
    with torch.no_grad():
        base_out = base(x)
        lora = layer.scaling * (dropped.float() @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.float(), base_out.float() + lora, rtol=tol, atol=tol * lora.abs().max().item())
    # Not the mask-free output: the mask did apply to the LoRA path.
    with torch.no_grad():
        no_drop = layer.scaling * (x.float() @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    assert (y.float() - (base_out.float() + no_drop)).abs().max() > 10 * tol * no_drop.abs().max()

    # Gradients flow through the same mask: dx = g @ W + mask * (g @ B @ A) * scaling / (1 - p).
    xg = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    layer(xg).backward(torch.ones(6, 48, dtype=dtype))
    keep = (dropped != 0).float() / 0.5
    w = layer_weight(base).float() if quantized else linear.weight.detach().float()
    ones = torch.ones(6, 48)
    expected_dx = ones @ w + keep * (layer.scaling * ones @ layer.lora_B.weight.detach() @ layer.lora_A.weight.detach())
    torch.testing.assert_close(xg.grad.float(), expected_dx, rtol=tol, atol=tol * expected_dx.abs().max().item())

    # Eval: no dropout at all, deterministic.
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).float(), base_out.float() + no_drop, rtol=tol,
                                   atol=tol * no_drop.abs().max().item())
        assert torch.equal(layer(x), layer(x))


def test_merge_and_unmerge_over_a_dense_base(gen):
    layer = fastlora.LoraLinear(nn.Linear(64, 40), r=4, lora_alpha=8, init_lora_weights=False)
    w0 = layer.base_layer.weight.detach().clone()
    x = rand((5, 64), gen=gen)
    with torch.no_grad():
        y0 = layer(x)
        layer.merge()
        assert layer.merged
        expected_w = w0 + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        torch.testing.assert_close(layer.base_layer.weight, expected_w)
        torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
        layer.merge()  # merging twice is a no-op
        torch.testing.assert_close(layer.base_layer.weight, expected_w)
        merged = layer.merged_linear()
        torch.testing.assert_close(merged.weight, expected_w)
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
        layer.unmerge()  # a no-op
        torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)


def test_merged_linear_keeps_the_base_dtype_after_merge():
    layer = fastlora.LoraLinear(nn.Linear(32, 16).to(torch.bfloat16), r=2, init_lora_weights=False)
    unmerged = layer.merged_linear()
    layer.merge()
    merged = layer.merged_linear()
    assert unmerged.weight.dtype == merged.weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged.weight, unmerged.weight, rtol=2e-2, atol=1e-2)


def test_merge_into_a_4bit_base_raises():
    layer = fastlora.LoraLinear(fastlora.Linear4bit(64, 32), r=2)
    before = snapshot(layer)
    with pytest.raises(TypeError, match="merge_and_unload"):
        layer.merge()
    assert not layer.merged
    assert_unchanged(before, layer)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_merged_linear_over_a_4bit_base(compute_dtype, gen):
    base = fastlora.Linear4bit.from_linear(nn.Linear(64, 48), compute_dtype=compute_dtype, blocksize=32)
    layer = fastlora.LoraLinear(base, r=4, init_lora_weights=False)
    dense = layer.merged_linear()
    assert dense.weight.dtype == (compute_dtype or torch.float32) and not isinstance(dense, fastlora.Linear4bit)
    expected = layer_weight(base) + layer.delta_weight().double()
    torch.testing.assert_close(dense.weight.double(), expected.to(dense.weight.dtype).double())
    x = rand((3, 64), gen=gen)
    with torch.no_grad():
        w = layer_weight(base)
        delta = layer.delta_weight().double()
        bound = x.double().abs() @ (w.abs() + delta.abs()).t() + base.bias.double().abs()
        tol = 1e-5 if compute_dtype is None else 2e-2  # a few bf16 roundings (x, W, y) on each side
        assert_within(dense(x.to(dense.weight.dtype)).float(), layer(x).double(), bound, tol, "merged")


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def tiny_lora_model(dtype=torch.float32) -> nn.Sequential:
    model = nn.Sequential(
        fastlora.LoraLinear(fastlora.Linear4bit(32, 48, compress_statistics=True), r=4, init_lora_weights=False),
        nn.GELU(),
        fastlora.LoraLinear(fastlora.Linear4bit(48, 33, bias=False, quant_type="fp4", compress_statistics=False,
                                                blocksize=32), r=3, lora_alpha=6, use_rslora=True,
                            init_lora_weights=False),
        nn.Tanh(),
        fastlora.Linear4bit(33, 20),
    )
    return model.to(dtype)


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher_only_where_it_has_no_part(gen):
    """Without an autograd graph, tracing, modes or tensor subclasses the layers call the ops'
    implementations directly (`fastlora.ops._eager`): the same values as through the
    dispatcher, and every other case still goes through `torch.ops.fastlora`."""
    model = tiny_lora_model()
    x = rand((5, 32), gen=gen)
    plain = torch.ones(3)
    with torch.no_grad():
        assert _eager.direct(plain, None, nn.Parameter(plain))
        direct = model(x)
        with RecordOps() as mode:
            assert not _eager.direct(plain)
            recorded = model(x)
    assert {"fastlora.lora_linear_4bit.default", "fastlora.matmul_4bit.default"} <= mode.seen
    assert not _eager.direct(plain.clone().requires_grad_())
    assert not _eager.direct(torch.ones(3, device="meta"))
    assert not _eager.direct(FakeTensorMode().from_tensor(plain))  # a subclass, outside its mode
    while_tracing = []
    torch.jit.trace(lambda t: while_tracing.append(_eager.direct(t)) or t * 2, plain, check_trace=False)
    assert while_tracing == [False]
    through_autograd = model(x.clone().requires_grad_())  # the ops' own autograd Functions
    # The direct path adds the LoRA term in the same native call as the 4-bit product (up to
    # 16 rows), the op path in torch: the same sums in another order, equal to fp32 rounding.
    torch.testing.assert_close(direct, recorded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recorded, through_autograd.detach(), rtol=0, atol=0)
    assert torch.isfinite(direct).all()


def _dropout_lora_model() -> nn.Sequential:
    """`tiny_lora_model` with dropout on its first adapter (x_drop is then not x)."""
    model = tiny_lora_model()
    model[0] = fastlora.LoraLinear(model[0].base_layer, r=4, lora_dropout=0.25, init_lora_weights=False)
    return model


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("make_model", [tiny_lora_model, _dropout_lora_model])
def test_autograd_calls_skip_the_dispatcher_with_the_same_graph(monkeypatch, autocast, make_model, gen):
    """With an autograd graph (and under autocast) eager calls run the ops' own autograd
    Functions (`fastlora.ops._eager.call`): outputs and every gradient equal, bit for bit,
    to those through `torch.ops.fastlora`, which a mode (such as selective checkpointing's)
    still gets."""
    model = make_model()
    x = rand((6, 32), gen=gen)

    def step():
        grads = []
        for p in [*model.parameters()]:
            p.grad = None
        xg = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same dropout mask on both paths
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(xg)
        y.float().square().sum().backward()
        grads = [xg.grad] + [p.grad for p in model.parameters() if p.requires_grad]
        return y, grads

    layer_out = model[0](x.clone().requires_grad_())
    assert type(layer_out.grad_fn).__name__ == "LoraLinear4bitFunctionBackward"
    y, grads = step()
    with RecordOps() as mode:
        recorded, recorded_grads = step()
    assert {"fastlora.lora_linear_4bit.default", "fastlora.matmul_4bit.default"} <= mode.seen
    monkeypatch.setattr(_eager, "_autograd_direct", lambda tensors: False)
    assert type(model[0](x.clone().requires_grad_()).grad_fn).__name__.startswith("GeneratedBackwardFor_fastlora")
    dispatched, dispatched_grads = step()
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32) and len(grads) == 7
    for got in (recorded, dispatched):
        assert torch.equal(y, got)
    for got in (recorded_grads, dispatched_grads):
        for a, b in zip(grads, got, strict=True):
            assert a is not None and a.abs().sum() > 0 and torch.equal(a, b)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("last", ["lora", "linear4bit"])
def test_a_checkpointed_region_does_not_recompute_its_last_product(monkeypatch, autocast, early_stop, last, gen):
    """Under non-reentrant checkpointing the ops' saved tensors are saved ahead of their
    products (`fastlora.ops._eager`): the recomputation stops before the region's last 4-bit
    product (a LoRA layer's, or a frozen `Linear4bit`'s), and every gradient, over two
    backward passes of a retained graph, equals the uncheckpointed one bit for bit."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    from fastlora.backends import cpu as _cpu

    products = []
    product = _cpu.product
    monkeypatch.setattr(_cpu, "product", lambda x, *args: products.append(args[-1]) or product(x, *args))
    model = tiny_lora_model() if last == "linear4bit" else _dropout_lora_model()[:3]
    x = rand((6, 32), gen=gen)

    def step(checkpointed: bool):
        for p in model.parameters():
            p.grad = None
        xg = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same dropout mask in the forward and its recomputation
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), set_checkpoint_early_stop(early_stop):
            y = checkpoint(model, xg, use_reentrant=False) if checkpointed else model(xg)
            loss = y.float().square().sum()
            del products[:]
            loss.backward(retain_graph=True)
            recomputed = products.count(False)
            loss.backward()
        return y, [xg.grad] + [p.grad for p in model.parameters() if p.requires_grad], recomputed

    y, grads, _ = step(False)
    checkpointed, checkpointed_grads, recomputed = step(True)
    layers = sum(isinstance(m, (fastlora.LoraLinear, fastlora.Linear4bit)) for m in model)
    # Every layer's forward product ran again but the last's (without early stop: all of them).
    assert recomputed == (layers - 1 if early_stop else layers)
    assert torch.equal(y, checkpointed) and len(grads) >= 5  # x and two adapters at least
    for a, b in zip(grads, checkpointed_grads, strict=True):
        assert a is not None and a.abs().sum() > 0 and torch.equal(a, b)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_second_backward_through_a_4bit_op_raises_as_torch_does(checkpointed, gen):
    """Saved ahead (under checkpointing) or not, the op's tensors are gone after a backward
    without retain_graph: a second one raises torch's error (here nothing else saves)."""
    from torch.utils.checkpoint import checkpoint

    layer = fastlora.LoraLinear(fastlora.Linear4bit(32, 48), r=4, init_lora_weights=False)
    x = rand((5, 32), gen=gen).requires_grad_()
    loss = (checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def compare_compiled(backend: str, dtype: torch.dtype, gen, rtol: float, atol: float) -> None:
    torch._dynamo.reset()
    model = tiny_lora_model()
    for module in model.modules():
        if isinstance(module, (nn.Linear, fastlora.Linear4bit)) and module.bias is not None:
            module.bias.requires_grad_(True)
    model = model.to(dtype)
    x = rand((2, 7, 32), dtype, gen).requires_grad_()
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 6

    y = model(x)
    y.square().sum().backward()
    eager = [x.grad.clone()] + [p.grad.clone() for p in params]
    x.grad = None
    for p in params:
        p.grad = None

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    yc = compiled(x)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y, rtol=rtol, atol=atol)
    for got, want in zip([x.grad] + [p.grad for p in params], eager, strict=False):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * want.abs().max().item())
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_aot_eager_matches_eager(dtype, gen):
    compare_compiled("aot_eager", dtype, gen, rtol=0, atol=0)


def test_compile_fullgraph_dynamic_shapes(gen):
    """The fake implementations work with symbolic batch sizes: one graph for two shapes."""
    torch._dynamo.reset()
    model = tiny_lora_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in ((3, 32), (2, 9, 32)):
        x = rand(shape, gen=gen).requires_grad_()
        y = compiled(x)
        y.sum().backward()
        assert torch.equal(y, model(x))
    torch._dynamo.reset()


def test_compile_fullgraph_without_grad_matches_eager(gen):
    """Decoding compiles with gradients off, where eager calls skip the dispatcher."""
    torch._dynamo.reset()
    model = tiny_lora_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = rand((3, 32), gen=gen)
    with torch.no_grad():  # eager runs the native fused kernel, the graph the op: rounding differs
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_compile_fullgraph_inductor_matches_eager(gen):
    # Inductor fuses the surrounding elementwise ops differently: fp32 rounding differences only.
    compare_compiled("inductor", torch.float32, gen, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_functional_matmul(gen):
    torch._dynamo.reset()
    packed, state = fastlora.quantize_4bit(rand((33, 65), gen=gen), compress_statistics=True)
    bias = rand((33,), gen=gen).requires_grad_()
    x = rand((4, 65), gen=gen).requires_grad_()
    fn = torch.compile(lambda x, b: fastlora.matmul_4bit(x, packed, state, b), backend="aot_eager", fullgraph=True)
    y = fn(x, bias)
    y.sum().backward()
    grads = (x.grad.clone(), bias.grad.clone())
    x.grad = bias.grad = None
    fastlora.matmul_4bit(x, packed, state, bias).sum().backward()
    assert torch.equal(y, fastlora.matmul_4bit(x, packed, state, bias))
    assert torch.equal(grads[0], x.grad) and torch.equal(grads[1], bias.grad)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a, n, c, o: (a, n.half(), c, o), ValueError, "nested_absmax must be"),
        (lambda a, n, c, o: (a, n[:0], c, o), ValueError, "nested_absmax must be"),
        (lambda a, n, c, o: (a, n, c[:10], o), ValueError, "nested_code must be"),
        (lambda a, n, c, o: (a, n, c, None), ValueError, "nested_offset are required"),
        (lambda a, n, c, o: (a.float(), n, c, o), TypeError, "absmax must be uint8"),
        (lambda a, n, c, o: (a, None, None, None), TypeError, "absmax must be float32"),
        (lambda a, n, c, o: (a, n, c, o.reshape(1).repeat(2)), ValueError, "nested_offset must be one"),
    ],
)
def test_ops_reject_scale_arguments_that_do_not_fit(change, error, match):
    """The ops check the block-scale arguments themselves (the Triton kernels index the nested
    state by absmax's values), for each of the three 4-bit ops."""
    packed, state = fastlora.quantize_4bit(torch.randn(64, 96), compress_statistics=True)
    absmax, *nested = change(state.absmax, state.state2.absmax, state.state2.code, state.offset)
    flat, x = packed.reshape(-1), torch.randn(3, 96)
    calls = [
        lambda: torch.ops.fastlora.matmul_4bit(x, flat, absmax, 64, 96, 64, "nf4", False, *nested, 256),
        lambda: torch.ops.fastlora.dequantize_4bit(flat, absmax, 64, "nf4", [64, 96], torch.float32, *nested, 256),
        lambda: torch.ops.fastlora.lora_linear_4bit(x, x, flat, absmax, None, torch.randn(4, 96), torch.randn(64, 4),
                                                    1.0, 64, "nf4", *nested, 256),
    ]
    for call in calls:
        with pytest.raises(error, match=match):
            call()


# ---- call plans ---------------------------------------------------------------------------


def reference_output(layer: fastlora.Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """The layer's output from its current tensors, by the plain-PyTorch reference."""
    w = exact_weight(layer.packed_bytes(), layer.quant_state)
    y = x.double() @ w.t()
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("rows", [1, 20])  # the fused native path and the BLAS path
def test_a_plan_never_outlives_what_it_was_made_from(rows, gen):
    layer = fastlora.Linear4bit(64, 40, compress_statistics=True)
    x = rand((rows, 64), gen=gen)

    def check(msg):
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got.double(), reference_output(layer, x).to(got.dtype).double(), rtol=1e-4,
                                   atol=1e-4, msg=msg)
        assert layer._plan is not None

    check("first call")
    first = layer._plan
    check("second call")
    assert layer._plan is first  # kept while nothing changed

    other = fastlora.Linear4bit(64, 40, compress_statistics=False, blocksize=32)
    layer.load_state_dict(other.state_dict())  # reloaded: other scales, block size and bytes
    check("after load_state_dict")
    assert layer._plan is not first

    layer._quantize_from(torch.randn(40, 64))  # quantized again
    check("after quantizing again")

    before = layer._plan
    layer.to(torch.float64).to(torch.float32)  # moved (bias cast and back): a new plan
    check("after .to")
    assert layer._plan is not before

    with torch.no_grad():  # the packed weight's storage replaced in place (as FSDP2 does)
        layer.weight.data = layer.weight.data.clone()
    before = layer._plan
    check("after new weight storage")
    assert layer._plan is not before

    copied = copy.deepcopy(layer)  # copies make their own plan
    with torch.no_grad():
        assert torch.equal(copied(x), layer(x))


def assert_fp32_product_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                              bias: torch.Tensor | None = None) -> None:
    """y, an fp32 `x @ w.T (+ bias)` (w float64), against float64: within the error bound of
    k-term fp32 sums, (k + 3) units of rounding of sum |x||w| (+ |bias|) (the kernels multiply
    each block's sum by its scale; the values may cancel, so the result itself bounds nothing)."""
    expected = x.double() @ w.t()
    bound = x.double().abs() @ w.abs().t()
    if bias is not None:
        expected, bound = expected + bias.double(), bound + bias.double().abs()
    tol = 2 * (x.shape[-1] + 3) * 2**-24 * bound
    err = (y.double() - expected).abs()
    assert (err <= tol).all(), f"max error {err.max().item()} against a bound of {tol.flatten()[err.argmax()].item()}"


def test_functional_plans_follow_the_state(gen):
    """`fastlora.matmul_4bit` keeps a plan per QuantState; reassigning its fields, or passing
    other packed bytes, is seen on the next call."""
    w, x = rand((24, 64), gen=gen), rand((3, 64), gen=gen)
    packed, state = fastlora.quantize_4bit(w, compress_statistics=True)
    assert_fp32_product_close(fastlora.matmul_4bit(x, packed, state), x, exact_weight(packed, state))
    packed2, state2 = fastlora.quantize_4bit(rand((24, 64), gen=gen), compress_statistics=True)
    state.absmax, state.state2, state.offset = state2.absmax, state2.state2, state2.offset  # other scales
    assert_fp32_product_close(fastlora.matmul_4bit(x, packed, state), x, exact_weight(packed, state))
    assert_fp32_product_close(fastlora.matmul_4bit(x, packed2, state), x, exact_weight(packed2, state))
    with pytest.raises(ValueError, match="x must have shape"):
        fastlora.matmul_4bit(rand((3, 63), gen=gen), packed, state)  # a planned call still checks x


@pytest.mark.parametrize("case", ["non-contiguous x", "3-D x", "non-contiguous bias", "bias of another dtype",
                                  "rows above the fused kernel"])
def test_no_grad_calls_the_direct_path_declines_give_the_same_result(case, gen):
    """A one-row decode call goes straight to the native kernel; every other shape of call
    takes the general path, with the same values."""
    layer = fastlora.Linear4bit.from_linear(nn.Linear(64, 48))
    x = rand((3, 64), gen=gen)
    if case == "non-contiguous x":
        x = rand((64, 3), gen=gen).T
    elif case == "3-D x":
        x = rand((2, 3, 64), gen=gen)
    elif case == "non-contiguous bias":
        layer.bias = nn.Parameter(rand((96,), gen=gen)[::2])
    elif case == "bias of another dtype":
        layer.bias = nn.Parameter(rand((48,), torch.float64, gen=gen))
    else:
        x = rand((40, 64), gen=gen)
    expected = x.double() @ exact_weight(layer.weight, layer.quant_state).T + layer.bias.detach().double()
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], 48)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_from_quantized_rejects_what_does_not_fit(gen):
    packed, state = fastlora.quantize_4bit(rand((16, 64), gen=gen))
    layer = fastlora.Linear4bit.from_quantized(packed, state, bias=rand((16,), gen=gen))
    assert (layer.out_features, layer.in_features) == (16, 64) and torch.equal(layer.weight, packed)
    with pytest.raises(TypeError, match="quant_state"):
        fastlora.Linear4bit.from_quantized(packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match="packed holds 511 bytes"):
        fastlora.Linear4bit.from_quantized(packed[:-1], state)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        fastlora.Linear4bit.from_quantized(packed, state, bias=rand((15,), gen=gen))
    with pytest.raises(ValueError, match="compute_dtype"):
        fastlora.Linear4bit.from_quantized(packed, state, compute_dtype=torch.float64)
    _, flat_state = fastlora.quantize_4bit(rand((1024,), gen=gen))
    with pytest.raises(ValueError, match="out_features, in_features"):
        fastlora.Linear4bit.from_quantized(packed, flat_state)


@pytest.mark.parametrize("shape", [(32,), (3, 32), (2, 1, 32), (4, 4, 32), (17, 32)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [24, 32])  # 32: a square weight's output is made like x
def test_the_one_step_decoding_call_equals_the_op(shape, bias, out_features, gen):
    """`Linear4bit`'s one-step decoding call (`WeightPlan.decode`: up to 16 rows with any
    leading dimensions) gives the op's values and shape; 17 rows take the checked path."""
    layer = fastlora.Linear4bit.from_linear(nn.Linear(32, out_features, bias=bias))
    x = rand(shape, gen=gen)
    with torch.no_grad():
        direct = layer(x)
    through_op = layer(x.clone().requires_grad_()).detach()
    assert direct.shape == (*shape[:-1], out_features) and direct.is_contiguous()
    torch.testing.assert_close(direct, through_op, rtol=0, atol=0)
    part = layer.plan()._backend_part()
    assert (part.decode(x, layer.bias) is None) == (x.numel() // 32 > 16)


def test_the_decoding_call_sees_every_change_of_the_bias(gen):
    """The decoding call checks a bias once per tensor and address: a new bias, new data of
    another dtype in the same parameter, and a removed bias each give the right output on
    the next call (a bias of another dtype than x takes the checked path)."""
    layer = fastlora.Linear4bit.from_linear(nn.Linear(32, 32)).requires_grad_(False)
    x = rand((1, 32), gen=gen)
    weight = layer.dequantize().double()

    def check() -> None:
        with torch.no_grad():
            y = layer(x)
        assert_fp32_product_close(y, x, weight, layer.bias)

    check()
    layer.bias = nn.Parameter(rand((32,), gen=gen), requires_grad=False)
    check()
    layer.bias.data = rand((32,), gen=gen).half()
    check()
    assert layer.plan()._backend_part().decode(x, layer.bias) is None
    layer.bias.data = rand((32,), gen=gen)
    check()
    layer.bias = None
    check()


def test_matmul_4bit_checks_a_bias_again_after_an_in_place_change_of_its_shape(gen):
    """The functional call takes the decoding call too: the same bias tensor, resized in
    place (its address unchanged), gets the usual error instead of a read past its end."""
    w, x, bias = rand((48, 64), gen=gen), rand((2, 64), gen=gen), rand((48,), gen=gen)
    packed, state = fastlora.quantize_4bit(w)
    weight = fastlora.dequantize_4bit(packed, state).double()
    with torch.no_grad():
        for _ in range(2):  # the first call prepares the plan, the second takes the decoding call
            y = fastlora.matmul_4bit(x, packed, state, bias)
            assert_fp32_product_close(y, x, weight, bias)
        address = bias.data_ptr()
        bias.resize_(40)
        assert bias.data_ptr() == address
        with pytest.raises(ValueError, match=r"bias must have shape \(48,\)"):
            fastlora.matmul_4bit(x, packed, state, bias)
        with pytest.raises(ValueError, match="bias must have shape"):
            fastlora.matmul_4bit(x, packed, state, rand((48, 1), gen=gen))
        half_bias = rand((48,), gen=gen).half()  # another dtype than x: added by torch
        y = fastlora.matmul_4bit(x, packed, state, half_bias)
        assert_fp32_product_close(y, x, weight, half_bias)


def test_the_decoding_call_takes_inference_tensors(gen):
    """Tensors made under `torch.inference_mode()` have no version counter: a bias among them
    is checked on every call, and one resized in place there still gets the usual error."""
    with torch.inference_mode():
        w, x, bias = rand((48, 64), gen=gen), rand((1, 64), gen=gen), rand((48,), gen=gen)
        packed, state = fastlora.quantize_4bit(w)
        weight = fastlora.dequantize_4bit(packed, state).double()
        layer = fastlora.Linear4bit.from_linear(nn.Linear(64, 48))
        for _ in range(3):
            y = fastlora.matmul_4bit(x, packed, state, bias)
            assert_fp32_product_close(y, x, weight, bias)
            y = layer(x)
            assert_fp32_product_close(y, x, layer.dequantize().double(), layer.bias)
        bias.resize_(40)
        with pytest.raises(ValueError, match=r"bias must have shape \(48,\)"):
            fastlora.matmul_4bit(x, packed, state, bias)


def assert_fp32_lora_close(y: torch.Tensor, x: torch.Tensor, layer: "fastlora.LoraLinear") -> None:
    """y, a LoRA layer's fp32 output for x, against float64: within the error bound of its
    fp32 sums (the base's k terms, the adapter's k + r), relative to their magnitudes."""
    w, a, b = layer.base_layer.dequantize().double(), layer.lora_A.weight.double(), layer.lora_B.weight.double()
    s, xd = layer.scaling, x.double()
    expected = xd @ w.t() + s * (xd @ a.t()) @ b.t()
    bound = xd.abs() @ (w.abs() + s * b.abs() @ a.abs()).t()
    if layer.base_layer.bias is not None:
        expected, bound = expected + layer.base_layer.bias.double(), bound + layer.base_layer.bias.double().abs()
    tol = 2 * (x.shape[-1] + a.shape[0] + 3) * 2**-24 * bound
    err = (y.double() - expected).abs()
    assert (err <= tol).all(), f"max error {err.max().item()} against a bound of {tol.flatten()[err.argmax()].item()}"


@pytest.mark.parametrize("shape", [(1, 32), (3, 2, 32)])
def test_the_lora_decoding_call_follows_the_adapter(shape, gen):
    """`LoraLinear`'s one-step decoding call (base, bias and adapter in one native call) gives
    the exact values, and sees a replaced A, new data in B, an adapter of another dtype
    (which takes the checked path), dropout in eval mode, and gradients to record."""
    layer = fastlora.LoraLinear(fastlora.Linear4bit.from_linear(nn.Linear(32, 24)), r=4, lora_alpha=8,
                                lora_dropout=0.1, init_lora_weights=False).eval()
    x = rand(shape, gen=gen)
    part = layer.base_layer.plan()._backend_part()

    def check(fast: bool) -> None:
        with torch.no_grad():
            y = layer(x)
        assert y.shape == (*shape[:-1], 24)
        assert_fp32_lora_close(y, x, layer)
        assert (part._adapter[0] is layer.lora_A.weight) == fast

    check(True)
    layer.lora_A.weight = nn.Parameter(rand((4, 32), gen=gen))
    check(True)
    layer.lora_B.weight.data = rand((24, 4), gen=gen)
    check(True)
    with torch.no_grad():
        layer.lora_B.weight.mul_(-3)  # in place: the same address, read again
    check(True)
    layer.lora_A.weight = nn.Parameter(rand((4, 32), gen=gen).double())
    with torch.no_grad():
        assert part.decode(x, layer.base_layer.bias, (layer.lora_A.weight, layer.lora_B.weight, 2.0)) is None
    layer.lora_A.weight = nn.Parameter(rand((4, 32), gen=gen))
    check(True)
    y = layer(x)  # gradients to record: the autograd path
    assert y.grad_fn is not None
    assert_fp32_lora_close(y.detach(), x, layer)


def test_the_lora_decoding_call_takes_inference_tensors(gen):
    """An adapter made under `torch.inference_mode()` has no version counter: it is checked on
    every call, and a resized A then takes the checked path instead of being read past its end."""
    with torch.inference_mode():
        layer = fastlora.LoraLinear(fastlora.Linear4bit.from_linear(nn.Linear(64, 48)), r=8,
                                    init_lora_weights=False)
        x = rand((1, 64), gen=gen)
        for _ in range(3):
            assert_fp32_lora_close(layer(x), x, layer)
        a = layer.lora_A.weight
        assert layer.base_layer.plan()._backend_part().decode(x, None, (a, layer.lora_B.weight, 1.0)) is not None
        a.resize_(4, 64)
        assert layer.base_layer.plan()._backend_part().decode(x, None, (a, layer.lora_B.weight, 1.0)) is None


def _quantized_lora(k=128, n=80, r=4):
    torch.manual_seed(11)
    layer = fastlora.LoraLinear(fastlora.Linear4bit.from_linear(nn.Linear(k, n, bias=True)), r=r,
                                init_lora_weights=False)
    return layer, torch.randn(24, k, requires_grad=True)


@pytest.mark.parametrize("grad", [True, False])
def test_autocast_casts_activations_adapter_and_bias_but_not_the_scales(grad):
    """Under CPU autocast the LoRA op computes as if x, A, B and the bias were bf16 (as
    autocast casts F.linear's input, weight and bias), with or without an autograd graph, and
    fp32 adapters get fp32 gradients; the packed weight's fp32 scales are not rounded."""
    layer, x = _quantized_lora()
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    base = layer.base_layer
    with torch.no_grad():
        expected = fastlora.ops.lora.lora_linear_4bit(
            x.bfloat16(), x.bfloat16(), base.packed_bytes(), base.block_scales(), base.bias.bfloat16(),
            layer.lora_A.weight.bfloat16(), layer.lora_B.weight.bfloat16(), layer.scaling, base.blocksize,
            base.quant_type)
    assert torch.equal(y.detach(), expected)
    if grad:
        y.float().sum().backward()
        assert layer.lora_A.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
        assert layer.lora_B.weight.grad.abs().sum() > 0


def test_autocast_casts_the_functional_matmul():
    packed, state = fastlora.quantize_4bit(torch.randn(40, 96))
    x = torch.randn(20, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastlora.matmul_4bit(x, packed, state)
    assert y.dtype == torch.bfloat16 and torch.equal(y, fastlora.matmul_4bit(x.bfloat16(), packed, state))
