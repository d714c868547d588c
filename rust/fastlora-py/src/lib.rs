//! `fastlora._native`: the thin PyO3 binding of fastlora-core.
//!
//! Tensors arrive as 1-D numpy views of torch tensors (bf16 and fp16 as `uint16` views,
//! since numpy has no bf16) plus a dtype name. The Python side validates everything first;
//! the core checks lengths again, and its errors surface as `ValueError`. Heavy work runs
//! with the GIL released, on the threads `threads` picks (torch's OpenMP team where it has one).

mod threads;

use threads::run;

use fastlora_core::{gemm_bf16, lora, matmul, quantize, simd, Error, Packed4bit, QuantType};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

fn to_py(err: Error) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// Multiply-adds of the matmul and LoRA kernels per element operation (`threads::run`'s
/// unit): a fused multiply-add costs about a quarter of decoding and storing one element.
const MACS_PER_OP: usize = 4;

/// The instruction set the kernels use: "avx512", "avx2" or "scalar".
#[pyfunction]
fn simd_level() -> &'static str {
    simd::active().name()
}

/// Every instruction set this CPU can run the kernels with, narrowest first.
#[pyfunction]
fn simd_levels() -> Vec<&'static str> {
    simd::available().into_iter().map(simd::Isa::name).collect()
}

/// Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX) and the kernels may use it.
#[pyfunction]
fn native_bf16() -> bool {
    simd::native_bf16()
}

/// The CPU's vendor string from CPUID ("GenuineIntel", "AuthenticAMD", ...); empty off x86-64.
#[pyfunction]
fn amx_bf16() -> bool {
    simd::amx_bf16()
}

#[pyfunction]
fn cpu_vendor() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let bytes: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    #[cfg(not(target_arch = "x86_64"))]
    String::new()
}

#[derive(Clone, Copy)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

fn parse_dtype(name: &str) -> PyResult<Dtype> {
    match name {
        "float32" => Ok(Dtype::F32),
        "bfloat16" => Ok(Dtype::Bf16),
        "float16" => Ok(Dtype::F16),
        _ => Err(PyValueError::new_err(format!("unsupported dtype {name:?}"))),
    }
}

/// A read-only activation buffer of one of the three element types.
enum Input<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    Bits(PyReadonlyArray1<'py, u16>, Dtype),
}

impl<'py> Input<'py> {
    fn new(array: &Bound<'py, PyAny>, dtype: &str) -> PyResult<Self> {
        Ok(match parse_dtype(dtype)? {
            Dtype::F32 => Input::F32(array.extract()?),
            d => Input::Bits(array.extract()?, d),
        })
    }
}

enum Output<'py> {
    F32(PyReadwriteArray1<'py, f32>),
    Bits(PyReadwriteArray1<'py, u16>, Dtype),
}

impl<'py> Output<'py> {
    fn new(array: &Bound<'py, PyAny>, dtype: &str) -> PyResult<Self> {
        Ok(match parse_dtype(dtype)? {
            Dtype::F32 => Output::F32(array.extract()?),
            d => Output::Bits(array.extract()?, d),
        })
    }
}

fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| PyValueError::new_err(format!("{name} must be contiguous")))
}

fn slice_mut<'a, T: numpy::Element>(a: &'a mut PyReadwriteArray1<'_, T>, name: &str) -> PyResult<&'a mut [T]> {
    if !a.is_contiguous() {
        return Err(PyValueError::new_err(format!("{name} must be contiguous")));
    }
    a.as_slice_mut().map_err(|_| PyValueError::new_err(format!("{name} must be contiguous")))
}

/// Calls `$body` with `$x: &[T]` bound for the element type of input `$input`.
macro_rules! with_input {
    ($input:expr, $name:literal, |$x:ident| $body:expr) => {
        match &$input {
            Input::F32(a) => {
                let $x: &[f32] = slice(a, $name)?;
                $body
            }
            Input::Bits(a, Dtype::Bf16) => {
                let $x: &[bf16] = slice(a, $name)?.reinterpret_cast();
                $body
            }
            Input::Bits(a, _) => {
                let $x: &[f16] = slice(a, $name)?.reinterpret_cast();
                $body
            }
        }
    };
}

/// Calls `$body` with `$x: &[T]` and `$y: &mut [T]` of the same element type.
macro_rules! with_input_output {
    ($input:expr, $output:expr, $names:literal, |$x:ident, $y:ident| $body:expr) => {
        match (&$input, &mut $output) {
            (Input::F32(a), Output::F32(b)) => {
                let $x: &[f32] = slice(a, $names)?;
                let $y: &mut [f32] = slice_mut(b, $names)?;
                $body
            }
            (Input::Bits(a, Dtype::Bf16), Output::Bits(b, Dtype::Bf16)) => {
                let $x: &[bf16] = slice(a, $names)?.reinterpret_cast();
                let $y: &mut [bf16] = slice_mut(b, $names)?.reinterpret_cast_mut();
                $body
            }
            (Input::Bits(a, Dtype::F16), Output::Bits(b, Dtype::F16)) => {
                let $x: &[f16] = slice(a, $names)?.reinterpret_cast();
                let $y: &mut [f16] = slice_mut(b, $names)?.reinterpret_cast_mut();
                $body
            }
            _ => return Err(PyValueError::new_err(concat!($names, " must share one dtype"))),
        }
    };
}

fn packed_weight<'a>(
    packed: &'a [u8],
    absmax: &'a [f32],
    numel: usize,
    blocksize: usize,
    quant_type: &str,
) -> PyResult<Packed4bit<'a>> {
    Packed4bit::new(packed, absmax, numel, blocksize, QuantType::parse(quant_type).map_err(to_py)?).map_err(to_py)
}

#[pyfunction]
fn quantize_4bit(
    py: Python<'_>,
    src: &Bound<'_, PyAny>,
    dtype: &str,
    blocksize: usize,
    quant_type: &str,
    mut packed: PyReadwriteArray1<'_, u8>,
    mut absmax: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let qt = QuantType::parse(quant_type).map_err(to_py)?;
    let input = Input::new(src, dtype)?;
    let packed = slice_mut(&mut packed, "packed")?;
    let absmax = slice_mut(&mut absmax, "absmax")?;
    with_input!(input, "src", |x| run(py, x.len(), || quantize::quantize_4bit(x, blocksize, qt, packed, absmax)))
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn dequantize_4bit(
    py: Python<'_>,
    packed: PyReadonlyArray1<'_, u8>,
    absmax: PyReadonlyArray1<'_, f32>,
    numel: usize,
    blocksize: usize,
    quant_type: &str,
    start: usize,
    out: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    let weight = packed_weight(slice(&packed, "packed")?, slice(&absmax, "absmax")?, numel, blocksize, quant_type)?;
    let isa = simd::active();
    match Output::new(out, dtype)? {
        Output::F32(mut o) => {
            let o = slice_mut(&mut o, "out")?;
            run(py, o.len(), || quantize::dequantize_4bit(isa, &weight, start, o))
        }
        Output::Bits(mut o, Dtype::Bf16) => {
            let o: &mut [bf16] = slice_mut(&mut o, "out")?.reinterpret_cast_mut();
            run(py, o.len(), || quantize::dequantize_4bit(isa, &weight, start, o))
        }
        Output::Bits(mut o, _) => {
            let o: &mut [f16] = slice_mut(&mut o, "out")?.reinterpret_cast_mut();
            run(py, o.len(), || quantize::dequantize_4bit(isa, &weight, start, o))
        }
    }
}

#[pyfunction]
fn quantize_blockwise_8bit(
    py: Python<'_>,
    values: PyReadonlyArray1<'_, f32>,
    code: PyReadonlyArray1<'_, f32>,
    blocksize: usize,
    mut quantized: PyReadwriteArray1<'_, u8>,
    mut absmax: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let (values, code) = (slice(&values, "values")?, slice(&code, "code")?);
    let (quantized, absmax) = (slice_mut(&mut quantized, "quantized")?, slice_mut(&mut absmax, "absmax")?);
    run(py, values.len(), || quantize::quantize_blockwise_8bit(values, code, blocksize, quantized, absmax))
}

#[pyfunction]
fn dequantize_blockwise_8bit(
    py: Python<'_>,
    quantized: PyReadonlyArray1<'_, u8>,
    code: PyReadonlyArray1<'_, f32>,
    absmax: PyReadonlyArray1<'_, f32>,
    blocksize: usize,
    offset: f32,
    mut out: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let (quantized, code, absmax) = (slice(&quantized, "quantized")?, slice(&code, "code")?, slice(&absmax, "absmax")?);
    let out = slice_mut(&mut out, "out")?;
    run(py, out.len(), || quantize::dequantize_blockwise_8bit(quantized, code, absmax, blocksize, offset, out))
}

/// `y = x @ W.T` (`transposed=False`) or `y = x @ W` (`transposed=True`, the input
/// gradient) for a packed weight of shape `(n, k)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn matmul_4bit(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    packed: PyReadonlyArray1<'_, u8>,
    absmax: PyReadonlyArray1<'_, f32>,
    n: usize,
    k: usize,
    blocksize: usize,
    quant_type: &str,
    transposed: bool,
    y: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    let numel = n.checked_mul(k).ok_or_else(|| PyValueError::new_err("weight shape overflows"))?;
    let weight = packed_weight(slice(&packed, "packed")?, slice(&absmax, "absmax")?, numel, blocksize, quant_type)?;
    let isa = simd::active();
    let input = Input::new(x, dtype)?;
    let mut output = Output::new(y, dtype)?;
    let outputs_per_row = if transposed { k } else { n };
    let ops = |inputs: usize| inputs.saturating_mul(outputs_per_row) / MACS_PER_OP;
    with_input_output!(input, output, "x and y", |x, y| run(py, ops(x.len()), || if transposed {
        matmul::matmul_4bit_t(isa, x, &weight, n, k, y)
    } else {
        matmul::matmul_4bit(isa, x, &weight, n, k, y)
    }))
}

/// `y = x @ W.T` (with `transposed`, `y = x @ W`) for bf16 `x` and `y` (`uint16` arrays of
/// bf16 bits) by the bf16 GEMM that dequantizes in its packing (`gemm_bf16`), where the CPU
/// has AVX512-BF16 (`native_bf16`); `low_rank` = `(u, factor, rank, scale)` (bf16 bits) adds
/// `scale * u @ factor.T` (`scale * u @ factor`) before the rounding.
#[pyfunction]
#[pyo3(signature = (x, packed, absmax, n, k, blocksize, quant_type, transposed, y, low_rank=None))]
#[allow(clippy::too_many_arguments)]
fn matmul_4bit_bf16(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, u16>,
    packed: PyReadonlyArray1<'_, u8>,
    absmax: PyReadonlyArray1<'_, f32>,
    n: usize,
    k: usize,
    blocksize: usize,
    quant_type: &str,
    transposed: bool,
    mut y: PyReadwriteArray1<'_, u16>,
    low_rank: Option<(PyReadonlyArray1<'_, u16>, PyReadonlyArray1<'_, u16>, usize, f32)>,
) -> PyResult<()> {
    let numel = n.checked_mul(k).ok_or_else(|| PyValueError::new_err("weight shape overflows"))?;
    let weight = packed_weight(slice(&packed, "packed")?, slice(&absmax, "absmax")?, numel, blocksize, quant_type)?;
    let x: &[bf16] = slice(&x, "x")?.reinterpret_cast();
    let y: &mut [bf16] = slice_mut(&mut y, "y")?.reinterpret_cast_mut();
    let term = match &low_rank {
        Some((u, factor, rank, scale)) => Some(gemm_bf16::LowRank {
            u: slice(u, "u")?.reinterpret_cast(),
            factor: slice(factor, "factor")?.reinterpret_cast(),
            rank: *rank,
            scale: *scale,
        }),
        None => None,
    };
    let ops = x.len().saturating_mul(if transposed { k } else { n }) / MACS_PER_OP;
    run(py, ops, || gemm_bf16::matmul_4bit_bf16(simd::active(), x, &weight, n, k, transposed, term.as_ref(), y))
}

/// Calls `$body` with three read-only `uint16` arrays and one writable one viewed as `&[$t]`
/// and `&mut [$t]` (bf16 or f16: `half`'s bit casts are not generic outside the crate).
macro_rules! half_bits {
    ($t:ty, ($x:expr, $a:expr, $b:expr, $y:expr), |$xs:ident, $as_:ident, $bs:ident, $ys:ident| $body:expr) => {{
        let ($xs, $as_, $bs): (&[$t], &[$t], &[$t]) = (
            slice($x, "x")?.reinterpret_cast(),
            slice($a, "A")?.reinterpret_cast(),
            slice($b, "B")?.reinterpret_cast(),
        );
        let $ys: &mut [$t] = slice_mut($y, "y")?.reinterpret_cast_mut();
        $body
    }};
}

/// The LoRA term of a mixed batch, each row through its own adapter (`lora::lora_batched`):
/// x `(rows, k)`, A `(n, r, k)`, B `(n, o, r)` and y `(rows, o)` of dtype `dtype`, `indices`
/// (`rows` of them, in `[-1, n)`) and `scaling` (`n`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn lora_batched(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    indices: PyReadonlyArray1<'_, i64>,
    scaling: PyReadonlyArray1<'_, f32>,
    k: usize,
    r: usize,
    o: usize,
    y: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    let (indices, scaling) = (slice(&indices, "indices")?, slice(&scaling, "scaling")?);
    let (x, a, b) = (Input::new(x, dtype)?, Input::new(a, dtype)?, Input::new(b, dtype)?);
    let mut output = Output::new(y, dtype)?;
    let ops = indices.len().saturating_mul(r.saturating_mul(k + o)) / MACS_PER_OP;
    let isa = simd::active();
    match (&x, &a, &b, &mut output) {
        (Input::F32(x), Input::F32(a), Input::F32(b), Output::F32(y)) => {
            let (x, a, b, y) = (slice(x, "x")?, slice(a, "A")?, slice(b, "B")?, slice_mut(y, "y")?);
            run(py, ops, || lora::lora_batched(isa, x, a, b, indices, scaling, k, r, o, y))
        }
        (Input::Bits(x, Dtype::Bf16), Input::Bits(a, _), Input::Bits(b, _), Output::Bits(y, _)) => {
            half_bits!(bf16, (x, a, b, y), |x, a, b, y| run(py, ops, || {
                lora::lora_batched(isa, x, a, b, indices, scaling, k, r, o, y)
            }))
        }
        (Input::Bits(x, _), Input::Bits(a, _), Input::Bits(b, _), Output::Bits(y, _)) => {
            half_bits!(f16, (x, a, b, y), |x, a, b, y| run(py, ops, || {
                lora::lora_batched(isa, x, a, b, indices, scaling, k, r, o, y)
            }))
        }
        _ => Err(PyValueError::new_err("x, A, B and y must share one dtype")),
    }
}

/// A frozen 4-bit weight prepared once for many calls: its packed bytes and fp32 block
/// scales (numpy views of the layer's tensors, kept alive here), shape and format, parsed and
/// validated at construction. A call passes only the activation and output, as the data
/// pointers of tensors the Python caller (`fastlora.plan`) has checked to be contiguous CPU
/// tensors of `dtype` with `rows` rows of the right width; lengths follow from `rows` and the
/// weight's shape, so nothing a call passes can make a kernel read past the weight.
#[pyclass(frozen, module = "fastlora._native")]
struct PackedWeight {
    packed: Py<numpy::PyArray1<u8>>,
    absmax: Py<numpy::PyArray1<f32>>,
    n: usize,
    k: usize,
    blocksize: usize,
    quant_type: QuantType,
}

/// A slice over `len` elements at `ptr`, an address the caller vouches for (see `PackedWeight`).
///
/// # Safety
/// `ptr` must point to `len` initialized elements of `T` that nothing else writes during the call.
unsafe fn raw_slice<'a, T>(ptr: usize, len: usize, name: &str) -> PyResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr == 0 || !ptr.is_multiple_of(std::mem::align_of::<T>()) {
        return Err(PyValueError::new_err(format!("{name}: invalid data pointer {ptr:#x}")));
    }
    Ok(std::slice::from_raw_parts(ptr as *const T, len))
}

/// [`raw_slice`] of the element type of `_like`.
///
/// # Safety
/// As [`raw_slice`].
unsafe fn raw_like<'a, T>(_like: &[T], ptr: usize, len: usize, name: &str) -> PyResult<&'a [T]> {
    raw_slice(ptr, len, name)
}

/// As [`raw_slice`], writable.
///
/// # Safety
/// As [`raw_slice`], and nothing else reads or writes the elements during the call.
unsafe fn raw_slice_mut<'a, T>(ptr: usize, len: usize, name: &str) -> PyResult<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr == 0 || !ptr.is_multiple_of(std::mem::align_of::<T>()) {
        return Err(PyValueError::new_err(format!("{name}: invalid data pointer {ptr:#x}")));
    }
    Ok(std::slice::from_raw_parts_mut(ptr as *mut T, len))
}

/// Runs `$body` with `$x: &[T]` and `$y: &mut [T]` made from raw addresses for dtype `$dtype`.
macro_rules! with_raw {
    ($dtype:expr, ($x:ident, $x_len:expr), ($y:ident, $y_len:expr), $body:expr) => {
        match parse_dtype($dtype)? {
            Dtype::F32 => {
                // SAFETY: see `PackedWeight`: the caller passes checked tensors' addresses.
                let ($x, $y) = unsafe { (raw_slice::<f32>($x, $x_len, "x")?, raw_slice_mut::<f32>($y, $y_len, "y")?) };
                $body
            }
            Dtype::Bf16 => {
                // SAFETY: as above.
                let ($x, $y) =
                    unsafe { (raw_slice::<bf16>($x, $x_len, "x")?, raw_slice_mut::<bf16>($y, $y_len, "y")?) };
                $body
            }
            Dtype::F16 => {
                // SAFETY: as above.
                let ($x, $y) = unsafe { (raw_slice::<f16>($x, $x_len, "x")?, raw_slice_mut::<f16>($y, $y_len, "y")?) };
                $body
            }
        }
    };
}

impl PackedWeight {
    fn weight<'a>(
        &self,
        packed: &'a Bound<'_, numpy::PyArray1<u8>>,
        absmax: &'a Bound<'_, numpy::PyArray1<f32>>,
    ) -> PyResult<Packed4bit<'a>> {
        // SAFETY: the arrays are views of the layer's frozen tensors; no one writes them.
        let (packed, absmax) = unsafe { (packed.as_slice(), absmax.as_slice()) };
        let (packed, absmax) = (
            packed.map_err(|_| PyValueError::new_err("packed must be contiguous"))?,
            absmax.map_err(|_| PyValueError::new_err("absmax must be contiguous"))?,
        );
        Packed4bit::new(packed, absmax, self.n * self.k, self.blocksize, self.quant_type).map_err(to_py)
    }
}

#[pymethods]
impl PackedWeight {
    #[new]
    fn new(
        packed: Bound<'_, numpy::PyArray1<u8>>,
        absmax: Bound<'_, numpy::PyArray1<f32>>,
        n: usize,
        k: usize,
        blocksize: usize,
        quant_type: &str,
    ) -> PyResult<Self> {
        n.checked_mul(k).ok_or_else(|| PyValueError::new_err("weight shape overflows"))?;
        let made = PackedWeight {
            packed: packed.clone().unbind(),
            absmax: absmax.clone().unbind(),
            n,
            k,
            blocksize,
            quant_type: QuantType::parse(quant_type).map_err(to_py)?,
        };
        made.weight(&packed, &absmax)?;
        Ok(made)
    }

    /// The most rows a call may have and still run on the calling thread with the GIL held,
    /// whatever the thread setting (so a caller need not pass that setting on first).
    #[getter]
    fn serial_rows(&self) -> usize {
        (threads::HELD_GIL_MAX_OPS * MACS_PER_OP - 1) / (self.n * self.k).max(1)
    }

    /// `y = x @ W.T` (or `x @ W` when `transposed`) for `rows` activation rows at address `x`
    /// into the output at address `y`; with `lora` = (A address, B address, r, scaling) in
    /// the same dtype, also `y += scaling * (x @ A.T) @ B.T`; with `bias` (the address of `n`
    /// values of that dtype), also `y += bias`.
    #[pyo3(signature = (x, rows, y, dtype, transposed, lora=None, bias=None))]
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        py: Python<'_>,
        x: usize,
        rows: usize,
        y: usize,
        dtype: &str,
        transposed: bool,
        lora: Option<(usize, usize, usize, f32)>,
        bias: Option<usize>,
    ) -> PyResult<()> {
        let (packed, absmax) = (self.packed.bind(py), self.absmax.bind(py));
        let weight = self.weight(packed, absmax)?;
        let (n, k) = (self.n, self.k);
        let (inner, outer) = if transposed { (n, k) } else { (k, n) };
        if transposed && (lora.is_some() || bias.is_some()) {
            return Err(PyValueError::new_err("the transposed product takes no adapter or bias"));
        }
        let isa = simd::active();
        let x_len = rows.checked_mul(inner).ok_or_else(|| PyValueError::new_err("rows overflow"))?;
        let y_len = rows.checked_mul(outer).ok_or_else(|| PyValueError::new_err("rows overflow"))?;
        let ops = x_len.saturating_mul(outer) / MACS_PER_OP;
        with_raw!(dtype, (x, x_len), (y, y_len), {
            let lora = match lora {
                None => None,
                Some((a, b, r, scale)) => {
                    // SAFETY: as for x: addresses of checked (r, k) and (n, r) tensors of this dtype.
                    let (a, b) = unsafe { (raw_slice(a, r * k, "A")?, raw_slice(b, n * r, "B")?) };
                    Some(matmul::LoraTerm { a, b, r, scale })
                }
            };
            // SAFETY: as for x: the address of a checked (n,) tensor of this dtype.
            let bias = match bias {
                None => None,
                Some(b) => Some(unsafe { raw_like(x, b, n, "bias")? }),
            };
            run(py, ops, || {
                if transposed {
                    matmul::matmul_4bit_t(isa, x, &weight, n, k, y)
                } else {
                    matmul::matmul_4bit_plus(isa, x, &weight, n, k, &matmul::Addends { lora, bias }, y)
                }
            })
        })
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // A FASTLORA_MAX_ISA the CPU cannot honour stops the import, before any kernel runs.
    simd::configured().map_err(PyValueError::new_err)?;
    m.add_function(wrap_pyfunction!(threads::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads::use_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(threads::thread_pool, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(native_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(amx_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_vendor, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_blockwise_8bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_blockwise_8bit, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_4bit_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(lora_batched, m)?)?;
    m.add_class::<PackedWeight>()?;
    m.add("FUSED_MAX_ROWS", matmul::FUSED_MAX_ROWS)?;
    Ok(())
}
