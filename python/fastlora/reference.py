"""Plain-PyTorch reference implementations of the bitsandbytes 4-bit format.

These functions are the oracle for fastlora's Rust and Triton kernels. They are
written for clarity, not speed, and reproduce bitsandbytes 0.50.2's CPU output
byte for byte (packed nibbles, scales, double-quantized scales), which the tests
check against bitsandbytes itself.

Conventions shared by every function here:

* A tensor is flattened in row-major order and cut into contiguous blocks of
  ``blocksize`` elements; the last block may be partial.
* ``absmax`` arguments are the per-block float32 scales. For a double-quantized
  state, decode them first with :func:`dequantize_nested_absmax`.
* Element ``2i`` of the flat tensor goes in the HIGH nibble of byte ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F

from .formats import NESTED_BLOCKSIZE, code_tensor, dynamic_map

# bitsandbytes' CPU 8-bit quantizer snaps the normalized value onto a grid of
# this many points spanning [-1, 1] before looking up the code (see
# `quantize_blockwise`).
_GRID_POINTS = 65536


def _nibble_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between neighbouring codes in sorted order, and the sort order.

    The FP4 table is not sorted by value; a stable sort keeps code 0 (+0.0)
    before code 8 (also +0.0), so 0.0 encodes as nibble 0, as in bitsandbytes.
    """
    code = code_tensor(quant_type)
    order = torch.argsort(code, stable=True)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return bounds, order


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``A`` to packed 4-bit codes, as bitsandbytes' ``quantize_4bit`` on CPU.

    Returns ``(packed, absmax)``: ``packed`` is uint8 of shape ``((n + 1) // 2, 1)``
    and ``absmax`` float32 of shape ``(ceil(n / blocksize),)``.

    The two branches below differ on purpose, because bitsandbytes' do:

    * full blocks store ``max|x|`` unclamped (0.0 for an all-zero block) and scale
      by multiplying with the reciprocal of the clamped maximum;
    * the partial last block stores the clamped maximum (at least 1e-38) and
      scales by true division.

    The nearest code wins, and a value exactly on a midpoint goes to the lower
    code (``bucketize`` with ``right=False``). An odd count is padded with 0.0.
    """
    flat = A.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    full_blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = full_blocks.abs().amax(dim=1)
    scaled = torch.clamp(full_blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if rem:
        tail = flat[full:]
        tail_absmax = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, torch.clamp(tail / tail_absmax, -1, 1)])
    if n % 2:
        scaled = F.pad(scaled, (0, 1))

    bounds, order = _nibble_bounds(quant_type)
    nibbles = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    packed = (nibbles[0::2] << 4) | nibbles[1::2]
    return packed.unsqueeze(1), absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decode packed 4-bit codes: ``code[nibble] * absmax[block]`` in float32, then cast.

    ``packed`` may be stored as another dtype (bitsandbytes' ``quant_storage``);
    only its bytes are read.
    """
    packed_bytes = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([packed_bytes >> 4, packed_bytes & 0xF], dim=1).reshape(-1)
    n = prod(shape)
    values = code_tensor(quant_type, packed.device)[nibbles[:n].long()]
    block_of_element = torch.arange(n, device=packed.device) // blocksize
    return (values * absmax[block_of_element]).to(dtype).reshape(shape)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a 1-D float32 tensor, as bitsandbytes' CPU C kernel.

    Returns ``(q, absmax)``: uint8 indices into the sorted 256-entry ``code`` and
    float32 per-block ``max|x|``.

    bitsandbytes 0.50.2 does not search for the nearest code. It scales by the
    reciprocal, ``x * (1 / absmax)``, rounds the result to the nearest point of
    a 65536-point grid over [-1, 1], and looks the grid point up in a table
    whose entry i is the number of code midpoints strictly below grid value i.
    Near a midpoint (within half a grid step, about 1.5e-5) this may pick the
    farther of the two codes; matching it byte for byte needs the same grid.
    An all-zero block stores absmax 0.0 and index 0.
    """
    flat = A.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)

    normed = torch.clamp(blocks * (1.0 / absmax).view(-1, 1), -1, 1)
    # 0 * inf in an all-zero block is NaN; any grid point will do, the block is zeroed below.
    grid_index = ((normed + 1.0) * 0.5 * (_GRID_POINTS - 1) + 0.5).nan_to_num(0.0).to(torch.int64)

    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_GRID_POINTS, dtype=torch.float32, device=code.device)) / (_GRID_POINTS - 1)
    code_of_grid_point = torch.searchsorted(midpoints, grid)  # midpoints strictly below
    q = code_of_grid_point[grid_index].to(torch.uint8)
    q[absmax == 0] = 0
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """Decode 8-bit blockwise codes: ``code[q[i]] * absmax[i // blocksize]`` in float32."""
    block_of_element = torch.arange(q.numel(), device=q.device) // blocksize
    return code[q.reshape(-1).long()] * absmax[block_of_element]


def quantize_nested_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double-quantize per-block float32 scales, as bitsandbytes' ``compress_statistics``.

    Returns ``(qabsmax, nested_absmax, offset)``: uint8 codes ``(n_blocks,)``, float32
    scales of the scales ``(ceil(n_blocks / 256),)``, and the 0-d float32 mean
    that was subtracted first.
    """
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_blockwise(absmax - offset, dynamic_map(absmax.device), NESTED_BLOCKSIZE)
    return qabsmax, nested_absmax, offset


def dequantize_nested_absmax(
    qabsmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    offset: torch.Tensor,
    nested_code: torch.Tensor,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """Decode double-quantized scales to per-block float32: ``code2[q] * absmax2[i // 256] + offset``."""
    return dequantize_blockwise(qabsmax, nested_absmax, nested_code, nested_blocksize) + offset


def quantize_4bit_nested(
    A: torch.Tensor, blocksize: int, quant_type: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_4bit` followed by :func:`quantize_nested_absmax` on its scales.

    Returns ``(packed, qabsmax, nested_absmax, offset)``.
    """
    packed, absmax = quantize_4bit(A, blocksize, quant_type)
    return (packed, *quantize_nested_absmax(absmax))


def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for the 4-bit weight ``W``, computed in float32 and cast to ``x.dtype``.

    ``shape`` is the weight's ``(out_features, in_features)``, as for ``nn.Linear``.
    """
    weight = dequantize_4bit(packed, absmax, blocksize, quant_type, shape, torch.float32)
    out = F.linear(x.float(), weight, None if bias is None else bias.float())
    return out.to(x.dtype)


def lora_linear(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """A LoRA linear layer: ``x @ W.T + bias + scaling * (x @ A.T) @ B.T``.

    ``W`` is ``(out, in)``, ``A`` is ``(r, in)`` and ``B`` is ``(out, r)``. The
    scaling is applied last, after ``B``, in the order peft uses.
    """
    return F.linear(x, W, bias) + F.linear(F.linear(x, A), B) * scaling


def lora_batched(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
                 scaling: torch.Tensor) -> torch.Tensor:
    """`y[t] = scaling[i] * (x[t] @ A[i].T) @ B[i].T` with `i = indices[t]`, 0 where `i` is
    -1: each row's adapter gathered, two einsums in fp32."""
    chosen = indices.clamp(min=0)
    h = torch.einsum("tk,trk->tr", x.float(), A[chosen].float())
    y = torch.einsum("tr,tor->to", h, B[chosen].float()) * scaling.float()[chosen][:, None]
    return torch.where((indices >= 0)[:, None], y, torch.zeros_like(y)).to(x.dtype)
