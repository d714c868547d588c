"""`fastlora.lora_batched`: a batch whose rows use different adapters, on the Rust kernel and
the Triton kernel (under Triton's interpreter without a GPU), against the gather + einsum
reference (`fastlora.reference`) and a float64 computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlora
from fastlora import _native, reference
from fastlora.backends import cpu as _cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def adapters(n: int, r: int, k: int, o: int, dtype=torch.float32, gen=None):
    A = (torch.randn(n, r, k, generator=gen) / k**0.5).to(dtype)
    B = torch.randn(n, o, r, generator=gen).to(dtype)
    scaling = torch.rand(n, generator=gen) * 2 + 0.25
    return A, B, scaling


def float64(x, A, B, indices, scaling) -> torch.Tensor:
    rows = []
    for t, i in enumerate(indices.tolist()):
        if i < 0:
            rows.append(torch.zeros(B.shape[1], dtype=torch.float64))
        else:
            rows.append(float(scaling[i]) * (x[t].double() @ A[i].double().T) @ B[i].double().T)
    return torch.stack(rows)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * (1 + want.abs().max().item()))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), k=st.integers(1, 70), r=st.integers(1, 20), o=st.integers(1, 40),
       n=st.integers(1, 5), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_the_reference_and_float64(rows, k, r, o, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    A, B, scaling = adapters(n, r, k, o, dtype, gen)
    indices = torch.randint(-1, n, (rows,), generator=gen)
    y = fastlora.lora_batched(x, A, B, indices, scaling)
    assert y.dtype == dtype and y.shape == (rows, o)
    assert_close(y, reference.lora_batched(x, A, B, indices, scaling), dtype)
    assert_close(y, float64(x, A, B, indices, scaling), dtype)


def test_native_kernel_writes_every_element_of_a_poisoned_output(gen):
    x = torch.randn(5, 33, generator=gen)
    A, B, scaling = adapters(3, 4, 33, 21, gen=gen)
    indices = torch.tensor([0, -1, 2, -1, 1])
    y = torch.full((5, 21), float("nan"))
    _native.lora_batched(_cpu.as_numpy(x), _cpu.as_numpy(A), _cpu.as_numpy(B), _cpu.as_numpy(indices),
                         _cpu.as_numpy(scaling), 33, 4, 21, _cpu.as_numpy(y), "float32")
    assert not y.isnan().any()
    assert torch.equal(y[1], torch.zeros(21)) and torch.equal(y[3], torch.zeros(21))


def test_a_mixed_batch_equals_each_row_alone_with_its_adapter(gen):
    x = torch.randn(7, 48, generator=gen)
    A, B, scaling = adapters(3, 8, 48, 30, gen=gen)
    indices = torch.tensor([2, 0, -1, 1, 2, 0, 1])
    y = fastlora.lora_batched(x, A, B, indices, scaling)
    for t, i in enumerate(indices.tolist()):
        alone = fastlora.lora_batched(x[t:t + 1], A, B, torch.tensor([i]), scaling)
        torch.testing.assert_close(y[t:t + 1], alone, rtol=1e-6, atol=1e-6)
        if i >= 0:  # and the plain single-adapter LoRA term
            torch.testing.assert_close(y[t], scaling[i] * (x[t] @ A[i].T) @ B[i].T, rtol=1e-5, atol=1e-5)


def test_padded_ranks_change_nothing(gen):
    """An adapter of rank 3 stacked with one of rank 8: its A padded with zero rows."""
    x = torch.randn(4, 40, generator=gen)
    small_A, small_B = torch.randn(3, 40, generator=gen), torch.randn(25, 3, generator=gen)
    A = torch.zeros(2, 8, 40)
    B = torch.randn(2, 25, 8, generator=gen)  # B's padding columns meet zeros of h: any values
    A[0, :3], B[0, :, :3] = small_A, small_B
    A[1] = torch.randn(8, 40, generator=gen)
    scaling = torch.tensor([0.5, 2.0])
    y = fastlora.lora_batched(x, A, B, torch.tensor([0, 1, 0, -1]), scaling)
    torch.testing.assert_close(y[0], 0.5 * (x[0] @ small_A.T) @ small_B.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[2], 0.5 * (x[2] @ small_A.T) @ small_B.T, rtol=1e-5, atol=1e-5)


def test_every_row_on_one_adapter_or_none(gen):
    x = torch.randn(6, 24, generator=gen)
    A, B, scaling = adapters(2, 4, 24, 10, gen=gen)
    none = fastlora.lora_batched(x, A, B, torch.full((6,), -1), scaling)
    assert torch.equal(none, torch.zeros(6, 10))
    all_one = fastlora.lora_batched(x, A, B, torch.ones(6, dtype=torch.int32), scaling)
    torch.testing.assert_close(all_one, scaling[1] * (x @ A[1].T) @ B[1].T, rtol=1e-5, atol=1e-5)
    empty = fastlora.lora_batched(x, A[:0], B[:0], torch.full((6,), -1), torch.empty(0))
    assert torch.equal(empty, torch.zeros(6, 10))


def test_out_accumulates_the_term_into_the_base_output(gen):
    x = torch.randn(3, 16, generator=gen)
    A, B, _ = adapters(2, 4, 16, 12, gen=gen)
    base = torch.randn(3, 12, generator=gen)
    out = base.clone()
    result = fastlora.lora_batched(x, A, B, torch.tensor([1, -1, 0]), 0.75, out=out)
    assert result is out
    torch.testing.assert_close(out, base + reference.lora_batched(x, A, B, torch.tensor([1, -1, 0]),
                                                                  torch.full((2,), 0.75)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,k,r,o", [(5, 190, 3, 77), (1, 4096, 16, 64), (9, 33, 20, 130),
                                        (40, 70, 3, 77), (100, 130, 16, 65), (33, 16, 20, 130)])
def test_triton_kernel_matches_the_reference(dtype, rows, k, r, o, gen):
    """Per-row kernel up to 32 rows, the segment kernel above (segments of 0 to 3 tiles)."""
    from fastlora.kernels import lora_batched as kernel

    x = torch.randn(rows, k, generator=gen).to(dtype)
    A, B, scaling = adapters(4, r, k, o, dtype, gen)
    indices = torch.randint(-1, 4, (rows,), generator=gen)
    y = kernel.lora_batched(x.to(DEVICE), A.to(DEVICE), B.to(DEVICE), indices.to(DEVICE), scaling.to(DEVICE))
    assert_close(y.cpu(), float64(x, A, B, indices, scaling), dtype)


@pytest.mark.parametrize("indices", [[-1] * 50, [2] * 70, [0] * 33 + [-1] * 2 + [1] * 31])
def test_triton_segment_kernel_on_one_adapter_or_none(indices, gen):
    from fastlora.kernels import lora_batched as kernel

    indices = torch.tensor(indices)
    x = torch.randn(len(indices), 48, generator=gen)
    A, B, scaling = adapters(3, 4, 48, 70, gen=gen)
    y = kernel.lora_batched(x.to(DEVICE), A.to(DEVICE), B.to(DEVICE), indices.to(DEVICE), scaling.to(DEVICE))
    assert_close(y.cpu(), float64(x, A, B, indices, scaling), torch.float32)


def test_the_op_passes_opcheck(gen):
    x = torch.randn(4, 20, generator=gen)
    A, B, scaling = adapters(3, 4, 20, 9, gen=gen)
    torch.library.opcheck(torch.ops.fastlora.lora_batched.default, (x, A, B, torch.tensor([0, -1, 2, 1]), scaling))


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.randn(4, 20, 1)), ValueError, r"x must have shape \(T, K\)"),
    (dict(A=torch.randn(3, 4, 21)), ValueError, r"A must have shape \(n, r, 20\)"),
    (dict(B=torch.randn(3, 9, 5)), ValueError, r"B must have shape \(3, O, 4\)"),
    (dict(A=torch.randn(3, 4, 20, dtype=torch.float64)), TypeError, "A has dtype"),
    (dict(indices=torch.tensor([0, 1, 2])), ValueError, "indices must be 4 int32 or int64"),
    (dict(indices=torch.tensor([0.0, 1, 2, 0])), ValueError, "indices must be 4 int32 or int64"),
    (dict(indices=torch.tensor([0, 3, 1, 0])), ValueError, r"indices must lie in \[-1, 3\)"),
    (dict(indices=torch.tensor([0, -2, 1, 0])), ValueError, r"indices must lie in \[-1, 3\)"),
    (dict(scaling=torch.ones(2)), ValueError, "scaling must be 3 float values"),
    (dict(out=torch.zeros(4, 8)), ValueError, r"out must be a torch.float32 tensor of shape \(4, 9\)"),
    (dict(x=torch.randn(4, 20, device="meta")), ValueError, "device"),
])
def test_bad_arguments_are_clear_errors(change, error, match, gen):
    A, B, scaling = adapters(3, 4, 20, 9, gen=gen)
    args = dict(x=torch.randn(4, 20, generator=gen), A=A, B=B, indices=torch.tensor([0, -1, 2, 1]),
                scaling=scaling, out=None)
    args.update(change)
    with pytest.raises(error, match=match):
        fastlora.lora_batched(**args)


def test_triton_rows_do_not_depend_on_the_batch_around_them(gen):
    """32 rows take the per-row kernel, 33 the segment kernel: in fp16 the same values for the
    same rows (both keep the rank-r vector in fp32)."""
    from fastlora.kernels import lora_batched as kernel

    x = torch.randn(33, 96, generator=gen).half()
    A, B, scaling = adapters(3, 8, 96, 40, torch.float16, gen)
    indices = torch.randint(-1, 3, (33,), generator=gen)
    args = [t.to(DEVICE) for t in (A, B)]
    small = kernel.lora_batched(x[:32].to(DEVICE), *args, indices[:32].to(DEVICE), scaling.to(DEVICE))
    large = kernel.lora_batched(x.to(DEVICE), *args, indices.to(DEVICE), scaling.to(DEVICE))
    torch.testing.assert_close(large[:32].float(), small.float(), rtol=1e-3, atol=1e-3)
