"""The bitsandbytes value oracle (`oracles`): a wrong bitsandbytes result is replaced by the
exact formula, and a test that met one is reported as skipped, never as passed or hidden."""

from pathlib import Path

import bitsandbytes.functional as bnbF
import torch

import oracles


def test_a_wrong_dequantize_is_replaced_by_the_exact_formula(monkeypatch):
    w = torch.randn(64, 96)
    packed, state = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    right = oracles.exact_dequantize(packed, state)
    assert (right - w).abs().max() < 0.2 * w.abs().max()  # the formula is a real decode

    real = bnbF.dequantize_4bit
    monkeypatch.setattr(bnbF, "dequantize_4bit", lambda p, s: real(p, s) + 2.0)
    assert torch.equal(oracles.dequantize(packed, state), right)
    [call] = oracles.take_wrong_calls()
    assert "dequantize_4bit is wrong on this CPU for shape (64, 96) nf4 blocksize 64 nested" in call


def test_a_wrong_matmul_is_replaced_by_the_exact_product(monkeypatch):
    import bitsandbytes

    w, x = torch.randn(40, 96), torch.randn(3, 96)
    packed, state = bnbF.quantize_4bit(w, quant_type="fp4")
    right = x @ oracles.exact_dequantize(packed, state).t()
    real = bitsandbytes.matmul_4bit
    monkeypatch.setattr(bitsandbytes, "matmul_4bit", lambda *a, **kw: real(*a, **kw) * 1.01)
    torch.testing.assert_close(oracles.matmul(x, packed.t(), state), right, rtol=1e-5, atol=1e-5)
    assert len(oracles.take_wrong_calls()) == 1


def test_a_test_that_met_a_wrong_call_is_skipped_and_a_failing_one_still_fails(pytester):
    here = Path(__file__).parent
    pytester.makeconftest((here / "conftest.py").read_text())
    pytester.makepyfile(
        test_inner="""
import oracles

def test_met_wrong_call():
    oracles._wrong_calls.append("bitsandbytes X is wrong")

def test_met_wrong_call_and_failed():
    oracles._wrong_calls.append("bitsandbytes X is wrong")
    assert False

def test_clean():
    pass
"""
    )
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1, failed=1)
    result.stdout.fnmatch_lines(["*comparison(s) with bitsandbytes skipped: bitsandbytes X is wrong*"])
