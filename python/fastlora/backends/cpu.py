"""The CPU backend: fastlora's ops on the Rust kernels of `fastlora._native`.

Tensors reach Rust as 1-D numpy views sharing their memory (bf16/fp16 as uint16, which
numpy can represent), or, on a call plan's hot path (`PreparedWeight`), as the addresses of
tensors checked here. The callers (`fastlora.ops`, `fastlora.plan`) have validated shapes and
dtypes; the Rust side checks lengths again. Double-quantized scales are decoded to fp32 once
per op call, or once per plan.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref

import numpy as np
import torch

from .. import _native, _threads
from ..scales import BlockScales
from . import add_low_rank

NAME = "cpu"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


class _Exported:
    """Hands `np.from_dlpack` torch's versioned DLPack capsule directly: `Tensor.__dlpack__`
    spends ~6 us in Python checks per tensor (8 tensors per matmul), this ~1 us."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __dlpack__(self, **_):
        return _to_dlpack_versioned(self.tensor)

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


def _numpy_takes_versioned_capsules() -> bool:
    major, minor = (int(part) for part in np.__version__.split(".")[:2])
    return (major, minor) >= (2, 1)


# Private, so looked up: without it (older torch) or a numpy before 2.1 (which reads only
# unversioned capsules) the public `__dlpack__` path is used.
_to_dlpack_versioned = getattr(torch._C, "_to_dlpack_versioned", None) if _numpy_takes_versioned_capsules() else None


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor (no copy). Through DLPack, since
    `Tensor.numpy()` marks the storage non-resizable, which breaks FSDP2's resharding."""
    if not t.is_contiguous():
        raise ValueError("the CPU kernels take contiguous tensors")  # a flat view would be a copy
    half = t.dtype in (torch.bfloat16, torch.float16)
    if half:
        t = t.view(torch.int16)
    if _to_dlpack_versioned is not None and t.device.type == "cpu":
        flat = np.from_dlpack(_Exported(t.detach())).reshape(-1)
    else:
        flat = np.from_dlpack(t.detach().reshape(-1))
    return flat.view(np.uint16) if half else flat


# Outputs at least this large get their own huge-page mapping (see `empty_output`). 32 MiB is
# glibc's largest mmap threshold: smaller blocks come back from the heap already faulted in,
# and a fresh mapping for them measured slower (benches/CPU_NOTES.md).
_HUGE_PAGE_MIN_BYTES = 32 << 20
# Freed mappings kept for the next output of the same size, at most this many bytes in all.
_SPARE_MAX_BYTES = 256 << 20


class _SpareMappings:
    """Large output mappings whose tensors are gone, kept for the next output of the same
    size, as torch's CUDA caching allocator keeps freed blocks. glibc unmaps blocks this large
    at once, and the kernel zero-fills every page of a fresh mapping on first touch, which
    costs more than dequantizing into it (benches/CPU_NOTES.md). A kept mapping is advised
    `MADV_FREE`: the kernel takes its pages back under memory pressure (a later touch then
    gets zeroed pages again), and otherwise reusing it costs no page fault."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._kept: list[mmap.mmap] = []  # oldest first
        # Re-entrant: a garbage collection inside `take` may free an output and call `keep`.
        self._lock = threading.RLock()

    def take(self, nbytes: int) -> mmap.mmap | None:
        with self._lock:
            for i in range(len(self._kept) - 1, -1, -1):
                if len(self._kept[i]) == nbytes:
                    return self._kept.pop(i)
        return None

    def keep(self, mapping: mmap.mmap) -> None:
        if len(mapping) > self.max_bytes:
            mapping.close()
            return
        advise = getattr(mmap, "MADV_FREE", None)
        if advise is not None:
            try:
                mapping.madvise(advise)
            except OSError:
                pass  # a kernel without MADV_FREE: the pages just stay resident
        with self._lock:
            self._kept.append(mapping)
            while self.bytes_kept() > self.max_bytes:
                self._kept.pop(0).close()

    def bytes_kept(self) -> int:
        return sum(map(len, self._kept))

    def clear(self) -> None:
        with self._lock:
            kept, self._kept = self._kept, []
        for mapping in kept:
            mapping.close()


_spares = _SpareMappings(_SPARE_MAX_BYTES)


def empty_cache() -> None:
    """Returns the memory of freed large CPU outputs kept for reuse to the system."""
    _spares.clear()


def empty_output(shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor. Large ones are backed by an anonymous mapping advised to
    use transparent huge pages (a fresh 64 MiB output then costs 32 page faults instead of
    16384), reused once their tensor is freed (`_SpareMappings`)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < _HUGE_PAGE_MIN_BYTES or advise is None:
        return torch.empty(shape, dtype=dtype)
    mapping = _spares.take(nbytes)
    if mapping is None:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mapping.madvise(advise)
        except OSError:
            pass  # THP unavailable: still a valid (4 KiB-paged) buffer
    # The array holds the mapping; the tensor (and every view of it) holds the array. When
    # the last of them is freed, the mapping goes back to the spares instead of being unmapped.
    array = np.frombuffer(mapping, dtype=np.uint8)
    weakref.finalize(array, _spares.keep, mapping).atexit = False
    return torch.from_numpy(array).view(dtype).view(shape)


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = A.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32)
    _threads.sync()
    _native.quantize_4bit(
        as_numpy(A.contiguous()), dtype_name(A.dtype), blocksize, quant_type, as_numpy(packed), as_numpy(absmax)
    )
    return packed, absmax


def dequantize_4bit_into(
    packed: torch.Tensor, absmax: torch.Tensor, numel: int, blocksize: int, quant_type: str, start: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Writes elements `start .. start + out.numel()` of the weight into `out`."""
    _threads.sync()
    _native.dequantize_4bit(
        as_numpy(packed), as_numpy(absmax), numel, blocksize, quant_type, start, as_numpy(out), dtype_name(out.dtype)
    )
    return out


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = A.contiguous().float()
    quantized = torch.empty(values.shape, dtype=torch.uint8)
    absmax = torch.empty((-(-values.numel() // blocksize),), dtype=torch.float32)
    _threads.sync()
    _native.quantize_blockwise_8bit(
        as_numpy(values), as_numpy(code.contiguous()), blocksize, as_numpy(quantized), as_numpy(absmax)
    )
    return quantized, absmax


def dequantize_blockwise(
    quantized: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor | float
) -> torch.Tensor:
    out = torch.empty(quantized.shape, dtype=torch.float32)
    _native.dequantize_blockwise_8bit(
        as_numpy(quantized.contiguous()), as_numpy(code.contiguous()), as_numpy(absmax.contiguous()),
        blocksize, float(offset), as_numpy(out),
    )
    return out


def lora_batched(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
                 scaling: torch.Tensor) -> torch.Tensor:
    rows, (_, r, k), o = x.shape[0], A.shape, B.shape[1]
    y = torch.empty((rows, o), dtype=x.dtype)
    _threads.sync()
    _native.lora_batched(as_numpy(x.contiguous()), as_numpy(A.contiguous()), as_numpy(B.contiguous()),
                         as_numpy(indices.contiguous()), as_numpy(scaling.contiguous()), k, r, o, as_numpy(y),
                         dtype_name(x.dtype))
    return y


# Up to this many activation rows the fused Rust kernel (weight decoded in registers) runs;
# above, Rust dequantizes weight tiles and torch's BLAS multiplies them (`_matmul_tiled`), or the
# many-row bf16 products run on Rust's bf16 GEMM (`BF16_GEMM`).
FUSED_MAX_ROWS = _native.FUSED_MAX_ROWS
# Bytes of weight dequantized at a time on the tiled path (in the GEMM's dtype), forward and
# transposed alike: transient memory stays at one tile, and the GEMMs stay wide enough for
# oneDNN's and MKL's fast kernels (512-row bf16 tiles ran at half speed on AMX; benches/CPU_NOTES.md).
TILE_BYTES = 16 << 20


def fp32_scales(scales: BlockScales) -> torch.Tensor:
    """The fp32 block scales: `absmax` itself, or its double-quantized codes decoded."""
    nested = scales.nested
    if nested is None:
        return scales.absmax
    return dequantize_blockwise(scales.absmax, nested.absmax, nested.code, nested.blocksize, nested.offset)


def dequantize_4bit(packed: torch.Tensor, scales: BlockScales, blocksize: int, quant_type: str, shape: list[int],
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = empty_output(list(shape), dtype)
    return dequantize_4bit_into(packed, fp32_scales(scales), out.numel(), blocksize, quant_type, 0, out)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
                quant_type: str, transposed: bool) -> torch.Tensor:
    return product(x, packed, fp32_scales(scales), n, k, blocksize, quant_type, transposed)


def lora_linear_4bit(x: torch.Tensor, x_drop: torch.Tensor, packed: torch.Tensor, scales: BlockScales,
                     bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scaling: float, blocksize: int,
                     quant_type: str) -> torch.Tensor:
    """The 4-bit product and the LoRA term's up-projection (`matmul_4bit_low_rank`), the
    down-projection (in the adapter's dtype) and the bias in torch."""
    n, k = B.shape[0], A.shape[1]
    u = x_drop.reshape(-1, k).to(A.dtype) @ A.t()
    y = matmul_4bit_low_rank(x, packed, scales, n, k, blocksize, quant_type, False, u, B, scaling)
    # y is this call's own fresh tensor: the bias is added into it.
    return y if bias is None else y.add_(bias.to(y.dtype))


def matmul_4bit_low_rank(x: torch.Tensor, packed: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
                         quant_type: str, transposed: bool, u: torch.Tensor, factor: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """`matmul_4bit` plus `scale * u @ factor.T` (`scale * u @ factor` when `transposed`; the
    factor in the weight's orientation, LoRA's B or A): in the fp32 sums of Rust's bf16 GEMM
    where the product runs there (`_low_rank_on_gemm`), else added in torch in u's dtype."""
    inner, outer = (n, k) if transposed else (k, n)
    x2d = x.reshape(-1, inner)
    if _low_rank_on_gemm(x2d, u, factor, inner):
        y = _gemm_bf16(x2d.contiguous(), packed, fp32_scales(scales), n, k, blocksize, quant_type, transposed,
                       (u.contiguous(), factor.contiguous(), scale))
        return y.reshape(*x.shape[:-1], outer)
    return add_low_rank(product(x, packed, fp32_scales(scales), n, k, blocksize, quant_type, transposed), u, factor,
                        scale, transposed)


def product(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    n: int,
    k: int,
    blocksize: int,
    quant_type: str,
    transposed: bool,
) -> torch.Tensor:
    """`x @ W.T` (or `x @ W` when `transposed`) for x of shape (..., k) (or (..., n)), fp32
    block scales `absmax`."""
    inner, outer = (n, k) if transposed else (k, n)
    x2d = x.reshape(-1, inner).contiguous()
    m = x2d.shape[0]
    if m > FUSED_MAX_ROWS:
        y = _matmul_tiled(x2d, packed, absmax, n, k, blocksize, quant_type, transposed).to(x.dtype)
        return y.reshape(*x.shape[:-1], outer)
    y = torch.empty((m, outer), dtype=x.dtype)
    if m:
        _threads.sync()
        _native.matmul_4bit(
            as_numpy(x2d), as_numpy(packed), as_numpy(absmax), n, k, blocksize, quant_type, transposed,
            as_numpy(y), dtype_name(x.dtype),
        )
    return y.reshape(*x.shape[:-1], outer)


# Whether bf16 activations multiply in bf16 (`_matmul_tiled`): where the CPU has native bf16
# (AMX or AVX512-BF16), torch's bf16 GEMM (oneDNN) runs several times faster than its fp32
# one; elsewhere it widens internally and runs slower than fp32.
NATIVE_BF16 = _native.native_bf16()
# Whether the many-row bf16 products (`x @ W.T` and `x @ W`) run on Rust's bf16 GEMM
# (`_gemm_bf16`, AVX512-BF16): on native-bf16 CPUs without AMX. With AMX, torch's bf16 GEMM (oneDNN) runs on
# its tiles, several times the `vdpbf16ps` throughput Rust's kernel is bound by, and keeps the
# product (the Rust GEMM was measured on AMD Zen 4 and 5 only, benches/CPU_NOTES.md).
BF16_GEMM = NATIVE_BF16 and not _native.amx_bf16()


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the tiled product dequantizes to and multiplies in, for activations of `dtype`."""
    return torch.bfloat16 if dtype == torch.bfloat16 and NATIVE_BF16 else torch.float32


# Which library multiplies the fp32 tiles (`FASTLORA_FP32_GEMM`: auto, blas or onednn).
# torch's BLAS (MKL in the PyPI wheels) runs its AVX2 kernels on CPUs not made by Intel, even
# where they have AVX-512, while oneDNN picks its kernels by instruction set: on an AMD Zen 5
# its fp32 linear ran 2.2-2.4x faster than MKL's (benches/CPU_NOTES.md). `auto` takes oneDNN
# there (AVX-512, not Intel, torch's BLAS being MKL) and torch's BLAS elsewhere, where nothing
# measured said otherwise.
FP32_GEMM_SETTINGS = ("auto", "blas", "onednn")


def _onednn_linear():
    """torch's oneDNN linear op (`x @ w.T` for a weight of any strides), where torch has it."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_ONEDNN_LINEAR = _onednn_linear()


def choose_fp32_gemm(setting: str | None) -> str:
    """`FASTLORA_FP32_GEMM`'s value (None: unset) made "blas" or "onednn" for this CPU and torch."""
    setting = (setting or "auto").strip().lower() or "auto"
    if setting not in FP32_GEMM_SETTINGS:
        raise ValueError(f"FASTLORA_FP32_GEMM must be one of {', '.join(FP32_GEMM_SETTINGS)}, got {setting!r}")
    if setting == "onednn" and _ONEDNN_LINEAR is None:
        raise ValueError("FASTLORA_FP32_GEMM=onednn: this torch is built without oneDNN's linear op")
    if setting != "auto":
        return setting
    mkl_off_intel = torch.backends.mkl.is_available() and _native.cpu_vendor() != "GenuineIntel"
    takes_onednn = _ONEDNN_LINEAR is not None and mkl_off_intel and "avx512" in _native.simd_levels()
    return "onednn" if takes_onednn else "blas"


FP32_GEMM = choose_fp32_gemm(os.environ.get("FASTLORA_FP32_GEMM"))


def _matmul_tiled(
    x2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, blocksize: int, quant_type: str,
    transposed: bool,
) -> torch.Tensor:
    """The many-row product: Rust dequantizes a tile of weight rows (`code * absmax`, exact
    in fp32, rounded once in bf16) and torch multiplies it, in `gemm_dtype` (fp32 by
    `FP32_GEMM`'s library, bf16 by torch's bf16 GEMM). All the arithmetic then runs on
    torch's threads, as the rest of a training step does, instead of a second thread pool
    competing with them for the cores; the dequantization is paid once per tile for all rows."""
    dtype = gemm_dtype(x2d.dtype)
    if n == 0 or k == 0:  # an empty weight: an empty product, or sums of nothing
        return torch.zeros((x2d.shape[0], k if transposed else n), dtype=dtype)
    xc = x2d.to(dtype)
    if _bf16_gemm_runs(dtype, n if transposed else k):
        return _gemm_bf16(xc, packed, absmax, n, k, blocksize, quant_type, transposed)
    tiles = _weight_tiles(packed, absmax, n, k, blocksize, quant_type, dtype)
    multiply = _onednn_tiles if dtype == torch.float32 and FP32_GEMM == "onednn" else _blas_tiles
    return multiply(xc, tiles, n, k, transposed)


def _gemm_bf16(xc: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, blocksize: int,
               quant_type: str, transposed: bool, low_rank: tuple | None = None) -> torch.Tensor:
    """`xc @ W.T` (`xc @ W`) in bf16 by Rust's GEMM that dequantizes the weight into its own
    packing (AVX512-BF16): a tile handed to torch's GEMM is written to memory and read back,
    which cost the product 1.10x the dense one's time (benches/CPU_NOTES.md). `low_rank` =
    (u, factor, scale), bf16: `scale * u @ factor.T` (`scale * u @ factor`) added before the
    output's rounding."""
    y = torch.empty((xc.shape[0], k if transposed else n), dtype=torch.bfloat16)
    term = None
    if low_rank is not None:
        u, factor, scale = low_rank
        term = (as_numpy(u), as_numpy(factor), u.shape[1], scale)
    _threads.sync()
    _native.matmul_4bit_bf16(as_numpy(xc), as_numpy(packed), as_numpy(absmax), n, k, blocksize, quant_type,
                             transposed, as_numpy(y), term)
    return y


def _bf16_gemm_runs(dtype: torch.dtype, inner: int) -> bool:
    """Whether a many-row product in `dtype` (`gemm_dtype`'s) summing over `inner` elements
    runs on Rust's bf16 GEMM."""
    return dtype == torch.bfloat16 and BF16_GEMM and inner % 2 == 0


def _low_rank_on_gemm(x2d: torch.Tensor, u: torch.Tensor, factor: torch.Tensor, inner: int) -> bool:
    """Whether a low-rank term (`matmul_4bit_low_rank`) rides in Rust's bf16 GEMM: a
    nonempty many-row bf16 product there, bf16 `u` and factor (LoRA's, as autocast casts the
    adapter) of even rank. It then adds into the GEMM's fp32 sums instead of a rank-r
    `addmm_` that reads and writes the whole bf16 output again (benches/CPU_NOTES.md)."""
    rank = u.shape[-1]
    return (x2d.shape[0] > FUSED_MAX_ROWS and x2d.numel() > 0 and factor.numel() > 0 and rank % 2 == 0
            and _bf16_gemm_runs(x2d.dtype, inner) and u.dtype == factor.dtype == torch.bfloat16)


def _weight_tiles(packed: torch.Tensor, absmax: torch.Tensor, n: int, k: int, blocksize: int, quant_type: str,
                  dtype: torch.dtype):
    """Yields (first row, tile) over the weight's rows, dequantized to `dtype` into one reused
    buffer: a tile is valid until the next is asked for."""
    rows_per_tile = max(1, min(n, TILE_BYTES // (dtype.itemsize * k)))
    tile = torch.empty((rows_per_tile, k), dtype=dtype)
    for r0 in range(0, n, rows_per_tile):
        rows = min(rows_per_tile, n - r0)
        yield r0, dequantize_4bit_into(packed, absmax, n * k, blocksize, quant_type, r0 * k, tile[:rows])


def _blas_tiles(xc: torch.Tensor, tiles, n: int, k: int, transposed: bool) -> torch.Tensor:
    """`xc @ W.T` (`xc @ W`) over the tiles with torch's matmul, written in place."""
    y = torch.empty((xc.shape[0], k if transposed else n), dtype=xc.dtype)
    for r0, w in tiles:
        rows = w.shape[0]
        if not transposed:  # y[:, rows] = x @ W[rows, :].T (BLAS takes the row stride)
            torch.mm(xc, w.t(), out=y[:, r0:r0 + rows])
        elif r0 == 0:  # dx = the sum over row tiles of dy[:, rows] @ W[rows, :]
            torch.mm(xc[:, :rows], w, out=y)
        else:
            y.addmm_(xc[:, r0:r0 + rows], w)
    return y


def _onednn_tiles(xc: torch.Tensor, tiles, n: int, k: int, transposed: bool) -> torch.Tensor:
    """`xc @ W.T` (`xc @ W`) over the tiles with oneDNN's linear, which takes no output: a
    forward of several tiles copies each one's columns in, and the transposed product adds
    each tile's part to the sum so far in the same call (a fresh tensor each time)."""
    linear, y = _ONEDNN_LINEAR, None
    for r0, w in tiles:
        rows = w.shape[0]
        if transposed:  # W[rows, :] is the linear's weight transposed: oneDNN reads it through its strides
            x = xc[:, r0:r0 + rows]
            y = linear(x, w.t(), None, "none", [], "") if y is None else linear.binary(x, y, w.t(), None, "add")
        elif rows == n:  # one tile: the linear's own output
            y = linear(xc, w, None, "none", [], "")
        else:
            if y is None:
                y = torch.empty((xc.shape[0], n), dtype=xc.dtype)
            y[:, r0:r0 + rows] = linear(xc, w, None, "none", [], "")
    return y


class PreparedWeight:
    """A frozen 4-bit weight made ready for many CPU calls (the CPU half of a call plan,
    `fastlora.plan`): fp32 block scales decoded once, and a native handle holding the packed
    bytes and scales, so a call of up to `FUSED_MAX_ROWS` rows hands Rust only the addresses
    of its activation and output, after checking them here."""

    __slots__ = ("packed", "absmax", "native", "n", "k", "blocksize", "quant_type", "_serial_rows", "_bias",
                 "_adapter")

    def __init__(self, packed: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
                 quant_type: str) -> None:
        self.packed, self.absmax = packed, fp32_scales(scales).contiguous()
        self.n, self.k, self.blocksize, self.quant_type = n, k, blocksize, quant_type
        self.native = _native.PackedWeight(as_numpy(packed), as_numpy(self.absmax), n, k, blocksize, quant_type)
        self._serial_rows = self.native.serial_rows  # calls this small never read the thread setting
        self._bias: tuple = (None, 0, 0, None)  # (tensor, address, version, dtype) of the last bias checked
        self._adapter: tuple = (None, None, None)  # (A, B, their addresses, versions and dtype) last checked

    def decode(self, x: torch.Tensor, bias: torch.Tensor | None,
               lora: tuple | None = None) -> torch.Tensor | None:
        """`x @ W.T (+ bias) (+ scaling * (x @ A.T) @ B.T)` in one native call when x is a
        contiguous `(..., k)` float tensor of at most `FUSED_MAX_ROWS` rows, the bias (if any) a
        contiguous CPU `(n,)` tensor and `lora` = (A, B, scaling) contiguous CPU `(r, k)` and
        `(n, r)` tensors, of x's dtype (a layer's decoding call: only the output to allocate);
        else None. x is a CPU tensor (`fastlora.ops._eager.direct_on_cpu`); a bias and an
        adapter are checked once per tensor, address and version, since a layer passes the
        same ones every call."""
        shape, dtype = x.shape, x.dtype
        name = _DTYPE_NAMES.get(dtype)
        if name is None or not shape or shape[-1] != self.k or not x.is_contiguous():
            return None
        rows = x.numel() // self.k
        if rows > FUSED_MAX_ROWS:
            return None
        bias_ptr = None
        if bias is not None:
            # In-place changes of shape or strides (`resize_`, `as_strided_`) bump the version.
            bias_ptr = bias.data_ptr()
            try:
                version = bias._version
            except RuntimeError:  # an inference tensor has no version counter: checked every call
                version = None
            checked, checked_ptr, checked_version, bias_dtype = self._bias
            if version is None or bias is not checked or bias_ptr != checked_ptr or version != checked_version:
                if not bias.is_cpu or not bias.is_contiguous() or bias.shape != (self.n,):
                    return None
                bias_dtype = bias.dtype
                self._bias = (bias, bias_ptr, version, bias_dtype)
            if bias_dtype != dtype:
                return None
        native_lora = None
        if lora is not None:
            native_lora = self._checked_adapter(*lora, dtype)
            if native_lora is None:
                return None
        # `empty_like` skips the parsing of a shape and a dtype keyword (1-2 us, as much as a
        # small layer's product): the output of a square weight has the input's shape.
        y = torch.empty_like(x) if self.n == self.k else torch.empty(*shape[:-1], self.n, dtype=dtype)
        if rows > self._serial_rows:
            _threads.sync()
        self.native.matmul(x.data_ptr(), rows, y.data_ptr(), name, False, native_lora, bias_ptr)
        return y

    def _checked_adapter(self, a: torch.Tensor, b: torch.Tensor, scaling: float, dtype: torch.dtype) -> tuple | None:
        """The native call's adapter argument for `decode`, or None where A and B (plain
        tensors with no gradients to record: `direct_on_cpu`) cannot go into it: not contiguous
        CPU tensors of shapes (r, k) and (n, r) in `dtype`."""
        try:
            versions = (a._version, b._version)
        except RuntimeError:  # inference tensors have no version counter: checked every call
            versions = None
        checked_a, checked_b, facts = self._adapter
        a_ptr, b_ptr = a.data_ptr(), b.data_ptr()
        if versions is None or a is not checked_a or b is not checked_b or facts[:3] != (a_ptr, b_ptr, versions):
            r = a.shape[0] if a.dim() == 2 else -1
            if (not a.is_cpu or not b.is_cpu or a.shape != (r, self.k) or b.shape != (self.n, r)
                    or not a.is_contiguous() or not b.is_contiguous() or a.dtype != b.dtype):
                return None
            facts = (a_ptr, b_ptr, versions, a.dtype, r)
            self._adapter = (a, b, facts)
        if facts[3] != dtype:
            return None
        return a_ptr, b_ptr, facts[4], float(scaling)

    def matmul(self, x: torch.Tensor, transposed: bool = False, lora: tuple | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ W.T` (`x @ W` when `transposed`) for a CPU float tensor x of shape (..., k)
        (or (..., n)); with `lora` = (A, B, scaling), plus `scaling * (x @ A.T) @ B.T`; with
        `bias` (n,), plus the bias."""
        if lora is None and not transposed:
            y = self.decode(x, bias)
            if y is not None:
                return y
        n, k = self.n, self.k
        name, shape = _DTYPE_NAMES.get(x.dtype), x.shape
        inner, outer = (n, k) if transposed else (k, n)
        if name is None or not x.is_cpu or shape[-1] != inner:
            raise ValueError(f"x must be a CPU float tensor of shape (..., {inner}), got {x.dtype} {tuple(shape)} "
                             f"on {x.device}")
        x2d = x if len(shape) == 2 else x.reshape(-1, inner)
        if not x2d.is_contiguous():
            x2d = x2d.contiguous()
        m = x2d.shape[0]
        if m > FUSED_MAX_ROWS:
            y = product(x2d, self.packed, self.absmax, n, k, self.blocksize, self.quant_type, transposed).to(x.dtype)
            return _add_in_torch(y, x2d, lora, bias).reshape(*shape[:-1], outer)
        native_lora, torch_lora = None, None
        if lora is not None:
            a, b, scaling = lora
            fits = (a.dtype == x.dtype and b.dtype == x.dtype and a.dim() == 2 and a.shape[1] == k
                    and tuple(b.shape) == (n, a.shape[0]) and a.is_cpu and b.is_cpu and a.is_contiguous()
                    and b.is_contiguous() and not transposed)
            if fits:  # in the same native call: `y += scaling * (x @ A.T) @ B.T`
                native_lora = (a.data_ptr(), b.data_ptr(), a.shape[0], float(scaling))
            else:  # an adapter in another dtype than x (fp32 over a bf16 base): torch adds it
                torch_lora = lora
        native_bias = None
        if bias is not None and bias.dtype == x.dtype and bias.is_cpu and bias.is_contiguous() \
                and bias.shape == (n,) and not transposed:
            native_bias, bias = bias.data_ptr(), None
        y = x2d.new_empty((m, outer))
        _threads.sync()
        self.native.matmul(x2d.data_ptr(), m, y.data_ptr(), name, transposed, native_lora, native_bias)
        if torch_lora is not None or bias is not None:
            y = _add_in_torch(y, x2d, torch_lora, bias)  # what the native call could not take
        return y if len(shape) == 2 else y.reshape(*shape[:-1], outer)


def _add_in_torch(y: torch.Tensor, x2d: torch.Tensor, lora: tuple | None, bias: torch.Tensor | None) -> torch.Tensor:
    """`y += scaling * (x2d @ A.T) @ B.T` (in the adapter's dtype) and `y += bias`, in place."""
    if lora is not None:
        a, b, scaling = lora
        add_low_rank(y, x2d.to(a.dtype) @ a.t(), b, scaling)
    if bias is not None:
        y.add_(bias.to(y.dtype))
    return y


def prepare(packed: torch.Tensor, scales: BlockScales, n: int, k: int, blocksize: int,
            quant_type: str) -> PreparedWeight:
    return PreparedWeight(packed, scales, n, k, blocksize, quant_type)
