//! 4-bit matmuls that never build the whole dequantized weight:
//! `y = x @ W.T` (the forward of a linear layer) and `dx = dy @ W` (its input gradient),
//! for a packed weight `W` of shape `(n, k)` and activations of any number of rows `m`.
//!
//! When every weight row starts a block (`k % blocksize == 0`, true for real models) the
//! fused SIMD kernels decode each packed byte straight into registers, up to
//! [`simd::MAX_ROWS`] activation rows per decode; other shapes decode one weight row at a
//! time into a small buffer. Meant for few rows (up to [`FUSED_MAX_ROWS`]); with more, a
//! caller dequantizes weight tiles and multiplies them with a GEMM, as the Python package
//! does with torch's BLAS (whose threads are the ones the rest of a training step runs on),
//! or, for bf16 on CPUs with AVX512-BF16 and no AMX, calls [`crate::gemm_bf16`].

use crate::element::{widen, Element, Widened};
use crate::error::{ensure, Error};
use crate::format::Packed4bit;
use crate::parallel;
use crate::quantize::decode_span;
use crate::simd::{self, dot, Isa, MAX_ROWS};

/// Weight columns per task of the fused transposed product (rounded to whole blocks).
const COLUMNS_PER_TASK: usize = 512;
/// Up to this many activation rows the fused kernels beat dequantizing the weight and
/// multiplying with a GEMM (callers with more rows do that: the Python package dequantizes
/// tiles with `quantize::dequantize_4bit` for torch's BLAS).
pub const FUSED_MAX_ROWS: usize = 16;

pub(crate) fn check_shapes(weight: &Packed4bit<'_>, n: usize, k: usize) -> Result<(), Error> {
    ensure!(n > 0 && k > 0, "the weight shape must be positive, got ({n}, {k})");
    ensure!(
        n.checked_mul(k) == Some(weight.numel),
        "weight shape ({n}, {k}) does not match its {} elements",
        weight.numel
    );
    Ok(())
}

pub(crate) fn rows_of(len: usize, width: usize, name: &str) -> Result<usize, Error> {
    ensure!(len.is_multiple_of(width), "{name} holds {len} values, not a whole number of rows of {width}");
    Ok(len / width)
}

/// A LoRA adapter's term `scale * (x @ a.T) @ b.T`, for `a` of shape `(r, k)` and `b` of
/// shape `(n, r)`, row-major.
pub struct LoraTerm<'a, T> {
    pub a: &'a [T],
    pub b: &'a [T],
    pub r: usize,
    pub scale: f32,
}

/// What a layer's decoding call adds to `x @ W.T`: an adapter's term and a bias of `n`
/// values. Each task adds them to the output rows it has just computed, in fp32, so the
/// output is rounded once and the small products run on every thread while those rows are
/// in cache (after the product, on one thread, they cost a third of a 576x576 product).
pub struct Addends<'a, T> {
    pub lora: Option<LoraTerm<'a, T>>,
    pub bias: Option<&'a [T]>,
}

impl<T> Addends<'_, T> {
    pub const NONE: Self = Addends { lora: None, bias: None };
}

/// `y = x @ W.T` with `x` of shape `(m, k)` and `y` of shape `(m, n)`, row-major.
pub fn matmul_4bit<T: Element>(
    isa: Isa,
    x: &[T],
    weight: &Packed4bit<'_>,
    n: usize,
    k: usize,
    y: &mut [T],
) -> Result<(), Error> {
    matmul_4bit_plus(isa, x, weight, n, k, &Addends::NONE, y)
}

/// `y = x @ W.T + scale * (x @ a.T) @ b.T + bias`, the terms after the product present
/// where `addends` has them.
pub fn matmul_4bit_plus<T: Element>(
    isa: Isa,
    x: &[T],
    weight: &Packed4bit<'_>,
    n: usize,
    k: usize,
    addends: &Addends<'_, T>,
    y: &mut [T],
) -> Result<(), Error> {
    check_shapes(weight, n, k)?;
    let m = rows_of(x.len(), k, "x")?;
    ensure!(y.len() == m * n, "y must hold {} values for shape ({m}, {n}), got {}", m * n, y.len());
    if m == 0 {
        return Ok(());
    }
    // fp32 activations are read in place; 16-bit ones widened once, for the product and the adapter.
    let x32 = widen(x);
    let add = AddendsF32::new(isa, &x32, k, n, addends)?;
    // Results are produced weight row by weight row: y transposed, shape (n, m).
    let mut y_t = vec![0.0f32; n * m];
    let rows_per_task = (n / (8 * parallel::threads())).clamp(1, 64);
    if weight.rows_are_block_aligned(k) {
        let laid: Vec<Vec<f32>> = x32.chunks_exact(k).map(|row| simd::dot_layout(isa, row)).collect();
        let half = k / 2;
        let block_bytes = weight.blocksize / 2;
        let blocks_per_row = k / weight.blocksize;
        let book = weight.quant_type.book();
        // The activation rows of each group of MAX_ROWS, gathered once (not once per weight row).
        let groups: Vec<Vec<&[f32]>> =
            laid.chunks(MAX_ROWS).map(|g| g.iter().map(|v| v.as_slice()).collect()).collect();
        parallel::for_each_chunk_mut(&mut y_t, rows_per_task * m, |t, out| {
            let (first, rows) = (t * rows_per_task, out.len() / m);
            let bytes = &weight.packed[first * half..(first + rows) * half];
            let scales = &weight.absmax[first * blocks_per_row..(first + rows) * blocks_per_row];
            for (g, xs) in groups.iter().enumerate() {
                let column = g * MAX_ROWS;
                simd::fused_rows_dot(isa, book, bytes, scales, half, block_bytes, xs, &mut out[column..], m);
            }
            add.add_to_rows(isa, first, m, out);
        });
    } else {
        parallel::for_each_chunk_mut(&mut y_t, rows_per_task * m, |t, out| {
            let mut w_row = vec![0.0f32; k];
            for (i, out_row) in out.chunks_mut(m).enumerate() {
                let r = t * rows_per_task + i;
                decode_span(isa, weight, r * k, &mut w_row, false);
                for (q, o) in out_row.iter_mut().enumerate() {
                    *o = dot(isa, &x32[q * k..(q + 1) * k], &w_row);
                }
            }
            add.add_to_rows(isa, t * rows_per_task, m, out);
        });
    }
    let mut row = vec![0.0f32; n];
    for (q, y_row) in y.chunks_exact_mut(n).enumerate() {
        for (r, v) in row.iter_mut().enumerate() {
            *v = y_t[r * m + q];
        }
        T::narrow_from(&row, y_row);
    }
    Ok(())
}

/// [`Addends`] in fp32, checked: the adapter's down-projection `u = x @ a.T` (`m` rows of
/// `r`, computed once) and `b` and the bias widened.
struct AddendsF32<'a> {
    lora: Option<(Vec<f32>, Widened<'a>, usize, f32)>,
    bias: Option<Widened<'a>>,
}

impl<'a> AddendsF32<'a> {
    /// `x32`: the activations in fp32.
    fn new<T: Element>(isa: Isa, x32: &[f32], k: usize, n: usize, addends: &Addends<'a, T>) -> Result<Self, Error> {
        let lora = match &addends.lora {
            None => None,
            Some(LoraTerm { a, b, r, scale }) => {
                let r = *r;
                ensure!(r > 0, "the adapter's rank must be positive");
                ensure!(a.len() == r * k, "A must hold {} values for shape ({r}, {k}), got {}", r * k, a.len());
                ensure!(b.len() == n * r, "B must hold {} values for shape ({n}, {r}), got {}", n * r, b.len());
                let a32 = widen(a);
                let u: Vec<f32> = x32
                    .chunks_exact(k)
                    .flat_map(|row| a32.chunks_exact(k).map(move |a_row| dot(isa, row, a_row)))
                    .collect();
                Some((u, widen(b), r, *scale))
            }
        };
        if let Some(bias) = addends.bias {
            ensure!(bias.len() == n, "bias must hold {n} values, got {}", bias.len());
        }
        Ok(AddendsF32 { lora, bias: addends.bias.map(widen) })
    }

    /// Adds the terms into `out`: rows `first..` of the transposed output, `m` values each.
    fn add_to_rows(&self, isa: Isa, first: usize, m: usize, out: &mut [f32]) {
        let rows = out.len() / m;
        if let Some(bias) = &self.bias {
            for (column, b) in out.chunks_exact_mut(m).zip(&bias[first..first + rows]) {
                column.iter_mut().for_each(|v| *v += b);
            }
        }
        if let Some((u, b, r, scale)) = &self.lora {
            let mut sums = vec![0.0f32; rows];
            for q in 0..m {
                simd::dots(isa, &u[q * r..(q + 1) * r], &b[first * r..(first + rows) * r], &mut sums);
                for (i, s) in sums.iter().enumerate() {
                    out[i * m + q] += scale * s;
                }
            }
        }
    }
}

/// `dx = dy @ W` with `dy` of shape `(m, n)` and `dx` of shape `(m, k)`, row-major: the
/// input gradient of `y = x @ W.T`.
pub fn matmul_4bit_t<T: Element>(
    isa: Isa,
    dy: &[T],
    weight: &Packed4bit<'_>,
    n: usize,
    k: usize,
    dx: &mut [T],
) -> Result<(), Error> {
    check_shapes(weight, n, k)?;
    let m = rows_of(dy.len(), n, "dy")?;
    ensure!(dx.len() == m * k, "dx must hold {} values for shape ({m}, {k}), got {}", m * k, dx.len());
    if m == 0 {
        return Ok(());
    }
    let mut dy32 = vec![0.0f32; dy.len()];
    T::widen_into(dy, &mut dy32);
    let mut dx32 = vec![0.0f32; m * k];
    if weight.rows_are_block_aligned(k) {
        transposed_aligned(isa, &dy32, weight, n, k, m, &mut dx32);
    } else {
        // Each task owns some rows of dx and decodes every weight row itself.
        let rows_per_task = m.div_ceil(parallel::threads()).max(1);
        parallel::for_each_chunk_mut(&mut dx32, rows_per_task * k, |t, dx_rows| {
            let mut w_row = vec![0.0f32; k];
            for r in 0..n {
                decode_span(isa, weight, r * k, &mut w_row, false);
                for (i, dx_row) in dx_rows.chunks_mut(k).enumerate() {
                    let coef = dy32[(t * rows_per_task + i) * n + r];
                    dx_row.iter_mut().zip(&w_row).for_each(|(d, w)| *d += coef * w);
                }
            }
        });
    }
    for (d, s) in dx.chunks_mut(k).zip(dx32.chunks(k)) {
        T::narrow_from(s, d);
    }
    Ok(())
}

/// Each task owns a range of whole blocks of columns and walks every weight row's bytes in
/// that range, accumulating even and odd columns apart, then interleaves them into `dx`.
fn transposed_aligned(isa: Isa, dy: &[f32], weight: &Packed4bit<'_>, n: usize, k: usize, m: usize, dx: &mut [f32]) {
    let blocksize = weight.blocksize;
    let block_bytes = blocksize / 2;
    let columns = COLUMNS_PER_TASK.div_ceil(blocksize) * blocksize;
    let tasks: Vec<(usize, usize)> = (0..k).step_by(columns).map(|c0| (c0, (c0 + columns).min(k))).collect();
    let partials: Vec<Vec<f32>> = parallel::map_tasks(tasks.len(), |t| {
        let (c0, c1) = tasks[t];
        let width = (c1 - c0) / 2;
        let mut even = vec![0.0f32; m * width];
        let mut odd = vec![0.0f32; m * width];
        let mut coef = [0.0f32; MAX_ROWS];
        for g in (0..m).step_by(MAX_ROWS) {
            let rows = MAX_ROWS.min(m - g);
            let mut acc_even: Vec<&mut [f32]> = even[g * width..(g + rows) * width].chunks_mut(width).collect();
            let mut acc_odd: Vec<&mut [f32]> = odd[g * width..(g + rows) * width].chunks_mut(width).collect();
            for r in 0..n {
                for (i, c) in coef[..rows].iter_mut().enumerate() {
                    *c = dy[(g + i) * n + r];
                }
                let first = r * k + c0;
                let bytes = &weight.packed[first / 2..(first + c1 - c0) / 2];
                let scales = &weight.absmax[first / blocksize..(first + c1 - c0) / blocksize];
                simd::fused_row_axpy(
                    isa,
                    weight.quant_type.code(),
                    bytes,
                    scales,
                    block_bytes,
                    &coef[..rows],
                    &mut acc_even,
                    &mut acc_odd,
                );
            }
        }
        let mut out = vec![0.0f32; m * (c1 - c0)];
        for (q, row) in out.chunks_mut(c1 - c0).enumerate() {
            for j in 0..width {
                row[2 * j] = even[q * width + j];
                row[2 * j + 1] = odd[q * width + j];
            }
        }
        out
    });
    for (&(c0, c1), part) in tasks.iter().zip(&partials) {
        for q in 0..m {
            dx[q * k + c0..q * k + c1].copy_from_slice(&part[q * (c1 - c0)..(q + 1) * (c1 - c0)]);
        }
    }
}

#[cfg(test)]
mod tests;
