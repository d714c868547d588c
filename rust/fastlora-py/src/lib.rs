//! `fastlora._native`: the thin PyO3 binding of fastlora-core.
//!
//! Tensors arrive as 1-D numpy views of torch tensors (bf16 and fp16 as `uint16` views,
//! since numpy has no bf16) plus a dtype name. The Python side validates everything first;
//! the core checks lengths again, and its errors surface as `ValueError`. Heavy work runs
//! with the GIL released, on a rayon pool whose size follows `set_num_threads`.

use std::sync::{Arc, Mutex};

use fastlora_core::{lora, matmul, quantize, simd, Element, Error, Packed4bit, QuantType};
use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{PyReadonlyArray1, PyReadwriteArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

fn to_py(err: Error) -> PyErr {
    PyValueError::new_err(err.to_string())
}

/// The pool the kernels run on. Rebuilt when the thread count changes, and in a forked
/// child (whose copy of the parent's pool has no threads behind it).
struct Pool {
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    pid: u32,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);
static THREADS: Mutex<usize> = Mutex::new(0);

fn pool() -> PyResult<Arc<rayon::ThreadPool>> {
    let wanted = *THREADS.lock().map_err(|_| PyRuntimeError::new_err("thread setting poisoned"))?;
    let wanted = if wanted == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { wanted };
    let mut guard = POOL.lock().map_err(|_| PyRuntimeError::new_err("thread pool poisoned"))?;
    let pid = std::process::id();
    if let Some(p) = guard.as_ref() {
        if p.threads == wanted && p.pid == pid {
            return Ok(p.pool.clone());
        }
    }
    if let Some(stale) = guard.take() {
        if stale.pid != pid {
            // Dropping a pool inherited through fork would wait on threads that do not exist.
            std::mem::forget(stale);
        }
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(wanted)
        .thread_name(|i| format!("fastlora-{i}"))
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start {wanted} threads: {e}")))?;
    let built = Arc::new(built);
    *guard = Some(Pool { pool: built.clone(), threads: wanted, pid });
    Ok(built)
}

/// Jobs costing less than this many element operations (one dequantized element each) run on
/// the calling thread. Handing a job to the pool wakes its sleeping threads and then the
/// caller, and on a loaded machine they compete with torch's threads: measured on this
/// project's 2-core VM right after a torch op, 2**18 dequantized elements took about as long
/// either way, and a one-row matmul ran faster inline up to ~4M weight elements (a 512x512
/// weight: 76 us inline against 195 us handed off).
const INLINE_MAX_OPS: usize = 1 << 18;
/// Multiply-adds of the matmul and LoRA kernels per element operation: a fused
/// multiply-add costs about a quarter of decoding and storing one element.
const MACS_PER_OP: usize = 4;

thread_local! {
    /// A one-thread pool made of the calling thread itself (rayon's `use_current_thread`), so a
    /// small job's parallel loops run here, serially, without touching the shared pool. Leaked
    /// on purpose: rayon cannot release the current thread from a pool. None when this thread
    /// already belongs to a pool.
    static INLINE: Option<&'static rayon::ThreadPool> = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build()
        .ok()
        .map(|pool| &*Box::leak(Box::new(pool)));
}

/// Runs `work` (about `ops` element operations) with the GIL released: small jobs on this
/// thread, the rest on the shared pool.
fn run<R: Send>(py: Python<'_>, ops: usize, work: impl FnOnce() -> Result<R, Error> + Send) -> PyResult<R> {
    if ops < INLINE_MAX_OPS {
        if let Some(inline) = INLINE.with(|pool| *pool) {
            return py.detach(|| inline.install(work)).map_err(to_py);
        }
    }
    let pool = pool()?;
    py.detach(|| pool.install(work)).map_err(to_py)
}

#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    *THREADS.lock().map_err(|_| PyRuntimeError::new_err("thread setting poisoned"))? = n;
    Ok(())
}

#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    Ok(pool()?.current_num_threads())
}

/// The instruction set the kernels use: "avx2" or "scalar".
#[pyfunction]
fn simd_level() -> &'static str {
    simd::active().name()
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

/// `u = x @ a.T` for `x` `(m, k)`, `a` `(r, k)`.
#[pyfunction]
fn lora_down(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    a: &Bound<'_, PyAny>,
    k: usize,
    r: usize,
    u: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    let a_in = Input::new(a, dtype)?;
    let x_in = Input::new(x, dtype)?;
    let mut u_out = Output::new(u, dtype)?;
    with_input!(a_in, "a", |a| with_input_output!(x_in, u_out, "x and u", |x, u| {
        let a = same_type(a, x)?;
        run(py, x.len().saturating_mul(r) / MACS_PER_OP, || lora::lora_down(x, a, k, r, u))
    }))
}

/// `y += scale * u @ b.T` for `u` `(m, r)`, `b` `(n, r)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn lora_up_add(
    py: Python<'_>,
    u: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    r: usize,
    n: usize,
    scale: f32,
    y: &Bound<'_, PyAny>,
    dtype: &str,
) -> PyResult<()> {
    let b_in = Input::new(b, dtype)?;
    let u_in = Input::new(u, dtype)?;
    let mut y_out = Output::new(y, dtype)?;
    with_input!(b_in, "b", |b| with_input_output!(u_in, y_out, "u and y", |u, y| {
        let b = same_type(b, u)?;
        run(py, y.len().saturating_mul(r) / MACS_PER_OP, || lora::lora_up_add(u, b, r, n, scale, y))
    }))
}

/// Re-types `a` as a slice of `x`'s element type; both came from one dtype name.
fn same_type<'a, A: 'static, T: Element>(a: &'a [A], _x: &[T]) -> PyResult<&'a [T]> {
    if std::any::TypeId::of::<A>() != std::any::TypeId::of::<T>() {
        return Err(PyValueError::new_err("operands must share one dtype"));
    }
    // SAFETY: A and T are the same type (checked above).
    Ok(unsafe { std::slice::from_raw_parts(a.as_ptr() as *const T, a.len()) })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_blockwise_8bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_blockwise_8bit, m)?)?;
    m.add_function(wrap_pyfunction!(matmul_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(lora_down, m)?)?;
    m.add_function(wrap_pyfunction!(lora_up_add, m)?)?;
    Ok(())
}
