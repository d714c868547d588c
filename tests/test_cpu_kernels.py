"""The Rust CPU kernels behind the functional API, against bitsandbytes (byte for byte),
the plain-PyTorch reference, and a float64 dense computation."""

import os
import platform
import subprocess
import sys
import threading

import bitsandbytes.functional as bnbF
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlora
import oracles
from fastlora import _native, reference
from fastlora.backends import cpu as _cpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
QUANT_TYPES = ["nf4", "fp4"]


def random_weight(shape, dtype=torch.float32):
    return (torch.randn(shape) * 0.7 + 0.1).to(dtype)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize",
                         [((64, 128), 64), ((33, 65), 32), ((7,), 4096), ((3, 5, 129), 128), ((1,), 32)])
def test_quantize_and_dequantize_match_bitsandbytes_byte_for_byte(quant_type, dtype, shape, blocksize):
    w = random_weight(shape, dtype)
    packed, state = fastlora.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    bnb_packed, bnb_state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(packed, bnb_packed)
    assert torch.equal(state.absmax, bnb_state.absmax)
    out = fastlora.dequantize_4bit(packed, state)
    expected = oracles.dequantize(bnb_packed, bnb_state)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quantization_matches_bitsandbytes(quant_type, dtype):
    w = random_weight((300, 256), dtype)
    packed, state = fastlora.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    bnb_packed, bnb_state = bnbF.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed, bnb_packed)
    assert torch.equal(state.absmax, bnb_state.absmax)
    assert torch.equal(state.state2.absmax, bnb_state.state2.absmax)
    assert torch.equal(torch.as_tensor(state.offset), torch.as_tensor(bnb_state.offset))
    assert torch.equal(fastlora.dequantize_4bit(packed, state), oracles.dequantize(bnb_packed, bnb_state))


def test_dequantize_accepts_a_state_quantized_by_bitsandbytes():
    w = random_weight((128, 192), torch.bfloat16)
    bnb_packed, bnb_state = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    state = fastlora.QuantState.from_dict(bnb_state.as_dict(packed=True), device="cpu")
    assert torch.equal(fastlora.dequantize_4bit(bnb_packed, state), oracles.dequantize(bnb_packed, bnb_state))


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_into_out_writes_every_element_of_a_poisoned_buffer(out_dtype, nested):
    w = random_weight((45, 130), torch.bfloat16)
    packed, state = fastlora.quantize_4bit(w, blocksize=64, compress_statistics=nested)
    exact = reference.dequantize_4bit(packed, state.absmax_fp32(), 64, "nf4", state.shape, torch.float32)
    out = torch.full((45, 130), float("nan"), dtype=out_dtype)
    assert fastlora.dequantize_4bit(packed, state, out=out) is out
    assert torch.equal(out, exact.to(out_dtype))


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="large outputs are mapped on Linux")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_a_freed_large_output_is_reused_and_a_live_one_never_is(out_dtype):
    fastlora.empty_cache()
    rows = (_cpu._HUGE_PAGE_MIN_BYTES // (1024 * out_dtype.itemsize)) + 3  # just over the mapping threshold
    packed, state = fastlora.quantize_4bit(random_weight((rows, 1024), out_dtype))
    exact = reference.dequantize_4bit(packed, state.absmax_fp32(), 64, "nf4", state.shape, torch.float32).to(out_dtype)
    first = fastlora.dequantize_4bit(packed, state)
    assert torch.equal(first, exact)
    first_address = first.data_ptr()
    first.fill_(float("nan"))
    view = first[5]
    del first
    second = fastlora.dequantize_4bit(packed, state)  # `view` still holds the first
    assert second.data_ptr() != first_address and view.isnan().all()
    del view
    third = fastlora.dequantize_4bit(packed, state)
    assert third.data_ptr() == first_address  # the poisoned buffer, rewritten everywhere
    assert torch.equal(third, exact) and torch.equal(second, exact)
    del second, third
    assert _cpu._spares.bytes_kept() > 0
    fastlora.empty_cache()
    assert _cpu._spares.bytes_kept() == 0


def test_spare_mappings_keep_at_most_their_limit_newest_first():
    import mmap

    spares = _cpu._SpareMappings(max_bytes=2 << 20)
    made = [mmap.mmap(-1, 1 << 20) for _ in range(3)]
    too_large = mmap.mmap(-1, 3 << 20)
    for mapping in made + [too_large]:
        spares.keep(mapping)
    assert made[0].closed and too_large.closed and not made[1].closed and not made[2].closed
    assert spares.bytes_kept() == 2 << 20
    assert spares.take(1 << 20) is made[2] and spares.take(5) is None
    spares.clear()
    assert made[1].closed and spares.bytes_kept() == 0


def test_dequantize_rejects_an_out_that_does_not_fit():
    packed, state = fastlora.quantize_4bit(random_weight((16, 64)))
    with pytest.raises(ValueError, match=r"out has shape \(64, 16\)"):
        fastlora.dequantize_4bit(packed, state, out=torch.empty(64, 16))
    with pytest.raises(TypeError, match="out must be"):
        fastlora.dequantize_4bit(packed, state, out=torch.empty(16, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must be contiguous"):
        fastlora.dequantize_4bit(packed, state, out=torch.empty(64, 16).T)
    with pytest.raises(ValueError, match="device"):
        fastlora.dequantize_4bit(packed, state, out=torch.empty(16, 64, device="meta"))


def test_native_kernels_write_every_element_of_a_poisoned_output():
    w = random_weight((37, 70))
    packed, state = fastlora.quantize_4bit(w, blocksize=32)
    for dtype in DTYPES:
        out = torch.full((37 * 70,), float("nan"), dtype=dtype)
        _cpu.dequantize_4bit_into(packed, state.absmax, 37 * 70, 32, "nf4", 0, out)
        assert torch.isfinite(out).all()
    x = torch.randn(3, 70)
    y = torch.full((3, 37), float("nan"))
    _native.matmul_4bit(_cpu.as_numpy(x), _cpu.as_numpy(packed), _cpu.as_numpy(state.absmax), 37, 70, 32, "nf4",
                        False, _cpu.as_numpy(y), "float32")
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("versioned", [True, False])
def test_tensors_reach_rust_as_writable_views(monkeypatch, versioned):
    """Through torch's versioned DLPack capsule, or (older torch or numpy) `__dlpack__`:
    either way a flat view of the tensor's own memory, and a non-contiguous tensor is refused."""
    if not versioned:
        monkeypatch.setattr(_cpu, "_to_dlpack_versioned", None)
    for dtype in DTYPES:
        t = torch.randn(2, 3).to(dtype)
        view = _cpu.as_numpy(t)
        assert view.shape == (6,) and view.flags.writeable
        view[4] = view[0]
        assert t.flatten()[4] == t.flatten()[0]
    y = torch.full((3, 37), float("nan"))
    x = torch.randn(3, 70)
    packed, state = fastlora.quantize_4bit(random_weight((37, 70)), blocksize=32)
    _native.matmul_4bit(_cpu.as_numpy(x), _cpu.as_numpy(packed), _cpu.as_numpy(state.absmax), 37, 70, 32, "nf4",
                        False, _cpu.as_numpy(y), "float32")
    assert_matmul_close(y, x, dense_fp32(packed, state))
    with pytest.raises(ValueError, match="contiguous"):
        _cpu.as_numpy(torch.randn(4, 4).t())


def dense_fp32(packed, state):
    return reference.dequantize_4bit(packed, state.absmax_fp32(), state.blocksize, state.quant_type, state.shape,
                                     torch.float32)


def rounds_weight_to_bf16(dtype, rows):
    """Whether a product of `rows` rows in `dtype` multiplies a bf16-rounded weight (torch's
    bf16 GEMM on a CPU with native bf16) instead of the exact fp32 `code * absmax`."""
    return rows > _cpu.FUSED_MAX_ROWS and _cpu.gemm_dtype(dtype) == torch.bfloat16


def assert_matmul_close(y, x, w_dense, transposed=False):
    """y against a float64 product, within fp32 accumulation error plus y's own rounding, and
    where the weight is rounded to bf16 for torch's bf16 GEMM, that rounding and the bf16
    partial sums of its tiles."""
    expected = x.double() @ (w_dense.double() if transposed else w_dense.double().t())
    bound = x.double().abs() @ (w_dense.double().abs() if transposed else w_dense.double().abs().t())
    eps = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}[y.dtype]
    rounded = 2**-7 if rounds_weight_to_bf16(y.dtype, x.reshape(-1, x.shape[-1]).shape[0]) else 1e-5
    tol = rounded * bound + eps * expected.abs() + 1e-6
    err = (y.double() - expected).abs()
    assert (err <= tol).all(), f"max error {err.max().item()} vs tolerance {tol[err > tol].min().item()}"


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16, 17, 70])
@pytest.mark.parametrize("n,k,blocksize", [(48, 256, 64), (19, 130, 32), (5, 4096, 4096), (9, 33, 32)])
@pytest.mark.parametrize("tile_rows", [None, 3])
def test_matmul_forward_and_backward_against_float64(monkeypatch, quant_type, dtype, m, n, k, blocksize, tile_rows):
    if tile_rows is not None:  # many tiles on the path above FUSED_MAX_ROWS rows, a short last one
        monkeypatch.setattr(_cpu, "TILE_BYTES", 4 * k * tile_rows)  # tile_rows fp32 rows, twice as many bf16
    w = random_weight((n, k), dtype)
    packed, state = fastlora.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    # The kernels use the exact fp32 values code * absmax, not values rounded to W's dtype
    # (but for torch's bf16 GEMM: `rounds_weight_to_bf16`).
    w_dense = dense_fp32(packed, state)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    y = fastlora.matmul_4bit(x, packed, state)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_matmul_close(y, x.detach(), w_dense)
    grad = torch.randn(m, n, dtype=dtype)
    y.backward(grad)
    assert_matmul_close(x.grad, grad, w_dense, transposed=True)


def test_matmul_matches_bitsandbytes_with_bias_and_batch_dims():
    w = random_weight((64, 96))
    bias = torch.randn(64)
    x = torch.randn(2, 5, 96)
    packed, state = fastlora.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    bnb_packed, bnb_state = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    expected = oracles.matmul(x, bnb_packed.t(), bnb_state, bias=bias)
    torch.testing.assert_close(fastlora.matmul_4bit(x, packed, state, bias=bias), expected, rtol=1e-5, atol=1e-5)


def test_matmul_agrees_with_the_reference():
    w = random_weight((40, 128))
    x = torch.randn(9, 128)
    packed, state = fastlora.quantize_4bit(w, quant_type="fp4", blocksize=32)
    expected = reference.matmul_4bit(x, packed, state.absmax, 32, "fp4", (40, 128))
    torch.testing.assert_close(fastlora.matmul_4bit(x, packed, state), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_prepared_weight_with_lora_against_float64(dtype, m):
    """The call plan's CPU product: the base and the LoRA term in one native call (up to 16
    rows; from 17 rows torch's BLAS), an adapter in another dtype added by torch."""
    w = random_weight((10, 128))
    packed, state = fastlora.quantize_4bit(w, compress_statistics=True, blocksize=32)
    prepared = _cpu.prepare(packed.reshape(-1), state.block_scales(), 10, 128, 32, "nf4")
    weight = dense_fp32(packed, state).double()
    x, a, b = torch.randn(m, 128).to(dtype), torch.randn(4, 128), torch.randn(10, 4)
    for adapter_dtype in (dtype, torch.float32):
        a_, b_ = a.to(adapter_dtype), b.to(adapter_dtype)
        y = prepared.matmul(x, lora=(a_, b_, 0.25))
        assert y.dtype == dtype and y.shape == (m, 10)
        xd = x.double()
        expected = xd @ weight.t() + 0.25 * (xd @ a_.double().t()) @ b_.double().t()
        bound = xd.abs() @ weight.abs().t() + 0.25 * (xd.abs() @ a_.double().abs().t()) @ b_.double().abs().t()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert ((y.double() - expected).abs() <= tol * bound + tol).all()
    dx = prepared.matmul(torch.randn(m, 10).to(dtype), transposed=True)
    assert dx.shape == (m, 128) and torch.isfinite(dx).all()


def test_thread_count_does_not_change_results():
    w = random_weight((64, 512))
    x = torch.randn(4, 512)
    packed, state = fastlora.quantize_4bit(w)
    results = []
    for threads in (1, 2, 3):
        fastlora.set_num_threads(threads)
        results.append(fastlora.matmul_4bit(x, packed, state))
    fastlora.set_num_threads(None)
    assert all(torch.equal(results[0], r) for r in results[1:])
    with pytest.raises(ValueError, match="n must be"):
        fastlora.set_num_threads(0)


def test_small_jobs_on_the_calling_thread_match_the_shared_pool():
    """Jobs under the binding's inline threshold (element operations: 2**12 on torch's OpenMP
    team, 2**18 on rayon's pool) run on the calling thread, larger ones on the team: the same
    bytes either way, from any Python thread."""
    w = random_weight((512, 512))
    packed, state = fastlora.quantize_4bit(w, compress_statistics=False)
    whole = torch.full((512 * 512,), float("nan"))
    _cpu.dequantize_4bit_into(packed, state.absmax, whole.numel(), 64, "nf4", 0, whole)  # the pool

    def in_pieces():
        pieces = torch.full_like(whole, float("nan"))
        for start in range(0, whole.numel(), 4096):  # each piece inline
            _cpu.dequantize_4bit_into(packed, state.absmax, whole.numel(), 64, "nf4", start,
                                      pieces[start:start + 4096])
        return pieces

    other_thread = {}
    worker = threading.Thread(target=lambda: other_thread.setdefault("pieces", in_pieces()))
    worker.start()
    worker.join()
    assert torch.equal(whole, in_pieces()) and torch.equal(whole, other_thread["pieces"])

    w_small = random_weight((256, 512))
    packed, state = fastlora.quantize_4bit(w_small, compress_statistics=False)
    for transposed, width in ((False, 512), (True, 256)):
        x = torch.randn(16, width)  # 16 rows at once: the pool; row by row: inline
        y = _cpu.product(x, packed, state.absmax, 256, 512, 64, "nf4", transposed)
        rows = [_cpu.product(x[i:i + 1], packed, state.absmax, 256, 512, 64, "nf4", transposed) for i in range(16)]
        assert torch.equal(y, torch.cat(rows))
    assert_matmul_close(y, x, dense_fp32(packed, state), transposed=True)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 300),
    blocksize=st.sampled_from([32, 64, 128, 256, 4096]),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(QUANT_TYPES),
    m=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_kernels_agree_with_bitsandbytes_and_float64(rows, cols, blocksize, dtype, quant_type, m, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen) * 2).to(dtype)
    packed, state = fastlora.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    bnb_packed, bnb_state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(packed, bnb_packed) and torch.equal(state.absmax, bnb_state.absmax)
    assert torch.equal(fastlora.dequantize_4bit(packed, state), oracles.dequantize(bnb_packed, bnb_state))
    x = torch.randn(m, cols, generator=gen).to(dtype)
    assert_matmul_close(fastlora.matmul_4bit(x, packed, state), x, dense_fp32(packed, state))


class TestBadInput:
    def setup_method(self):
        self.w = random_weight((16, 64))
        self.packed, self.state = fastlora.quantize_4bit(self.w)

    def test_quantize_rejects_bad_arguments(self):
        with pytest.raises(TypeError, match="A must be"):
            fastlora.quantize_4bit(self.w.to(torch.int32))
        with pytest.raises(TypeError, match="A must be a torch.Tensor"):
            fastlora.quantize_4bit(np.ones(4))
        with pytest.raises(ValueError, match="blocksize"):
            fastlora.quantize_4bit(self.w, blocksize=48)
        with pytest.raises(ValueError, match="quant_type"):
            fastlora.quantize_4bit(self.w, quant_type="int4")
        with pytest.raises(ValueError, match="NaN or Inf"):
            fastlora.quantize_4bit(torch.tensor([1.0, float("nan")]))
        with pytest.raises(ValueError, match="at least one element"):
            fastlora.quantize_4bit(torch.empty(0))
        with pytest.raises(ValueError, match="device"):
            fastlora.quantize_4bit(self.w.to("meta"))

    def test_dequantize_rejects_a_state_that_does_not_fit(self):
        with pytest.raises(ValueError, match="packed holds"):
            fastlora.dequantize_4bit(self.packed[:-1], self.state)
        with pytest.raises(ValueError, match="contiguous"):
            fastlora.dequantize_4bit(torch.stack([self.packed, self.packed], 1)[:, 0], self.state)
        with pytest.raises(TypeError, match="quant_state"):
            fastlora.dequantize_4bit(self.packed, {"absmax": self.state.absmax})
        _, other = fastlora.quantize_4bit(random_weight((16, 128)))
        with pytest.raises(ValueError):
            fastlora.dequantize_4bit(self.packed, other)

    def test_matmul_rejects_mismatched_shapes_and_dtypes(self):
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
            fastlora.matmul_4bit(torch.randn(2, 63), self.packed, self.state)
        with pytest.raises(TypeError, match="x must be"):
            fastlora.matmul_4bit(torch.ones(2, 64, dtype=torch.int64), self.packed, self.state)
        with pytest.raises(ValueError, match="bias must have shape"):
            fastlora.matmul_4bit(torch.randn(2, 64), self.packed, self.state, bias=torch.randn(15))
        with pytest.raises(ValueError, match="device"):
            fastlora.matmul_4bit(torch.randn(2, 64, device="meta"), self.packed, self.state)

    def test_native_layer_rejects_wrong_lengths_without_crashing(self):
        bad_out = torch.empty(10)
        with pytest.raises(ValueError, match="out of range"):
            _cpu.dequantize_4bit_into(self.packed, self.state.absmax, 16 * 64, 64, "nf4", 16 * 64 - 5, bad_out)
        with pytest.raises(ValueError):
            _native.matmul_4bit(_cpu.as_numpy(torch.randn(3)), _cpu.as_numpy(self.packed),
                                _cpu.as_numpy(self.state.absmax), 16, 64, 64, "nf4", False,
                                _cpu.as_numpy(torch.empty(16)), "float32")
        with pytest.raises(ValueError, match="dtype"):
            _native.matmul_4bit(_cpu.as_numpy(torch.randn(64)), _cpu.as_numpy(self.packed),
                                _cpu.as_numpy(self.state.absmax), 16, 64, 64, "nf4", False,
                                _cpu.as_numpy(torch.empty(16)), "float64")


def test_the_binding_stubs_list_what_the_binding_has():
    """`_native.pyi` is written by hand: it must name exactly the binding's functions and
    classes, with the same parameter names."""
    import ast
    import inspect
    from pathlib import Path

    tree = ast.parse(Path(_native.__file__).with_name("_native.pyi").read_text())
    stubbed = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    stubbed |= {node.target.id: node for node in tree.body if isinstance(node, ast.AnnAssign)}
    public = {name for name in dir(_native) if not name.startswith("_")}
    assert set(stubbed) == public
    for name, node in stubbed.items():
        if isinstance(node, ast.FunctionDef):
            params = list(inspect.signature(getattr(_native, name)).parameters)
            assert [a.arg for a in node.args.args] == params, name
    methods = {n.name: n for n in stubbed["PackedWeight"].body if isinstance(n, ast.FunctionDef)}
    params = list(inspect.signature(_native.PackedWeight.matmul).parameters)
    assert [a.arg for a in methods["matmul"].args.args] == params


def test_a_prepared_weight_refuses_what_does_not_fit():
    packed, state = fastlora.quantize_4bit(random_weight((16, 64)))
    with pytest.raises(ValueError, match="absmax holds"):
        _native.PackedWeight(_cpu.as_numpy(packed), _cpu.as_numpy(state.absmax[:-1].contiguous()), 16, 64, 64, "nf4")
    with pytest.raises(ValueError, match="packed holds"):
        _native.PackedWeight(_cpu.as_numpy(packed), _cpu.as_numpy(state.absmax), 16, 128, 64, "nf4")
    with pytest.raises(ValueError, match="quant_type"):
        _native.PackedWeight(_cpu.as_numpy(packed), _cpu.as_numpy(state.absmax), 16, 64, 64, "int4")
    prepared = _cpu.prepare(packed.reshape(-1), state.block_scales(), 16, 64, 64, "nf4")
    with pytest.raises(ValueError, match="invalid data pointer"):
        prepared.native.matmul(0, 1, 0, "float32", False)
    with pytest.raises(ValueError, match="dtype"):
        prepared.native.matmul(0, 0, 0, "float64", False)
    with pytest.raises(ValueError, match="x must be a CPU float tensor"):
        prepared.matmul(torch.randn(2, 63))
    with pytest.raises(ValueError, match="x must be a CPU float tensor"):
        prepared.matmul(torch.randn(2, 64, dtype=torch.float64))


def _simd_level_under(**env) -> subprocess.CompletedProcess:
    code = "import fastlora; print(fastlora.simd_level())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **env})


def test_the_isa_cap_selects_every_level_and_refuses_what_it_cannot_honour():
    levels = fastlora.simd_levels()
    assert levels[0] == "scalar" and fastlora.simd_level() in levels
    for level in levels:
        proc = _simd_level_under(FASTLORA_MAX_ISA=level, FASTLORA_FORCE_SCALAR="")
        assert proc.returncode == 0 and proc.stdout.split()[-1] == level, proc.stderr[-2000:]
    proc = _simd_level_under(FASTLORA_MAX_ISA=levels[-1], FASTLORA_FORCE_SCALAR="1")
    assert proc.stdout.split()[-1] == "scalar"
    proc = _simd_level_under(FASTLORA_MAX_ISA="avx9")
    assert proc.returncode != 0 and 'FASTLORA_MAX_ISA="avx9": expected one of scalar' in proc.stderr
    for lacking in [level for level in ("avx2", "avx512") if level not in levels]:
        proc = _simd_level_under(FASTLORA_MAX_ISA=lacking)
        assert proc.returncode != 0 and f"this CPU does not have {lacking}" in proc.stderr


def test_native_bf16_needs_the_avx512_kernels():
    """Capped below AVX-512, the kernels do not claim native bf16 (whatever the CPU has)."""
    code = "import fastlora; print(fastlora.native_bf16())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                          env={**os.environ, "FASTLORA_MAX_ISA": "scalar"})
    assert proc.stdout.split()[-1] == "False"
    if "avx512" not in fastlora.simd_levels():
        assert not fastlora.native_bf16()


# The fp32 GEMMs this torch can run the tiles on (`FASTLORA_FP32_GEMM`).
FP32_GEMMS = ["blas"] + (["onednn"] if _cpu._ONEDNN_LINEAR is not None else [])


def fp32_gemm(name, x, w_rows):
    """The very fp32 GEMM `name` runs on one tile: x @ w_rows.T."""
    if name == "onednn":
        return _cpu._ONEDNN_LINEAR(x, w_rows, None, "none", [], "")
    return x @ w_rows.t()


@pytest.mark.parametrize("gemm", FP32_GEMMS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("n,k,tile_rows", [(300, 256, None), (301, 130, 64), (97, 4096, 7), (64, 64, 1)])
def test_tiled_fp32_product_against_float64_on_every_fp32_gemm(monkeypatch, gemm, transposed, n, k, tile_rows):
    """The many-row fp32 product on torch's BLAS and on oneDNN, whichever this CPU picks: one
    tile, several with a short last one, and one row per tile; outputs into which nothing
    was written first would be garbage, not small errors."""
    monkeypatch.setattr(_cpu, "FP32_GEMM", gemm)
    if tile_rows is not None:
        monkeypatch.setattr(_cpu, "TILE_BYTES", 4 * k * tile_rows)
    packed, state = fastlora.quantize_4bit(random_weight((n, k)), blocksize=64)
    exact = dense_fp32(packed, state)
    x = torch.randn(_cpu.FUSED_MAX_ROWS + 20, n if transposed else k)
    y = _cpu.product(x, packed, state.absmax, n, k, 64, "nf4", transposed)
    assert y.shape == (x.shape[0], k if transposed else n) and y.dtype == torch.float32
    assert_matmul_close(y, x, exact, transposed=transposed)
    if tile_rows is None and not transposed:  # one tile: the very GEMM, bit for bit
        assert torch.equal(y, fp32_gemm(gemm, x, exact))


def test_fp32_gemm_setting_is_checked_and_auto_follows_the_cpu():
    with pytest.raises(ValueError, match="FASTLORA_FP32_GEMM must be one of auto, blas, onednn, got 'mkl'"):
        _cpu.choose_fp32_gemm("mkl")
    assert _cpu.choose_fp32_gemm(" BLAS ") == "blas"
    if "onednn" in FP32_GEMMS:
        assert _cpu.choose_fp32_gemm("onednn") == "onednn"
    mkl_avx512_off_intel = (torch.backends.mkl.is_available() and "avx512" in fastlora.simd_levels()
                            and _native.cpu_vendor() != "GenuineIntel")
    expected = "onednn" if "onednn" in FP32_GEMMS and mkl_avx512_off_intel else "blas"
    assert _cpu.choose_fp32_gemm(None) == _cpu.choose_fp32_gemm("") == expected
    assert len(_native.cpu_vendor()) == (12 if platform.machine().lower() in ("x86_64", "amd64") else 0)
    code = "import fastlora; print(fastlora.fp32_gemm())"
    for setting in FP32_GEMMS:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              check=True, env={**os.environ, "FASTLORA_FP32_GEMM": setting})
        assert proc.stdout.split()[-1] == setting
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "FASTLORA_FP32_GEMM": "fastest"})
    assert proc.returncode != 0 and "FASTLORA_FP32_GEMM must be one of" in proc.stderr


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_many_bf16_rows_multiply_a_bf16_weight_only_where_the_cpu_has_native_bf16(monkeypatch, native, transposed):
    """Above FUSED_MAX_ROWS rows, bf16 activations meet a weight dequantized to bf16 in
    torch's bf16 GEMM where the CPU multiplies bf16 natively (as bitsandbytes and a bf16
    nn.Linear compute), else the exact fp32 weight in an fp32 GEMM; both on any CPU here."""
    monkeypatch.setattr(_cpu, "NATIVE_BF16", native)
    monkeypatch.setattr(_cpu, "FP32_GEMM", "blas")  # the fp32 side compared bit for bit with torch's matmul
    n, k, m = 96, 192, _cpu.FUSED_MAX_ROWS + 5
    packed, state = fastlora.quantize_4bit(random_weight((n, k)), blocksize=64)
    exact = dense_fp32(packed, state)
    x = torch.randn(m, n if transposed else k).to(torch.bfloat16)
    y = _cpu.product(x, packed, state.absmax, n, k, 64, "nf4", transposed)
    assert y.dtype == torch.bfloat16
    w = exact.to(torch.bfloat16) if native else exact
    if native and _cpu.BF16_GEMM:  # Rust's bf16 GEMM: its own sums of the rounded weight
        assert_bf16_product_close(y, x, w.t() if transposed else w)
    else:  # one tile (a small weight): the very GEMM torch runs on that weight
        assert torch.equal(y, (x.to(w.dtype) @ (w if transposed else w.t())).to(torch.bfloat16))
    other = exact if native else exact.to(torch.bfloat16)
    assert not torch.equal(y, (x.to(other.dtype) @ (other if transposed else other.t())).to(torch.bfloat16))
    assert_matmul_close(y, x, exact, transposed=transposed)


def assert_bf16_product_close(y, x, w_bf16):
    """y = x @ w.T for a bf16 weight, summed in fp32 and rounded to bf16 once: within half a
    bf16 unit of the float64 product plus fp32 summation error."""
    expected = x.double() @ w_bf16.double().t()
    bound = x.double().abs() @ w_bf16.double().abs().t()
    err = (y.double() - expected).abs()
    tol = expected.abs() * 2**-8 + bound * 1e-6
    assert (err <= tol).all(), f"max error {err.max().item()} vs tolerance {tol[err > tol].min().item()}"


@pytest.mark.skipif(not _cpu.BF16_GEMM, reason="Rust's bf16 GEMM needs AVX512-BF16")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("transposed,m,n,k,blocksize", [
    # x @ W.T: ragged panels of 64 columns and of 6 rows, rows that straddle blocks (k % 32 != 0:
    # decoded row by row), two panel depths, two passes.
    (False, 17, 70, 128, 64), (False, 23, 130, 200, 32), (False, 40, 64, 4160, 128), (False, 7, 3, 98, 4096),
    (False, 1030, 65, 64, 64),
    # x @ W (the input gradient): a last panel of 32 columns, k % 32 != 0 (decoded span by
    # span), two panel depths, two passes.
    (True, 17, 70, 160, 64), (True, 23, 130, 200, 32), (True, 40, 4160, 64, 128), (True, 7, 4, 98, 4096),
    (True, 1030, 64, 96, 64),
])
def test_the_bf16_gemm_against_float64_of_the_rounded_weight(quant_type, transposed, m, n, k, blocksize):
    """The native bf16 GEMM, either direction, into a poisoned output."""
    packed, state = fastlora.quantize_4bit(random_weight((n, k)), blocksize=blocksize, quant_type=quant_type,
                                           compress_statistics=False)
    x = torch.randn(m, n if transposed else k).to(torch.bfloat16)
    y = torch.full((m, k if transposed else n), float("nan"), dtype=torch.bfloat16)
    _native.matmul_4bit_bf16(_cpu.as_numpy(x), _cpu.as_numpy(packed), _cpu.as_numpy(state.absmax), n, k, blocksize,
                             quant_type, transposed, _cpu.as_numpy(y))
    w = dense_fp32(packed, state).to(torch.bfloat16)
    assert_bf16_product_close(y, x, w.t() if transposed else w)


@pytest.mark.skipif(not _cpu.BF16_GEMM, reason="Rust's bf16 GEMM needs AVX512-BF16")
@pytest.mark.parametrize("transposed,m,n,k", [(False, 23, 130, 200), (False, 1030, 65, 64), (True, 23, 130, 200),
                                              (True, 40, 4160, 64)])
@pytest.mark.parametrize("rank", [2, 16])
def test_the_bf16_gemm_adds_a_low_rank_term_before_rounding(transposed, m, n, k, rank):
    """x @ W.T + scale * u @ factor.T (x @ W + scale * u @ factor): ragged panels and rows,
    two passes, two panel depths, into a poisoned output."""
    packed, state = fastlora.quantize_4bit(random_weight((n, k)), compress_statistics=False)
    x = torch.randn(m, n if transposed else k).to(torch.bfloat16)
    u = torch.randn(m, rank).to(torch.bfloat16)
    factor = torch.randn((rank, k) if transposed else (n, rank)).to(torch.bfloat16)
    y = torch.full((m, k if transposed else n), float("nan"), dtype=torch.bfloat16)
    _native.matmul_4bit_bf16(_cpu.as_numpy(x), _cpu.as_numpy(packed), _cpu.as_numpy(state.absmax), n, k, 64, "nf4",
                             transposed, _cpu.as_numpy(y), (_cpu.as_numpy(u), _cpu.as_numpy(factor), rank, 0.75))
    w = dense_fp32(packed, state).to(torch.bfloat16)
    # One product over [x, 0.75 u] and [W, factor] stacked along the summed-over dimension.
    operand = torch.cat([w.t() if transposed else w, (factor.t() if transposed else factor).to(torch.bfloat16)], 1)
    assert_bf16_product_close(y, torch.cat([x.double(), 0.75 * u.double()], 1), operand.double())


@pytest.mark.skipif(not _cpu.BF16_GEMM, reason="Rust's bf16 GEMM needs AVX512-BF16")
@pytest.mark.parametrize("rank", [4, 5])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_a_many_row_bf16_lora_product_adds_its_terms_in_the_bf16_gemm(monkeypatch, rank, nested, dropout):
    """The LoRA op's many-row bf16 products with bf16 adapters (as autocast casts them): at an
    even rank the up-projection rides in Rust's GEMM, and without dropout so does dx's
    `g @ B @ A` in the transposed one (an odd rank: torch's addmm); with a bias; against float64."""
    seen = []
    gemm = _native.matmul_4bit_bf16
    monkeypatch.setattr(_native, "matmul_4bit_bf16", lambda *args: seen.append(args[-1] is not None) or gemm(*args))
    n, k, m, scaling = 70, 192, _cpu.FUSED_MAX_ROWS + 7, 2.0
    packed, state = fastlora.quantize_4bit(random_weight((n, k)), blocksize=64, compress_statistics=nested)
    x = torch.randn(3, m, k).to(torch.bfloat16).requires_grad_()
    x_drop = torch.randn(3, m, k).to(torch.bfloat16).requires_grad_() if dropout else x
    A, B, bias = (torch.randn(shape).to(torch.bfloat16) for shape in ((rank, k), (n, rank), (n,)))
    y = fastlora.ops.lora.lora_linear_4bit(x, x_drop, packed, state.block_scales(), bias, A, B, scaling, 64, "nf4")
    assert y.shape == (3, m, n) and y.dtype == torch.bfloat16 and seen == [rank % 2 == 0]
    w = dense_fp32(packed, state).to(torch.bfloat16).double()
    even = rank % 2 == 0

    def assert_close(got, expected, bound, extra=0):
        # Rounded once by the GEMM (once more where a bias is added, `extra`); torch's bf16
        # addmm also rounds its rank-r product, an error relative to the terms' magnitude.
        tol = (expected.abs() + extra + (0 if even else bound)) * 2**-7 + bound * 1e-6
        err = (got.double() - expected).abs()
        assert (err <= tol).all(), f"max error {err.max().item()}"

    u = (x_drop.detach().reshape(-1, k) @ A.t()).double()  # the bf16 up-projection, as both paths round it
    x2d, b64 = x.detach().reshape(-1, k).double(), bias.double()
    expected = x2d @ w.t() + scaling * u @ B.double().t() + b64
    bound = x2d.abs() @ w.abs().t() + scaling * u.abs() @ B.double().abs().t()
    assert_close(y.detach().reshape(-1, n), expected, bound, b64.abs())

    del seen[:]
    g = torch.randn(3, m, n).to(torch.bfloat16)
    y.backward(g)
    assert seen == [even and not dropout]
    g2d = g.reshape(-1, n)
    g_u = ((g2d @ B) * scaling).double()  # as the backward rounds it, in the adapter's dtype
    dx = g2d.double() @ w
    dx_bound = g2d.double().abs() @ w.abs()
    if not dropout:
        dx, dx_bound = dx + g_u @ A.double(), dx_bound + g_u.abs() @ A.double().abs()
    assert_close(x.grad.reshape(-1, k), dx, dx_bound, 0 if even else dx_bound)


@pytest.mark.skipif(not _cpu.BF16_GEMM, reason="Rust's bf16 GEMM needs AVX512-BF16")
def test_the_bf16_gemm_refuses_bad_shapes_with_a_clear_error():
    packed, state = fastlora.quantize_4bit(random_weight((4, 64)), compress_statistics=False)
    args = (_cpu.as_numpy(packed), _cpu.as_numpy(state.absmax))
    x, y = torch.randn(3, 64).to(torch.bfloat16), torch.empty(3, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="y holds 8"):
        _native.matmul_4bit_bf16(_cpu.as_numpy(x), *args, 4, 64, 64, "nf4", False, _cpu.as_numpy(y[:2]))
    with pytest.raises(ValueError, match="128 elements need 64"):
        _native.matmul_4bit_bf16(_cpu.as_numpy(x), *args, 2, 64, 64, "nf4", False, _cpu.as_numpy(y))
    with pytest.raises(ValueError, match="not a whole number of rows"):
        _native.matmul_4bit_bf16(_cpu.as_numpy(x[:2, :40].contiguous()), *args, 4, 64, 64, "nf4", False,
                                 _cpu.as_numpy(y))
    with pytest.raises(ValueError, match="expected 3 x 64"):  # x @ W: y has the weight's 64 columns
        _native.matmul_4bit_bf16(_cpu.as_numpy(torch.randn(3, 4).to(torch.bfloat16)), *args, 4, 64, 64, "nf4",
                                 True, _cpu.as_numpy(y))
    odd, odd_state = fastlora.quantize_4bit(random_weight((3, 64)), compress_statistics=False)
    with pytest.raises(ValueError, match="even number of weight rows"):
        _native.matmul_4bit_bf16(_cpu.as_numpy(torch.randn(1, 3).to(torch.bfloat16)), _cpu.as_numpy(odd),
                                 _cpu.as_numpy(odd_state.absmax), 3, 64, 64, "nf4", True,
                                 _cpu.as_numpy(torch.empty(1, 64, dtype=torch.bfloat16)))
    u, factor = (_cpu.as_numpy(torch.randn(shape).to(torch.bfloat16)) for shape in ((3, 3), (4, 3)))
    for rank, message in ((3, "even rank, got 3"), (2, "u holds 9 values, expected 3 x 2")):
        with pytest.raises(ValueError, match=message):
            _native.matmul_4bit_bf16(_cpu.as_numpy(x), *args, 4, 64, 64, "nf4", False, _cpu.as_numpy(y),
                                     (u, factor, rank, 1.0))
    odd, odd_state = fastlora.quantize_4bit(random_weight((2, 63)), compress_statistics=False)
    with pytest.raises(ValueError, match="even number of columns"):
        _native.matmul_4bit_bf16(_cpu.as_numpy(torch.randn(1, 63).to(torch.bfloat16)), _cpu.as_numpy(odd),
                                 _cpu.as_numpy(odd_state.absmax), 2, 63, 64, "nf4", False,
                                 _cpu.as_numpy(torch.empty(1, 2, dtype=torch.bfloat16)))


_THREAD_POOL_OUTPUTS = """
import sys, torch, fastlora
from fastlora.backends import cpu as _cpu
from safetensors.torch import save_file
torch.manual_seed(5)
torch.set_num_threads(2)
w = torch.randn(768, 1024)
packed, state = fastlora.quantize_4bit(w)  # 786k elements: past the inline threshold
plain, plain_state = fastlora.quantize_4bit(w, compress_statistics=False)
x1, x16, dy = torch.randn(1, 1024), torch.randn(16, 1024), torch.randn(16, 768)
a, b = torch.randn(8, 1024), torch.randn(768, 8)
layer = fastlora.nn.LoraLinear(fastlora.Linear4bit.from_linear(torch.nn.Linear(1024, 768)), r=8)
with torch.no_grad():
    layer.lora_B.weight.normal_()
save_file({"packed": packed, "absmax": state.absmax, "dense": fastlora.dequantize_4bit(packed, state),
           "y1": fastlora.matmul_4bit(x1, packed.t(), state), "y16": fastlora.matmul_4bit(x16, packed.t(), state),
           "dx": _cpu.product(dy, plain, plain_state.absmax, 768, 1024, 64, "nf4", True),
           "lora": layer(x16).detach()},
          sys.argv[1])
print(fastlora.thread_pool())
"""


def test_torchs_openmp_team_and_the_rayon_pool_give_the_same_bytes(tmp_path):
    """Every kernel, past the size that runs inline, gives the same bytes on torch's OpenMP
    team (the default where torch has one), on fastlora's rayon pool and on one thread."""
    from safetensors.torch import load_file

    from fastlora import _threads

    runs = {}
    for pool, threads in (("auto", 2), ("rayon", 2), ("rayon", 1)):
        out = tmp_path / f"{pool}{threads}.safetensors"
        env = {**os.environ, "FASTLORA_THREAD_POOL": pool, "OMP_NUM_THREADS": str(threads)}
        code = _THREAD_POOL_OUTPUTS.replace("torch.set_num_threads(2)", f"torch.set_num_threads({threads})")
        proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        expected_pool = "openmp" if pool == "auto" and _threads.torch_openmp_runtime() else "rayon"
        assert proc.stdout.split() == [expected_pool]
        runs[pool, threads] = load_file(out)
    first = runs["auto", 2]
    for other in runs.values():
        assert first.keys() == other.keys() and all(torch.equal(first[k], other[k]) for k in first)
    assert torch.isfinite(first["lora"]).all() and first["y1"].abs().sum() > 0


def test_thread_pool_setting_and_a_forked_child():
    from fastlora import _threads

    forced_rayon = os.environ.get("FASTLORA_THREAD_POOL", "auto").strip().lower() == "rayon"
    assert fastlora.thread_pool() == ("openmp" if _threads.torch_openmp_runtime() and not forced_rayon else "rayon")
    bad = subprocess.run([sys.executable, "-c", "import fastlora"], capture_output=True, text=True,
                         env={**os.environ, "FASTLORA_THREAD_POOL": "tbb"}, timeout=120)
    assert bad.returncode != 0 and "FASTLORA_THREAD_POOL must be one of auto, openmp, rayon, got 'tbb'" in bad.stderr
    # A forked child has no OpenMP team behind its copy of the parent's: it uses its own pool.
    w = random_weight((512, 1024))
    packed, state = fastlora.quantize_4bit(w)
    x = torch.randn(8, 1024)
    parent = fastlora.matmul_4bit(x, packed.t(), state)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's cleanup
        try:
            same = torch.equal(fastlora.matmul_4bit(x, packed.t(), state), parent)
            os.write(write, f"{int(same)} {fastlora.thread_pool()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        assert f.read() == "1 rayon" and status == 0
