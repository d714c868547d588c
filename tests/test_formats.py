"""fastlora.formats, fastlora.reference and fastlora.quant_state against bitsandbytes.

bitsandbytes 0.50.2 on CPU is the oracle: the reference must reproduce its packed
bytes, scales and double-quantized scales bit for bit, and QuantState
dictionaries must round-trip between the two libraries. Every test draws fresh
random data from the suite's seed (conftest.py: the header prints it, FASTLORA_SEED replays it).
"""

from __future__ import annotations

import json
from math import prod

import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles
from fastlora import formats, reference
from fastlora.quant_state import QuantState

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 1-D, 2-D and 3-D; odd counts; counts below, at and above a block; a single element.
SHAPES = ((1,), (2,), (3,), (1, 2), (7, 9), (64, 130), (3, 5, 33), (4097,), (2, 4096))


@pytest.fixture(autouse=True, scope="module")
def _eager_bitsandbytes():
    # bitsandbytes dequantizes shapes with an odd last dimension through a
    # torch.compile'd function that recompiles for every shape (seconds each);
    # eager mode computes the same thing.
    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal values at a random scale, so that no tensor is all zeros."""
    scale = 10 ** (torch.rand((), generator=gen).item() * 4 - 2)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that comparisons see -0.0 and NaN payloads."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def bnb_dequantize(packed: torch.Tensor, state: bnbF.QuantState) -> torch.Tensor:
    """bitsandbytes' dequantization, in the original shape, where it is right on this CPU
    (`oracles.dequantize`).

    Two quirks of bitsandbytes are undone here: its CPU kernel returns a 1-D
    shape of even length as ``(1, n)``, and its functional wrapper transposes
    the result when the packed tensor has a single row (a legacy layout), which
    raises for a 3-D tensor of 1 or 2 elements; that case calls the kernel.
    """
    if packed.shape[0] > 1:
        dense = bnbF.dequantize_4bit(packed, state)
    else:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
        dense = torch.ops.bitsandbytes.dequantize_4bit(
            packed, absmax, state.blocksize, state.quant_type, state.shape, state.dtype
        )
    return oracles.dequantize(packed, state, kernel_output=dense)


def assert_matches_bitsandbytes(A: torch.Tensor, blocksize: int, quant_type: str) -> None:
    packed, state = bnbF.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
    ref_packed, ref_absmax = reference.quantize_4bit(A, blocksize, quant_type)
    assert ref_packed.dtype == torch.uint8 and ref_packed.shape == packed.shape
    assert torch.equal(ref_packed, packed)
    assert torch.equal(bits(ref_absmax), bits(state.absmax))
    dense = reference.dequantize_4bit(ref_packed, ref_absmax, blocksize, quant_type, A.shape, A.dtype)
    assert dense.dtype == A.dtype and dense.shape == A.shape
    assert torch.equal(dense, bnb_dequantize(packed, state))


def assert_nested_matches_bitsandbytes(A: torch.Tensor, blocksize: int, quant_type: str) -> None:
    packed, state = bnbF.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    ref_packed, qabsmax, nested_absmax, offset = reference.quantize_4bit_nested(A, blocksize, quant_type)
    assert torch.equal(ref_packed, packed)
    assert qabsmax.dtype == torch.uint8 and torch.equal(qabsmax, state.absmax)
    assert torch.equal(bits(nested_absmax), bits(state.state2.absmax))
    assert offset.dtype == torch.float32 and offset.dim() == 0
    assert torch.equal(bits(offset), bits(state.offset))
    assert torch.equal(bits(formats.dynamic_map()), bits(state.state2.code))
    assert (state.state2.blocksize, state.state2.dtype) == (formats.NESTED_BLOCKSIZE, torch.float32)
    scales = reference.dequantize_nested_absmax(qabsmax, nested_absmax, offset, formats.dynamic_map())
    assert torch.equal(bits(scales), bits(oracles.absmax(state)))
    dense = reference.dequantize_4bit(ref_packed, scales, blocksize, quant_type, A.shape, A.dtype)
    assert torch.equal(dense, bnb_dequantize(packed, state))


# ---- formats ------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_code_table_is_bitsandbytes_table(quant_type):
    code = formats.code_tensor(quant_type)
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(bits(code), bits(bnbF.get_4bit_type(quant_type, device="cpu")))
    constant = formats.NF4_CODE if quant_type == "nf4" else formats.FP4_CODE
    assert code.tolist() == list(constant)  # the literals are exact float32 values


def test_code_tensor_returns_a_private_copy():
    formats.code_tensor("nf4").fill_(7.0)
    assert formats.code_tensor("nf4").tolist() == list(formats.NF4_CODE)
    formats.dynamic_map().zero_()
    assert formats.dynamic_map()[-1].item() == 1.0


def test_format_constants():
    assert formats.QUANT_TYPES == ("nf4", "fp4")
    assert formats.BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)
    assert formats.NESTED_BLOCKSIZE == 256
    with pytest.raises(ValueError, match="quant_type"):
        formats.code_tensor("int4")


def test_dynamic_map_is_what_bitsandbytes_stores(gen):
    dynamic = formats.dynamic_map()
    assert dynamic.dtype == torch.float32 and dynamic.shape == (256,)
    assert torch.equal(bits(dynamic), bits(bnbF.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)))
    # bitsandbytes 0.50.2 no longer overwrites code[0] with -1.0 while quantizing:
    # the map in the state is the unmodified one, starting at -0.99297.
    _, state = bnbF.quantize_4bit(random_tensor((64, 128), torch.float32, gen), compress_statistics=True)
    assert torch.equal(bits(state.state2.code), bits(dynamic))
    assert dynamic[0].item() == pytest.approx(-0.992968738079071, abs=0)
    assert torch.equal(dynamic, dynamic.sort().values)


# ---- 4-bit quantization -------------------------------------------------------------


def test_fp4_example_from_the_format_notes():
    packed, absmax = reference.quantize_4bit(torch.tensor([1.0, -1.0, 0.5, -0.25]), 64, "fp4")
    assert packed.flatten().tolist() == [0x3B, 0x5F]
    assert absmax.tolist() == [1.0]
    bnb_packed, _ = bnbF.quantize_4bit(torch.tensor([1.0, -1.0, 0.5, -0.25]), blocksize=64, quant_type="fp4")
    assert torch.equal(packed, bnb_packed)


def test_nf4_plus_one_minus_one_packs_to_0xf0():
    packed, _ = reference.quantize_4bit(torch.tensor([1.0, -1.0]), 64, "nf4")
    assert packed.flatten().tolist() == [0xF0]
    assert packed.shape == (1, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", formats.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_quantize_4bit_matches_bitsandbytes(quant_type, blocksize, dtype, gen):
    for shape in SHAPES:
        assert_matches_bitsandbytes(random_tensor(shape, dtype, gen), blocksize, quant_type)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("blocksize", formats.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_all_zero_blocks(quant_type, blocksize, dtype, gen):
    # Block 1 is all zeros, and so is the partial last block.
    A = random_tensor((3 * blocksize + blocksize // 2 + 1,), dtype, gen)
    A[blocksize : 2 * blocksize] = 0
    A[3 * blocksize :] = 0
    assert_matches_bitsandbytes(A, blocksize, quant_type)

    packed, absmax = reference.quantize_4bit(A, blocksize, quant_type)
    zero_byte = 0x77 if quant_type == "nf4" else 0x00  # the code of 0.0, in both nibbles
    assert (packed[blocksize // 2 : blocksize].flatten() == zero_byte).all()
    # A full block stores its maximum as is; the partial last block stores it clamped.
    assert absmax[1].item() == 0.0
    assert torch.equal(absmax[3], torch.tensor(1e-38, dtype=torch.float32))


@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_odd_count_pads_with_the_code_of_zero(quant_type, gen):
    A = random_tensor((5,), torch.float32, gen)
    packed, _ = reference.quantize_4bit(A, 64, quant_type)
    zero_nibble = 7 if quant_type == "nf4" else 0
    assert packed.shape == (3, 1) and packed[-1, 0].item() & 0xF == zero_nibble


def test_quant_storage_view_dequantizes_the_same(gen):
    A = random_tensor((16, 32), torch.bfloat16, gen)
    packed, absmax = reference.quantize_4bit(A, 64, "nf4")
    as_bf16 = packed.flatten().view(torch.bfloat16).unsqueeze(1)
    assert torch.equal(
        reference.dequantize_4bit(as_bf16, absmax, 64, "nf4", A.shape, A.dtype),
        reference.dequantize_4bit(packed, absmax, 64, "nf4", A.shape, A.dtype),
    )


# ---- double quantization ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", formats.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_nested_quantize_matches_bitsandbytes(quant_type, blocksize, dtype, gen):
    # (257 * 32 + 5,) gives 258 blocks of 32: two nested blocks, the second partial.
    for shape in ((1,), (3, 5, 33), (257 * 32 + 5,), (64, 130)):
        assert_nested_matches_bitsandbytes(random_tensor(shape, dtype, gen), blocksize, quant_type)


def test_quantize_blockwise_matches_bitsandbytes(gen):
    code = formats.dynamic_map()
    for n in (1, 255, 256, 257, 1000, 4096 + 17):
        A = random_tensor((n,), torch.float32, gen)
        if n > 512:
            A[256:512] = 0
        q, absmax = reference.quantize_blockwise(A, code, 256)
        bnb_q, bnb_state = bnbF.quantize_blockwise(A, code=code, blocksize=256)
        assert torch.equal(q, bnb_q)
        assert torch.equal(bits(absmax), bits(bnb_state.absmax))
        expected = oracles.dequantize_blockwise(bnb_q, bnb_state)
        assert torch.equal(bits(reference.dequantize_blockwise(q, absmax, code, 256)), bits(expected))


def test_quantize_blockwise_near_midpoints_matches_bitsandbytes_grid():
    """Right around each midpoint of the dynamic map bitsandbytes does not pick the
    nearest code: it snaps to a 65536-point grid first. The reference follows it."""
    code = formats.dynamic_map()
    midpoints = (code[:-1] + code[1:]) / 2
    offsets = torch.arange(-300, 301, dtype=torch.int32)
    near = (midpoints.view(torch.int32)[:, None] + offsets).flatten().view(torch.float32).clamp(-1, 1)
    # Blocks of one 1.0 and 255 probes, so that absmax is 1 and probes are not rescaled.
    n_blocks = -(-near.numel() // 255)
    probes = torch.ones(n_blocks * 255)
    probes[: near.numel()] = near
    A = torch.cat([torch.ones(n_blocks, 1), probes.view(n_blocks, 255)], dim=1).flatten()

    q, absmax = reference.quantize_blockwise(A, code, 256)
    bnb_q, bnb_state = bnbF.quantize_blockwise(A, code=code, blocksize=256)
    assert torch.equal(absmax, torch.ones(n_blocks))
    assert torch.equal(q, bnb_q)
    nearest_code = torch.bucketize(A, midpoints).to(torch.uint8)
    assert (nearest_code != q).any()


# ---- QuantState ---------------------------------------------------------------------


def fastlora_state(A: torch.Tensor, blocksize: int, quant_type: str, nested: bool) -> tuple[torch.Tensor, QuantState]:
    """Quantize with the reference and wrap the result in a fastlora QuantState."""
    code = formats.code_tensor(quant_type)
    if not nested:
        packed, absmax = reference.quantize_4bit(A, blocksize, quant_type)
        return packed, QuantState(absmax, A.shape, code, blocksize, quant_type, A.dtype)
    packed, qabsmax, nested_absmax, offset = reference.quantize_4bit_nested(A, blocksize, quant_type)
    state2 = QuantState(nested_absmax, code=formats.dynamic_map(), blocksize=256, dtype=torch.float32)
    return packed, QuantState(qabsmax, A.shape, code, blocksize, quant_type, A.dtype, offset, state2)


def dequantize(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    return reference.dequantize_4bit(
        packed, state.absmax_fp32(), state.blocksize, state.quant_type, state.shape, state.dtype
    )


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_packed_dict_round_trips_with_bitsandbytes(quant_type, nested, gen):
    A = random_tensor((48, 80), torch.bfloat16, gen)

    # bitsandbytes -> fastlora, with the "weight." prefix of a state_dict.
    packed, bnb_state = bnbF.quantize_4bit(A, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    bnb_dict = {f"weight.{k}": v for k, v in bnb_state.as_dict(packed=True).items()}
    state = QuantState.from_dict(bnb_dict, device="cpu")
    assert (state.nested, state.shape, state.dtype, state.blocksize) == (nested, A.shape, A.dtype, 64)
    assert torch.equal(dequantize(packed, state), bnb_dequantize(packed, bnb_state))

    # fastlora -> bitsandbytes: the same keys, in the same order, with the same bytes.
    ours = state.as_dict(packed=True)
    theirs = bnb_state.as_dict(packed=True)
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    back = bnbF.QuantState.from_dict(dict(ours), device="cpu")
    assert torch.equal(bnb_dequantize(packed, back), dequantize(packed, state))

    # A state built by fastlora alone reads back in bitsandbytes too.
    ref_packed, ref_state = fastlora_state(A, 64, quant_type, nested)
    via_bnb = bnbF.QuantState.from_dict(ref_state.as_dict(packed=True), device="cpu")
    assert torch.equal(bnb_dequantize(ref_packed, via_bnb), dequantize(ref_packed, ref_state))


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_unpacked_dict_round_trips(nested, gen):
    A = random_tensor((33, 64), torch.float16, gen)
    packed, bnb_state = bnbF.quantize_4bit(A, blocksize=32, quant_type="nf4", compress_statistics=nested)
    bnb_dict = bnb_state.as_dict()
    state = QuantState.from_dict(bnb_dict, device="cpu")
    assert torch.equal(dequantize(packed, state), bnb_dequantize(packed, bnb_state))
    ours = state.as_dict()
    assert list(ours) == list(bnb_dict)
    assert {k: v for k, v in ours.items() if not isinstance(v, torch.Tensor)} == {
        k: v for k, v in bnb_dict.items() if not isinstance(v, torch.Tensor)
    }


def test_json_entry(gen):
    _, plain = fastlora_state(random_tensor((32, 64), torch.bfloat16, gen), 64, "nf4", nested=False)
    entry = plain.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    assert entry.dtype == torch.uint8 and entry.dim() == 1
    expected = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [32, 64]}
    assert json.loads(bytes(entry.tolist())) == expected

    A = random_tensor((32, 64), torch.float32, gen)
    _, nested = fastlora_state(A, 128, "fp4", nested=True)
    text = bytes(nested.as_dict(packed=True)["quant_state.bitsandbytes__fp4"].tolist()).decode("utf-8")
    assert list(json.loads(text)) == [
        "quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"
    ]
    assert json.loads(text)["nested_offset"] == nested.offset.item()
    _, bnb_state = bnbF.quantize_4bit(A, blocksize=128, quant_type="fp4", compress_statistics=True)
    assert text == bytes(bnb_state.as_dict(packed=True)["quant_state.bitsandbytes__fp4"].tolist()).decode("utf-8")


def test_state_fields_and_to(gen):
    A = random_tensor((20, 30), torch.float32, gen)
    _, state = fastlora_state(A, 64, "nf4", nested=True)
    assert state.nested and not state.state2.nested
    assert state.offset.dtype == torch.float32 and state.offset.dim() == 0
    assert isinstance(state.shape, torch.Size)
    moved = state.to("cpu")
    assert moved is not state and moved.state2 is not state.state2
    assert torch.equal(moved.absmax_fp32(), state.absmax_fp32())
    assert (moved.shape, moved.dtype, moved.blocksize, moved.quant_type) == (A.shape, A.dtype, 64, "nf4")


def with_json(qs_dict: dict, key: str, **changes) -> dict:
    """A copy of a packed dict whose JSON entry has ``changes`` applied (None deletes)."""
    entries = json.loads(bytes(qs_dict[key].tolist()))
    for name, value in changes.items():
        if value is None:
            entries.pop(name)
        else:
            entries[name] = value
    return {**qs_dict, key: torch.tensor(list(json.dumps(entries).encode()), dtype=torch.uint8)}


def without(qs_dict: dict, key: str) -> dict:
    return {k: v for k, v in qs_dict.items() if k != key}


NF4_KEY = "quant_state.bitsandbytes__nf4"
BAD_DICTS = {
    "missing absmax": (lambda d: without(d, "absmax"), "absmax"),
    "missing quant_map": (lambda d: without(d, "quant_map"), "quant_map"),
    "missing nested_quant_map": (lambda d: without(d, "nested_quant_map"), "nested_quant_map"),
    "missing JSON entry": (lambda d: without(d, NF4_KEY), "quant_type"),
    "missing shape": (lambda d: with_json(d, NF4_KEY, shape=None), "shape"),
    "missing nested_offset": (lambda d: with_json(d, NF4_KEY, nested_offset=None), "nested_offset"),
    "unknown quant type in key": (
        lambda d: {**without(d, NF4_KEY), "quant_state.bitsandbytes__int4": d[NF4_KEY]},
        "quant_state.bitsandbytes__int4",
    ),
    "unknown quant type in JSON": (lambda d: with_json(d, NF4_KEY, quant_type="int4"), NF4_KEY),
    "truncated JSON": (lambda d: {**d, NF4_KEY: d[NF4_KEY][:-3]}, NF4_KEY),
    "JSON not UTF-8": (lambda d: {**d, NF4_KEY: torch.full((8,), 0xFF, dtype=torch.uint8)}, NF4_KEY),
    "JSON entry not uint8": (lambda d: {**d, NF4_KEY: d[NF4_KEY].to(torch.int32)}, NF4_KEY),
    "absmax too short": (lambda d: {**d, "absmax": d["absmax"][:-1]}, "absmax"),
    "shape disagrees with absmax": (lambda d: with_json(d, NF4_KEY, shape=[40, 40]), "absmax"),
    "blocksize disagrees with absmax": (lambda d: with_json(d, NF4_KEY, blocksize=128), "absmax"),
    "nested_absmax too long": (lambda d: {**d, "nested_absmax": torch.zeros(2)}, "nested_absmax"),
    "absmax float when nested": (lambda d: {**d, "absmax": d["absmax"].float()}, "absmax"),
    "quant_map float64": (lambda d: {**d, "quant_map": d["quant_map"].double()}, "quant_map"),
    "quant_map not nf4": (lambda d: {**d, "quant_map": formats.code_tensor("fp4")}, "quant_map"),
    "nested_quant_map float16": (lambda d: {**d, "nested_quant_map": d["nested_quant_map"].half()}, "nested_quant_map"),
    "dtype int8": (lambda d: with_json(d, NF4_KEY, dtype="int8"), "dtype"),
    "nested_dtype float16": (lambda d: with_json(d, NF4_KEY, nested_dtype="float16"), "nested_dtype"),
    "blocksize 48": (lambda d: with_json(d, NF4_KEY, blocksize=48), "blocksize"),
    "unknown key": (lambda d: {**d, "weight.lora_A": torch.zeros(1)}, "weight.lora_A"),
}


@pytest.mark.parametrize("case", list(BAD_DICTS))
def test_from_dict_rejects(case, gen):
    _, state = fastlora_state(random_tensor((30, 64), torch.float32, gen), 64, "nf4", nested=True)
    corrupt, key = BAD_DICTS[case]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        QuantState.from_dict(corrupt(state.as_dict(packed=True)), device="cpu")


def test_from_dict_rejects_plain_state_with_nested_absmax_dtype(gen):
    _, state = fastlora_state(random_tensor((30, 64), torch.float32, gen), 64, "nf4", nested=False)
    qs_dict = state.as_dict(packed=True)
    with pytest.raises(ValueError, match="absmax"):
        QuantState.from_dict({**qs_dict, "absmax": qs_dict["absmax"].to(torch.uint8)}, device="cpu")


# ---- matmul and LoRA references -----------------------------------------------------


def test_matmul_4bit_is_linear_with_the_dequantized_weight(gen):
    W = random_tensor((24, 40), torch.bfloat16, gen)
    x = random_tensor((3, 5, 40), torch.bfloat16, gen)
    bias = random_tensor((24,), torch.bfloat16, gen)
    packed, absmax = reference.quantize_4bit(W, 64, "nf4")
    y = reference.matmul_4bit(x, packed, absmax, 64, "nf4", W.shape, bias)
    assert y.dtype == x.dtype and y.shape == (3, 5, 24)
    dense = reference.dequantize_4bit(packed, absmax, 64, "nf4", W.shape, torch.float32)
    expected = x.float() @ dense.T + bias.float()
    torch.testing.assert_close(y, expected.to(x.dtype))


def test_lora_linear_matches_peft(gen):
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(40, 24))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = peft_model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight, generator=gen)
    x = random_tensor((6, 40), torch.float32, gen)
    y = reference.lora_linear(
        x,
        layer.base_layer.weight,
        layer.base_layer.bias,
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.scaling["default"],
    )
    torch.testing.assert_close(y, peft_model(x), rtol=0, atol=0)


# ---- property test ------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 33), min_size=1, max_size=3).map(tuple),
    blocksize=st.sampled_from(formats.BLOCKSIZES),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(formats.QUANT_TYPES),
    nested=st.booleans(),
    zero_block=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_matches_bitsandbytes(shape, blocksize, dtype, quant_type, nested, zero_block, seed):
    A = random_tensor(shape, dtype, torch.Generator().manual_seed(seed))
    if zero_block and prod(shape) > blocksize:
        A.view(-1)[:blocksize] = 0
    if nested:
        assert_nested_matches_bitsandbytes(A, blocksize, quant_type)
    else:
        assert_matches_bitsandbytes(A, blocksize, quant_type)
