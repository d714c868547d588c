"""Code tables and constants of the bitsandbytes 4-bit format.

Everything here is a fixed property of the on-disk format that fastlora shares
with bitsandbytes 0.50: the NF4 and FP4 code tables, the supported block sizes,
and the 8-bit "dynamic" map used to double-quantize the per-block scales.
"""

from __future__ import annotations

import torch

# NF4 (QLoRA's NormalFloat4): 16 quantiles of N(0, 1), normalized to [-1, 1].
# Each literal is the exact float32 value bitsandbytes uses, printed as a double.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 as bitsandbytes defines it (not OCP E2M1): bit 3 is the sign, the magnitude
# bits 000..111 decode to 0, 0.0625, 8, 12, 4, 6, 2, 3, divided by 12 in float32.
# Code 8 ("negative zero") is +0.0, as in bitsandbytes' torch table; small positive
# values (up to half of code 1) quantize to it. bitsandbytes' C dequantizer decodes
# it as -0.0 instead: equal as a value, different as bits.
FP4_CODE: tuple[float, ...] = (
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
)

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Block size of the 8-bit quantization of the scales (double quantization).
NESTED_BLOCKSIZE = 256

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_code_cache: dict[tuple[str, torch.device], torch.Tensor] = {}
_dynamic_map_cache: dict[torch.device, torch.Tensor] = {}


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def code_tensor(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry float32 code table of ``quant_type``, indexed by nibble value."""
    if quant_type not in _CODES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    key = (quant_type, _as_device(device))
    if key not in _code_cache:
        _code_cache[key] = torch.tensor(_CODES[quant_type], dtype=torch.float32, device=key[1])
    # A clone, so that a caller writing into the result cannot corrupt the cache.
    return _code_cache[key].clone()


def _create_signed_dynamic_map() -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``.

    For each exponent e = 0..6, 2**e linearly spaced fractions in [0.1, 1]
    (midpoints of ``linspace(0.1, 1, 2**e + 1)``) are scaled by 10**(e - 6),
    with both signs; 0 and 1 complete the 256 values, which are then sorted.
    The float32 ``linspace`` and the float32 products are what bitsandbytes
    computes, so the values agree bit for bit.
    """
    values: list[float] = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry signed dynamic map of double quantization (sorted, -0.99297 .. 1.0).

    bitsandbytes 0.50.2 stores this map unchanged in ``state2.code``: its
    current CPU quantizer no longer overwrites ``code[0]`` with -1.0 (older
    releases did), so entry 0 stays at -0.992968738079071.
    """
    key = _as_device(device)
    if key not in _dynamic_map_cache:
        _dynamic_map_cache[key] = _create_signed_dynamic_map().to(key)
    return _dynamic_map_cache[key].clone()
