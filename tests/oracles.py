"""bitsandbytes as an oracle: for bytes always, for values only where it is right.

bitsandbytes' quantize defines fastlora's bytes and scales. The value of a dequantized weight
or a 4-bit product is defined by the exact formula, `code[nibble] * absmax[block]` in fp32,
which this module writes out from bitsandbytes' own `QuantState` fields (independently of
fastlora's code). bitsandbytes 0.50.2's CPU dequantize (and so its matmul) is wrong for some
shapes on AVX-512 CPUs; there its kernel's output is replaced by the exact formula over its
own state, so every comparison made with it still checks fastlora against the right values,
and the test is reported as skipped, with a message naming the wrong bitsandbytes call,
once its assertions have passed (see `conftest.pytest_runtest_call`).
"""

from __future__ import annotations

import bitsandbytes
import bitsandbytes.functional as bnbF
import torch

_wrong_calls: list[str] = []


def take_wrong_calls() -> list[str]:
    """The bitsandbytes calls found wrong since the last call (and forgets them)."""
    calls = list(_wrong_calls)
    _wrong_calls.clear()
    return calls


def exact_absmax(state: bnbF.QuantState) -> torch.Tensor:
    """The fp32 block scales a bitsandbytes state stands for: `code2[q] * absmax2[i // 256] +
    offset` when double-quantized."""
    if not state.nested:
        return state.absmax.float()
    state2 = state.state2
    per_block = state2.absmax.float().repeat_interleave(state2.blocksize)[: state.absmax.numel()]
    return state2.code.float()[state.absmax.long()] * per_block + torch.as_tensor(state.offset).float()


def exact_dequantize(packed: torch.Tensor, state: bnbF.QuantState) -> torch.Tensor:
    """`code[nibble] * absmax[block]` in fp32, cast once to the state's dtype; high nibble first."""
    numel = state.shape.numel()
    data = packed.reshape(-1).view(torch.uint8).long()
    nibbles = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:numel]
    scales = exact_absmax(state).repeat_interleave(state.blocksize)[:numel]
    return (state.code.float()[nibbles] * scales).to(state.dtype).reshape(state.shape)


def _record(call: str, state: bnbF.QuantState, error: float) -> None:
    shape = "" if state.shape is None else f" shape {tuple(state.shape)}"
    kind = " ".join(str(v) for v in (state.quant_type, f"blocksize {state.blocksize}") if v)
    _wrong_calls.append(
        f"bitsandbytes {bitsandbytes.__version__} {call} is wrong on this CPU for{shape} {kind}"
        f"{' nested' if state.nested else ''} (max error {error:.3g} against the exact formula); "
        "compared with the exact formula instead"
    )


def _agrees(call: str, state: bnbF.QuantState, theirs: torch.Tensor, exact: torch.Tensor) -> bool:
    if torch.equal(theirs, exact):
        return True
    _record(call, state, (theirs.float() - exact.float()).abs().max().item())
    return False


def absmax(state: bnbF.QuantState) -> torch.Tensor:
    """bitsandbytes' decode of double-quantized block scales where it equals the exact
    formula, else that formula (recorded as a wrong call)."""
    exact = exact_absmax(state)
    theirs = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return theirs if _agrees("dequantize_blockwise", state, theirs, exact) else exact


def dequantize_blockwise(quantized: torch.Tensor, state: bnbF.QuantState) -> torch.Tensor:
    """bitsandbytes' 8-bit blockwise decode where it equals `code[q] * absmax[i // blocksize]`,
    else that formula (recorded as a wrong call)."""
    scales = state.absmax.float().repeat_interleave(state.blocksize)[: quantized.numel()]
    exact = (state.code.float()[quantized.reshape(-1).long()] * scales).reshape(quantized.shape)
    theirs = bnbF.dequantize_blockwise(quantized, absmax=state.absmax, code=state.code, blocksize=state.blocksize)
    return theirs if _agrees("dequantize_blockwise", state, theirs, exact) else exact


def dequantize(packed: torch.Tensor, state: bnbF.QuantState, *, kernel_output: torch.Tensor | None = None
               ) -> torch.Tensor:
    """bitsandbytes' dequantize in the state's shape where it equals the exact formula,
    else the exact formula (recorded as a wrong call). `kernel_output` is bitsandbytes' result
    when the caller had to obtain it another way (default: `bnbF.dequantize_4bit`)."""
    exact = exact_dequantize(packed, state)
    theirs = kernel_output if kernel_output is not None else bnbF.dequantize_4bit(packed, state)
    theirs = theirs.reshape(state.shape)
    return theirs if _agrees("dequantize_4bit", state, theirs, exact) else exact


def matmul(x: torch.Tensor, packed_t: torch.Tensor, state: bnbF.QuantState, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """`bitsandbytes.matmul_4bit(x, packed_t, state, bias)` where it agrees with the exact
    product (float64 over the exact weight) to fp32 rounding, else that exact product in x's
    dtype (recorded as a wrong call)."""
    theirs = bitsandbytes.matmul_4bit(x, packed_t, quant_state=state, bias=bias)
    w = exact_dequantize(packed_t.t(), state).double()
    exact = x.double() @ w.t() + (0 if bias is None else bias.double())
    rtol = max(1e-5, 4 * torch.finfo(x.dtype).eps)
    bound = (x.double().abs() @ w.abs().t()) * rtol + rtol
    if bool(((theirs.double() - exact).abs() <= bound).all()):
        return theirs
    _record("matmul_4bit", state, (theirs.double() - exact).abs().max().item())
    return exact.to(x.dtype)


def model_weights_are_exact(model: torch.nn.Module) -> bool:
    """Whether bitsandbytes dequantizes every `Linear4bit` weight of `model` exactly on this
    CPU, so that the model's outputs are a value oracle; records the wrong ones."""
    checks = [
        _agrees("dequantize_4bit", m.weight.quant_state,
                bnbF.dequantize_4bit(m.weight.data, m.weight.quant_state).reshape(m.weight.quant_state.shape),
                exact_dequantize(m.weight.data, m.weight.quant_state))
        for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)
    ]
    return all(checks)
