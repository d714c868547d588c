"""Type stubs of the Rust extension (rust/fastlora-py). Private: use fastlora's public API.

Arrays are 1-D contiguous numpy views of torch tensors; bf16/fp16 travel as uint16 views and
`dtype` names the element type ("float32", "bfloat16", "float16"). Errors raise ValueError.
"""

import numpy as np
import numpy.typing as npt

FUSED_MAX_ROWS: int  # up to this many rows `matmul_4bit` decodes in registers; callers GEMM above

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def use_openmp(path: str) -> None: ...
def thread_pool() -> str: ...
def simd_level() -> str: ...
def simd_levels() -> list[str]: ...
def native_bf16() -> bool: ...
def amx_bf16() -> bool: ...
def cpu_vendor() -> str: ...
def quantize_4bit(
    src: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    dtype: str,
    blocksize: int,
    quant_type: str,
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
) -> None: ...
def dequantize_4bit(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    numel: int,
    blocksize: int,
    quant_type: str,
    start: int,
    out: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    dtype: str,
) -> None: ...
def quantize_blockwise_8bit(
    values: npt.NDArray[np.float32],
    code: npt.NDArray[np.float32],
    blocksize: int,
    quantized: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
) -> None: ...
def dequantize_blockwise_8bit(
    quantized: npt.NDArray[np.uint8],
    code: npt.NDArray[np.float32],
    absmax: npt.NDArray[np.float32],
    blocksize: int,
    offset: float,
    out: npt.NDArray[np.float32],
) -> None: ...
def matmul_4bit(
    x: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    n: int,
    k: int,
    blocksize: int,
    quant_type: str,
    transposed: bool,
    y: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    dtype: str,
) -> None: ...
def matmul_4bit_bf16(
    x: npt.NDArray[np.uint16],
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    n: int,
    k: int,
    blocksize: int,
    quant_type: str,
    transposed: bool,
    y: npt.NDArray[np.uint16],
    low_rank: tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16], int, float] | None = None,
) -> None: ...
def lora_batched(
    x: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    a: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    b: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    indices: npt.NDArray[np.int64],
    scaling: npt.NDArray[np.float32],
    k: int,
    r: int,
    o: int,
    y: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    dtype: str,
) -> None: ...
class PackedWeight:
    """A frozen packed weight and its fp32 scales, held for many calls (`backends.cpu.PreparedWeight`)."""

    def __init__(
        self,
        packed: npt.NDArray[np.uint8],
        absmax: npt.NDArray[np.float32],
        n: int,
        k: int,
        blocksize: int,
        quant_type: str,
    ) -> None: ...
    @property
    def serial_rows(self) -> int:
        """The most rows a call runs with on the calling thread, whatever the thread setting."""
    def matmul(
        self,
        x: int,
        rows: int,
        y: int,
        dtype: str,
        transposed: bool,
        lora: tuple[int, int, int, float] | None = None,
        bias: int | None = None,
    ) -> None:
        """`x`, `y`, `bias` (and A, B in `lora`) are data addresses of tensors the caller has checked."""
