//! 4-bit matmuls that never build the whole dequantized weight:
//! `y = x @ W.T` (the forward of a linear layer) and `dx = dy @ W` (its input gradient),
//! for a packed weight `W` of shape `(n, k)` and activations of any number of rows `m`.
//!
//! When every weight row starts a block (`k % blocksize == 0`, true for real models) the
//! fused SIMD kernels decode each packed byte straight into registers, up to
//! [`simd::MAX_ROWS`] activation rows per decode; other shapes decode one weight row at a
//! time into a small buffer. Meant for few rows (up to [`FUSED_MAX_ROWS`]); with more, a
//! caller dequantizes weight tiles and multiplies them with a GEMM, as the Python package
//! does with torch's BLAS (whose threads are the ones the rest of a training step runs on).

use crate::element::Element;
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

fn check_shapes(weight: &Packed4bit<'_>, n: usize, k: usize) -> Result<(), Error> {
    ensure!(n > 0 && k > 0, "the weight shape must be positive, got ({n}, {k})");
    ensure!(
        n.checked_mul(k) == Some(weight.numel),
        "weight shape ({n}, {k}) does not match its {} elements",
        weight.numel
    );
    Ok(())
}

fn rows_of(len: usize, width: usize, name: &str) -> Result<usize, Error> {
    ensure!(len.is_multiple_of(width), "{name} holds {len} values, not a whole number of rows of {width}");
    Ok(len / width)
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
    check_shapes(weight, n, k)?;
    let m = rows_of(x.len(), k, "x")?;
    ensure!(y.len() == m * n, "y must hold {} values for shape ({m}, {n}), got {}", m * n, y.len());
    if m == 0 {
        return Ok(());
    }
    // Results are produced weight row by weight row: y transposed, shape (n, m).
    let mut y_t = vec![0.0f32; n * m];
    let rows_per_task = (n / (8 * parallel::threads())).clamp(1, 64);
    if weight.rows_are_block_aligned(k) {
        let laid: Vec<Vec<f32>> = x
            .chunks_exact(k)
            .map(|row| {
                let mut row32 = vec![0.0f32; k];
                T::widen_into(row, &mut row32);
                simd::dot_layout(isa, &row32)
            })
            .collect();
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
        });
    } else {
        let mut x32 = vec![0.0f32; x.len()];
        T::widen_into(x, &mut x32);
        parallel::for_each_chunk_mut(&mut y_t, rows_per_task * m, |t, out| {
            let mut w_row = vec![0.0f32; k];
            for (i, out_row) in out.chunks_mut(m).enumerate() {
                let r = t * rows_per_task + i;
                decode_span(isa, weight, r * k, &mut w_row, false);
                for (q, o) in out_row.iter_mut().enumerate() {
                    *o = dot(&x32[q * k..(q + 1) * k], &w_row);
                }
            }
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
