"""The Triton kernels (`fastlora.kernels`) against the plain-PyTorch reference, and the
`FASTLORA_BACKEND=triton` path of the public API against the Rust one.

Without a GPU (CI) the kernels run on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, set by conftest.py), on small odd shapes, with one fixed launch
configuration. On a CUDA machine the same kernel tests run on the GPU (autotuned, plus the
bf16 cases the interpreter cannot run); the CPU backend tests then skip.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import triton

import fastlora
from fastlora import backends as _backend
from fastlora import reference
from fastlora.formats import dynamic_map
from fastlora.kernels import dequantize, lora, matmul

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
QUANT_TYPES = ("nf4", "fp4")
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(not ON_GPU, reason="bf16 is broken in Triton's interpreter (fp32->bf16 casts truncate)"),
)
DTYPES = (torch.float32, torch.float16, BF16)
# Error allowed relative to sum(|a| * |b|) per output element: fp32 accumulation, or the
# weight (and the result) rounded to a 16-bit activation dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}
needs_interpreter = pytest.mark.skipif(
    not dequantize.INTERPRETED, reason="the Triton backend for CPU tensors needs TRITON_INTERPRET=1"
)


def random_weight(shape, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape) * 0.7 + 0.1).to(dtype)


def quantized(shape, blocksize, quant_type, nested):
    """A random weight quantized by the reference: (packed, scales as the kernels take them,
    NestedScales or None, the fp32 scales, the float64 weight)."""
    packed, absmax = reference.quantize_4bit(random_weight(shape), blocksize, quant_type)
    scales, nested_scales = absmax, None
    if nested:
        qabsmax, absmax2, offset = reference.quantize_nested_absmax(absmax)
        nested_scales = dequantize.NestedScales(absmax2.to(DEVICE), dynamic_map(DEVICE), offset.to(DEVICE))
        absmax = reference.dequantize_nested_absmax(qabsmax, absmax2, offset, dynamic_map())
        scales = qabsmax
    weight = reference.dequantize_4bit(packed, absmax, blocksize, quant_type, shape, torch.float32).double()
    return packed.to(DEVICE), scales.to(DEVICE), nested_scales, absmax.to(DEVICE), weight


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype
    err = (actual.cpu().double() - expected).abs()
    limit = TOL[dtype] * bound + 1e-30
    worst = (err / limit).max().item()
    assert worst <= 1.0, f"{what}: error {err.max().item():.3g} is {worst:.3g}x the allowed error"


# ---------------------------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------------------------

QUANTIZE_CASES = [((33, 65), 32), ((7,), 4096), ((3, 5, 129), 128), ((2, 128), 64), ((1,), 32)]


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize", QUANTIZE_CASES)
def test_quantize_4bit_gives_the_reference_bytes(quant_type, dtype, shape, blocksize):
    w = random_weight(shape, dtype)
    flat = w.view(-1)
    if flat.numel() >= 2 * blocksize:  # an all-zero block, and values exactly on code midpoints
        flat[:blocksize] = 0
        bounds, _ = reference._nibble_bounds(quant_type)
        flat[blocksize:blocksize + 15] = (bounds * flat[blocksize:2 * blocksize].abs().max()).to(dtype)
    packed, absmax = dequantize.quantize_4bit(w.to(DEVICE), blocksize, quant_type)
    expected_packed, expected_absmax = reference.quantize_4bit(w, blocksize, quant_type)
    assert packed.shape == expected_packed.shape and torch.equal(packed.cpu(), expected_packed)
    assert torch.equal(absmax.cpu(), expected_absmax)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((33, 65), 32), ((3, 5, 129), 128), ((300, 7), 2048)])
def test_dequantize_4bit_matches_the_reference_into_a_poisoned_output(quant_type, dtype, nested, shape, blocksize):
    packed, scales, nested_scales, absmax, _ = quantized(shape, blocksize, quant_type, nested)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    result = dequantize.dequantize_4bit(packed, scales, blocksize, quant_type, shape, dtype, nested=nested_scales,
                                        out=out)
    assert result is out
    expected = reference.dequantize_4bit(packed.cpu(), absmax.cpu(), blocksize, quant_type, shape, dtype)
    assert torch.equal(out.cpu(), expected)


def test_quantize_blockwise_rounds_on_bitsandbytes_grid():
    code = dynamic_map()
    midpoints = (code[:-1] + code[1:]) / 2
    # Values on and beside every midpoint (where the grid can pick the farther code), an
    # all-zero block and a partial last block.
    near = torch.cat([midpoints, midpoints.nextafter(torch.tensor(2.0)), midpoints.nextafter(torch.tensor(-2.0))])
    values = torch.cat([near, torch.ones(1), torch.zeros(256), torch.randn(300)])
    q, absmax = dequantize.quantize_blockwise(values.to(DEVICE), code.to(DEVICE), 256)
    expected_q, expected_absmax = reference.quantize_blockwise(values, code, 256)
    assert torch.equal(q.cpu(), expected_q) and torch.equal(absmax.cpu(), expected_absmax)
    decoded = dequantize.dequantize_blockwise(q, absmax, code.to(DEVICE), 256, torch.tensor(0.25, device=DEVICE))
    assert torch.equal(decoded.cpu(), reference.dequantize_blockwise(expected_q, expected_absmax, code, 256) + 0.25)
    plain = dequantize.dequantize_blockwise(q, absmax, code.to(DEVICE), 256)
    assert torch.equal(plain.cpu(), reference.dequantize_blockwise(expected_q, expected_absmax, code, 256))


# ---------------------------------------------------------------------------------------------
# fused matmul
# ---------------------------------------------------------------------------------------------

# (n, k, blocksize): K a multiple of the block size (tile narrower and wider than a block),
# K not a multiple, K odd; a tall-thin weight whose transposed product splits; larger blocks.
MATMUL_SHAPES = [(48, 256, 64), (40, 128, 32), (19, 130, 32), (7, 33, 32), (200, 64, 32), (6, 1024, 256)]
# m: GEMV rows (CUDA cores; 1 and 3), a padded 16-row dot tile (5, 16), the large-M tiles (37).
# Every shape meets every path, with quant types and double quantization alternating.
MATMUL_CASES = [
    (m, shape, QUANT_TYPES[(i + j) % 2], (i + j) % 3 == 0)
    for i, shape in enumerate(MATMUL_SHAPES)
    for j, m in enumerate([1 if i % 2 else 3, 5 if i % 2 else 16, 37])
]


def force_fused_kernels(request):
    """The fused kernels at every row count (the default sends larger M to cuBLAS), until the
    test ends."""
    forced = matmul.forced_path("fused")
    forced.__enter__()
    request.addfinalizer(lambda: forced.__exit__(None, None, None))


@pytest.fixture
def fused_kernels_only(request):
    force_fused_kernels(request)


@pytest.mark.usefixtures("fused_kernels_only")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,shape,quant_type,nested", MATMUL_CASES)
def test_matmul_forward_and_transposed_against_float64(m, shape, quant_type, nested, dtype):
    n, k, blocksize = shape
    packed, scales, nested_scales, _, weight = quantized((n, k), blocksize, quant_type, nested)
    x = torch.randn(m, k).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = matmul.matmul_4bit(x.to(DEVICE), packed, scales, n, k, blocksize, quant_type, False, nested=nested_scales,
                           out=out)
    assert_close_to(y, x.double() @ weight.t(), x.double().abs() @ weight.abs().t(), dtype, "x @ W.T")
    grad = torch.randn(2, m, n).to(dtype)  # leading batch dimensions are kept
    dx = matmul.matmul_4bit(grad.to(DEVICE), packed, scales, n, k, blocksize, quant_type, True, nested=nested_scales)
    assert_close_to(dx, grad.double() @ weight, grad.double().abs() @ weight.abs(), dtype, "dy @ W")


@pytest.mark.skipif(ON_GPU, reason="checks the interpreter's split choice")
def test_small_problems_split_the_reduction_in_both_orientations():
    """The shapes above run the split (atomic-add) path of the small-M kernel both ways."""
    assert matmul._split_count(19, 130, False, DEVICE) > 1
    assert matmul._split_count(64, 200, True, DEVICE) > 1


@pytest.mark.usefixtures("fused_kernels_only")
@pytest.mark.parametrize("m,n,k,transposed", [(1, 19, 256, False), (3, 40, 512, False), (8, 19, 130, False),
                                              (2, 64, 200, True)])
def test_split_launches_leave_their_workspace_zero_for_the_next_one(m, n, k, transposed):
    """Split programs add into a workspace kept across launches, and each tile's last program
    stores it and zeroes it: a second launch of the shape, on new data into a poisoned
    output, is right too, and the workspace is zero after each (the GEMV and the small-M
    kernel, both orientations)."""
    packed, scales, _, _, weight = quantized((n, k), 64 if k % 64 == 0 else 32, "nf4", False)
    blocksize = 64 if k % 64 == 0 else 32
    for _ in range(2):
        x = torch.randn(m, n if transposed else k)
        out = torch.full((m, k if transposed else n), float("nan"), device=DEVICE)
        y = matmul.matmul_4bit(x.to(DEVICE), packed, scales, n, k, blocksize, "nf4", transposed, out=out)
        exact = x.double() @ (weight if transposed else weight.t())
        assert_close_to(y, exact, x.double().abs() @ (weight.abs() if transposed else weight.abs().t()), torch.float32)
        assert matmul._workspaces, "the shape was expected to split"
        for sums, counts in matmul._workspaces.values():
            assert not sums.any() and not counts.any()


@pytest.mark.skipif(ON_GPU, reason="writes the interpreter's table")
def test_launchers_take_a_measured_table_and_ignore_what_it_cannot_launch(tmp_path, monkeypatch):
    """A config table (`fastlora.kernels.tuning`, as the GPU sweep writes it) decides the
    GEMV's and dequantize's launch for the shapes it names; a configuration not in the
    kernel's list, or a split too wide for the row, is ignored for the heuristic; the launch
    from the table gives the right result."""
    from fastlora.kernels import dequantize, tuning

    n, k = 40, 256
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    heuristic = {m: matmul.gemv_config(n, k, m, DEVICE) for m in (1, 3)}
    tuning.write_table(tmp_path / "interpreter.json", {
        "gemv": {"40x256x1": {"BLOCK_OUT": 64, "BLOCK_BYTES": 64, "num_warps": 4, "SPLIT": 2},  # not a listed tile
                 "40x256x2": {"BLOCK_OUT": 32, "BLOCK_BYTES": 64, "num_warps": 4, "SPLIT": 2},
                 "40x256x3": {"BLOCK_OUT": 32, "BLOCK_BYTES": 64, "num_warps": 4, "SPLIT": 9}},  # 9 > 128 / 64
        "dequantize": {"10240": {"BYTES": 2048, "num_warps": 4}, "5120": {"BYTES": 1000, "num_warps": 4}},
    }, about={"test": True})
    assert matmul.gemv_config(n, k, 1, DEVICE) == heuristic[1]
    assert matmul.gemv_config(n, k, 2, DEVICE) == (32, 64, 4, 2)
    assert matmul.gemv_config(n, k, 3, DEVICE) == heuristic[3]
    assert dequantize.dequantize_config(n * k, DEVICE) == (2048, 4)
    assert dequantize.dequantize_config(n * k // 2, DEVICE) == dequantize.DEQUANTIZE_CONFIGS[0]
    packed, scales, _, _, weight = quantized((n, k), 64, "nf4", False)
    x = torch.randn(2, k)
    out = torch.full((2, n), float("nan"), device=DEVICE)
    y = matmul.matmul_4bit(x.to(DEVICE), packed, scales, n, k, 64, "nf4", False, out=out)
    assert_close_to(y, x.double() @ weight.t(), x.double().abs() @ weight.abs().t(), torch.float32)


@pytest.mark.skipif(ON_GPU, reason="writes the interpreter's table")
@pytest.mark.parametrize("text", ['{"kernels": {"gemv": ', '[1, 2]', '{"kernels": {"gemv": [1]}}',
                                  '{"kernels": {"gemv": {"40x256x2": 5}}}'])
def test_a_corrupt_launch_table_is_ignored_with_a_warning(text, tmp_path, monkeypatch):
    """A table file that is not a table (cut off, another shape, entries that are not objects)
    leaves the launchers on their heuristics: a warning where the file is unreadable as a
    table, never a failed launch."""
    from fastlora.kernels import tuning

    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    heuristic = matmul.gemv_config(40, 256, 2, DEVICE)
    (tmp_path / "interpreter.json").write_text(text)
    tuning._table.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert matmul.gemv_config(40, 256, 2, DEVICE) == heuristic
    assert bool(caught) == (text != '{"kernels": {"gemv": {"40x256x2": 5}}}')
    packed, scales, _, _, weight = quantized((40, 256), 64, "nf4", False)
    x = torch.randn(2, 256)
    y = matmul.matmul_4bit(x.to(DEVICE), packed, scales, 40, 256, 64, "nf4", False)
    assert_close_to(y, x.double() @ weight.t(), x.double().abs() @ weight.abs().t(), torch.float32)


@pytest.mark.usefixtures("fused_kernels_only")
@pytest.mark.parametrize("m", [2, 37])
def test_matmul_adds_bias_in_the_epilogue(m):
    n, k = 48, 256
    packed, scales, _, _, weight = quantized((n, k), 64, "nf4", False)
    x, bias = torch.randn(m, k), torch.randn(n)
    y = matmul.matmul_4bit(x.to(DEVICE), packed, scales, n, k, 64, "nf4", False, bias=bias.to(DEVICE))
    bound = x.double().abs() @ weight.abs().t() + bias.double().abs()
    assert_close_to(y, x.double() @ weight.t() + bias.double(), bound, torch.float32)


def test_empty_activations_give_an_empty_result():
    packed, scales, _, _, _ = quantized((8, 64), 32, "nf4", False)
    y = matmul.matmul_4bit(torch.empty(0, 3, 64, device=DEVICE), packed, scales, 8, 64, 32, "nf4", False)
    assert y.shape == (0, 3, 8)


# ---------------------------------------------------------------------------------------------
# fused LoRA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m,rank,dtype,nested",
    [
        # GEMV rows (one split), a padded 16-row tile, large-M tiles in fp16 and fp32
        (3, 4, torch.float32, False), (1, 3, torch.float16, True), (9, 8, torch.float16, False),
        (21, 16, torch.float16, True), (24, 5, torch.float32, True),
        pytest.param(24, 5, torch.bfloat16, False, marks=BF16.marks),
    ],
)
@pytest.mark.usefixtures("fused_kernels_only")
def test_lora_linear_4bit_against_float64(m, rank, dtype, nested):
    n, k, blocksize = 40, 128, 64
    packed, scales, nested_scales, _, weight = quantized((n, k), blocksize, "nf4", nested)
    x = torch.randn(m, k).to(dtype)
    x_drop = (x * (torch.rand(m, k) > 0.3) / 0.7).to(dtype)
    A, B, bias = torch.randn(rank, k) / 8, torch.randn(n, rank) / 4, torch.randn(n)  # fp32 adapters, as PEFT's
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = lora.lora_linear_4bit(x.to(DEVICE), x_drop.to(DEVICE), packed, scales, bias.to(DEVICE), A.to(DEVICE),
                              B.to(DEVICE), 1.5, blocksize, "nf4", nested=nested_scales, out=out)
    u = x_drop.double() @ A.double().t()
    expected = x.double() @ weight.t() + bias.double() + 1.5 * u @ B.double().t()
    bound = x.double().abs() @ weight.abs().t() + bias.double().abs() + 1.5 * (u.abs() @ B.double().abs().t())
    assert_close_to(y, expected, bound, dtype, "lora")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_then_cublas_path_when_the_heuristic_picks_it(dtype):
    rows = matmul.DEQUANTIZE_CUBLAS_MIN_ROWS
    assert matmul.use_dequantize_then_cublas(rows, 40, 128) and not matmul.use_dequantize_then_cublas(rows - 1, 40, 128)
    assert matmul.use_dequantize_then_cublas(1, 40, 128, True)
    with matmul.forced_path("fused"):
        assert not matmul.use_dequantize_then_cublas(rows, 40, 128)
    with matmul.forced_path("cublas"):
        assert matmul.use_dequantize_then_cublas(1, 40, 128)
    with pytest.raises(ValueError, match="path must be one of"):
        matmul.forced_path("tensor-cores").__enter__()
    n, k, m, rank = 40, 128, rows + 4, 4
    packed, scales, nested_scales, _, weight = quantized((n, k), 32, "fp4", True)
    x, A, B, bias = torch.randn(m, k).to(dtype), torch.randn(rank, k), torch.randn(n, rank), torch.randn(n)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = lora.lora_linear_4bit(x.to(DEVICE), x.to(DEVICE), packed, scales, bias.to(DEVICE), A.to(DEVICE), B.to(DEVICE),
                              0.5, 32, "fp4", nested=nested_scales, out=out)
    assert y.data_ptr() == out.data_ptr()
    u = x.double() @ A.double().t()
    expected = x.double() @ weight.t() + bias.double() + 0.5 * u @ B.double().t()
    bound = x.double().abs() @ weight.abs().t() + bias.double().abs() + 0.5 * (u.abs() @ B.double().abs().t())
    # The base product is rounded to x's dtype before the fp32 LoRA term is added (as PEFT).
    assert_close_to(y, expected, 2 * bound, dtype, "lora via cuBLAS")
    g = torch.randn(m, n).to(dtype)
    dx = matmul.matmul_4bit(g.to(DEVICE), packed, scales, n, k, 32, "fp4", True, nested=nested_scales)
    assert_close_to(dx, g.double() @ weight, g.double().abs() @ weight.abs(), dtype, "dy @ W via cuBLAS")


# ---------------------------------------------------------------------------------------------
# FASTLORA_BACKEND: the public API on the Triton kernels against the Rust ones
# ---------------------------------------------------------------------------------------------


def run_with_backend(monkeypatch, backend: str, fn):
    monkeypatch.setenv("FASTLORA_BACKEND", backend)
    try:
        return fn()
    finally:
        monkeypatch.delenv("FASTLORA_BACKEND")


@needs_interpreter
@pytest.mark.parametrize("fused", [False, True], ids=["default-dispatch", "fused"])
@pytest.mark.parametrize("quant_type,blocksize,nested", [("nf4", 64, True), ("fp4", 32, False)])
def test_functional_api_on_triton_matches_rust(request, monkeypatch, quant_type, blocksize, nested, fused):
    if fused:
        force_fused_kernels(request)
    w = random_weight((24, 97))
    x = torch.randn(2, 3, 97)
    grad = torch.randn(2, 3, 24)

    def run():
        packed, state = fastlora.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                               compress_statistics=nested)
        xr = x.clone().requires_grad_()
        y = fastlora.matmul_4bit(xr, packed, state, bias=torch.ones(24))
        y.backward(grad)
        return packed, state, fastlora.dequantize_4bit(packed, state), y.detach(), xr.grad

    packed, state, dense, y, dx = run_with_backend(monkeypatch, "triton", run)
    r_packed, r_state, r_dense, r_y, r_dx = run_with_backend(monkeypatch, "rust", run)
    assert torch.equal(packed, r_packed) and torch.equal(state.absmax, r_state.absmax)
    if nested:
        assert torch.equal(state.state2.absmax, r_state.state2.absmax) and torch.equal(state.offset, r_state.offset)
    assert torch.equal(dense, r_dense)
    w_fp32 = dense.double()
    assert_close_to(y, r_y.double(), x.double().abs() @ w_fp32.abs().t() + 1, torch.float32, "y")
    assert_close_to(dx, r_dx.double(), grad.double().abs() @ w_fp32.abs(), torch.float32, "dx")


@needs_interpreter
@pytest.mark.parametrize("fused", [False, True], ids=["default-dispatch", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_layers_on_triton_match_rust(request, monkeypatch, dtype, fused):
    if fused:
        force_fused_kernels(request)
    torch.manual_seed(7)
    layer = fastlora.LoraLinear(fastlora.Linear4bit(80, 36, compress_statistics=True), r=5, lora_alpha=10,
                                init_lora_weights=False)
    layer.base_layer.bias.requires_grad_(True)
    plain = fastlora.Linear4bit(80, 20, bias=False, quant_type="fp4", blocksize=32)
    x = torch.randn(4, 80).to(dtype)
    params = [layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.bias]

    def run():
        xr = x.clone().requires_grad_()
        y = layer(xr)
        z = plain(xr)
        (y.float().square().sum() + z.float().sum()).backward()
        grads = [xr.grad] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return [y.detach(), z.detach()] + grads

    triton_results = run_with_backend(monkeypatch, "triton", run)
    rust_results = run_with_backend(monkeypatch, "rust", run)
    # Errors relative to each result's largest magnitude: fp32 rounding, or (fp16) the weight
    # rounded to fp16 on Triton's tensor-core path where Rust multiplies by the fp32 value.
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for name, got, want in zip(["y", "plain y", "dx", "dA", "dB", "dbias"], triton_results, rust_results, strict=False):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), msg=name)


@needs_interpreter
def test_torch_compile_over_the_triton_backend(monkeypatch):
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        fastlora.LoraLinear(fastlora.Linear4bit(32, 24), r=4, init_lora_weights=False), torch.nn.GELU(),
        fastlora.Linear4bit(24, 8, quant_type="fp4", compress_statistics=False),
    )
    x = torch.randn(3, 32)
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_backend_variable_is_validated(monkeypatch):
    w = torch.randn(4, 64)
    monkeypatch.setenv("FASTLORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTLORA_BACKEND"):
        fastlora.quantize_4bit(w)
    for choice in ("auto", "rust", ""):
        monkeypatch.setenv("FASTLORA_BACKEND", choice)
        assert _backend.select(torch.device("cpu")).NAME == "cpu"
    monkeypatch.setenv("FASTLORA_BACKEND", "rust")
    assert _backend.select(torch.device("cuda")).NAME == "triton"  # CUDA tensors always run Triton


def test_triton_backend_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTLORA_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastlora.quantize_4bit(torch.randn(4, 64))
    # Set, but only after the kernels were built for a GPU: still an error, never a fallback.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dequantize, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="before starting Python"):
        fastlora.dequantize_4bit(*fastlora.quantize_4bit(torch.randn(4, 64)))


# ---------------------------------------------------------------------------------------------
# GPU only: the CUDA implementations of the ops through the public API
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True], ids=["default-dispatch", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_ops_match_the_cpu_path(request, monkeypatch, dtype, m, fused):
    if fused:
        force_fused_kernels(request)
    w = random_weight((256, 320), dtype)
    packed, state = fastlora.quantize_4bit(w, compress_statistics=True)
    cuda_packed, cuda_state = fastlora.quantize_4bit(w.cuda(), compress_statistics=True)
    assert torch.equal(cuda_packed.cpu(), packed)
    # The offset is each device's own absmax.mean() (as in bitsandbytes): the nested codes may
    # differ where the last bit of the mean moves a value across a grid point.
    scales = cuda_state.block_scales().decoded().cpu()
    torch.testing.assert_close(scales, state.block_scales().decoded(), rtol=1e-2, atol=0)
    expected = reference.dequantize_4bit(packed, scales, 64, "nf4", (256, 320), dtype)
    assert torch.equal(fastlora.dequantize_4bit(cuda_packed, cuda_state).cpu(), expected)
    weight = reference.dequantize_4bit(packed, scales, 64, "nf4", (256, 320), torch.float32).double()
    x = torch.randn(m, 320).to(dtype)
    xc = x.cuda().requires_grad_()
    y = fastlora.matmul_4bit(xc, cuda_packed, cuda_state)
    grad = torch.randn(m, 256).to(dtype)
    y.backward(grad.cuda())
    assert_close_to(y.detach(), x.double() @ weight.t(), x.double().abs() @ weight.abs().t(), dtype, "y")
    assert_close_to(xc.grad, grad.double() @ weight, grad.double().abs() @ weight.abs(), dtype, "dx")


@pytest.mark.gpu
def test_cuda_lora_layer_trains_like_the_cpu_layer():
    torch.manual_seed(3)
    layer = fastlora.LoraLinear(fastlora.Linear4bit(320, 256, compute_dtype=torch.bfloat16), r=16,
                                init_lora_weights=False)
    x = torch.randn(64, 320)
    results = []
    for device in ("cpu", "cuda"):
        layer.to(device)
        xd = x.to(device).detach().requires_grad_()  # a fresh leaf on each device
        layer(xd).float().square().mean().backward()
        results.append([t.detach().cpu().float() for t in (layer(xd), xd.grad, layer.lora_A.weight.grad,
                                                            layer.lora_B.weight.grad)])
        layer.zero_grad()
    for name, got, want in zip(["y", "dx", "dA", "dB"], results[1], results[0], strict=False):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item(), msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_a_captured_cuda_graph_replays_like_eager(rows):
    """A LoRA layer over a 4-bit base, warmed up and then captured in a CUDA graph, gives on
    every replay (new input copied into the captured one) what an eager call gives: the
    GEMV with its split workspace (1 and 4 rows) and dequantize + cuBLAS (16 rows)."""
    torch.manual_seed(4)
    base = fastlora.Linear4bit(4096, 1024, compute_dtype=torch.bfloat16)
    layer = fastlora.LoraLinear(base, r=16, init_lora_weights=False).cuda().eval()
    static_x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, as torch's CUDA graph docs ask
            for _ in range(3):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            eager = layer(x)
            torch.testing.assert_close(static_y.float(), eager.float(), rtol=2e-2, atol=2e-2 * eager.abs().max().item())


@pytest.mark.gpu
def test_torch_compile_reduce_overhead_replays_like_eager():
    """`torch.compile(mode="reduce-overhead")` (inductor's CUDA graphs) over a LoRA layer on a
    4-bit base gives eager's one-row results on every call after its warm-up."""
    torch.manual_seed(5)
    layer = fastlora.LoraLinear(fastlora.Linear4bit(2048, 512, compute_dtype=torch.bfloat16), r=16,
                                init_lora_weights=False).cuda().eval()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
            got, want = compiled(x).float(), layer(x).float()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


class _FakeKernel:
    """Stands for a JIT kernel computing `y = SCALE * x` (SCALE a constant, default 2): its
    ordinary launch returns a compiled kernel whose launcher computes `direct_scale * x`."""

    arg_names = ["x_ptr", "y_ptr", "n", "SCALE"]
    params = [types.SimpleNamespace(name="SCALE", has_default=True, default=2.0)]

    def __init__(self, direct_scale: float) -> None:
        self.ordinary = self.direct = 0
        self.direct_scale = direct_scale
        self.compiled = types.SimpleNamespace(function="f", packed_metadata="m", run=self._run)

    def _run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, x, y, n, scale):
        assert (gx, gy, gz, stream, function, metadata, n, scale) == (3, 1, 1, 7, "f", "m", x.numel(), 2.0)
        self.direct += 1
        y.copy_(self.direct_scale * x)

    def __getitem__(self, grid):
        def launch(x, y, n, SCALE=2.0, num_warps=4):
            self.ordinary += 1
            y.copy_(SCALE * x)
            return self.compiled

        return launch


@pytest.mark.parametrize("reproduces", [True, False])
def test_direct_launches_are_checked_and_fall_back_to_ordinary_ones(reproduces, monkeypatch):
    """A `DirectLaunch` takes the compiled launcher only after it reproduced the ordinary
    launch's output, and for later calls with the same argument key; a binary that does not
    reproduce it leaves the site on ordinary launches (with a warning); a misaligned tensor
    (another key) or an installed launch hook takes the ordinary launch. Every output is right."""
    from fastlora.kernels import launch

    kernel = _FakeKernel(direct_scale=2.0 if reproduces else 3.0)
    site = launch.DirectLaunch(kernel, {"num_warps": 4}, outputs=(1,), enabled=True, stream=lambda: 7)
    x = torch.randn(17)

    def call(t: torch.Tensor) -> None:
        y = torch.full_like(t, float("nan"))
        site((3, 1, 1), t, y, t.numel())
        torch.testing.assert_close(y, 2 * t)

    if reproduces:
        call(x)
        assert (kernel.ordinary, kernel.direct) == (1, 1)  # the ordinary launch and its check
        call(x)
        call(x.clone())
        assert (kernel.ordinary, kernel.direct) == (1, 3)
        call(x[1:])  # 4 bytes off 16-byte alignment: another specialization
        assert (kernel.ordinary, kernel.direct) == (2, 4)
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *args: None)
        call(x)
        assert (kernel.ordinary, kernel.direct) == (3, 4)
    else:
        with pytest.warns(UserWarning, match="did not reproduce"):
            call(x)
        call(x)
        assert not site.enabled and (kernel.ordinary, kernel.direct) == (2, 1)
