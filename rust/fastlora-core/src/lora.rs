//! The two dense low-rank products of a LoRA adapter on CPU:
//! `u = x @ A.T` (down-projection to rank r) and `y += scale * u @ B.T` (up-projection added
//! into the base layer's output). fp32 accumulation whatever the element type.

use crate::element::Element;
use crate::error::{ensure, Error};
use crate::parallel;
use crate::simd::dot;

/// fp32 values, borrowed or widened (`widen`).
type Widened<'a> = std::borrow::Cow<'a, [f32]>;

/// `v` as fp32: borrowed when it already is, else widened into a new buffer.
fn widen<T: Element>(v: &[T]) -> Widened<'_> {
    match T::as_f32(v) {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => {
            let mut out = vec![0.0f32; v.len()];
            T::widen_into(v, &mut out);
            std::borrow::Cow::Owned(out)
        }
    }
}

/// `out = x @ w.T (* scale) (+ out)` for `x` `(m, k)`, `w` `(n, k)`, `out` `(m, n)`.
fn linear<T: Element>(
    x: &[T],
    w: &[T],
    k: usize,
    n: usize,
    scale: f32,
    accumulate: bool,
    out: &mut [T],
) -> Result<(), Error> {
    ensure!(k > 0 && n > 0, "inner and output sizes must be positive, got k={k}, n={n}");
    ensure!(x.len().is_multiple_of(k), "x holds {} values, not a whole number of rows of {k}", x.len());
    ensure!(w.len() == n * k, "weight must hold {} values for shape ({n}, {k}), got {}", n * k, w.len());
    let m = x.len() / k;
    ensure!(out.len() == m * n, "out must hold {} values for shape ({m}, {n}), got {}", m * n, out.len());
    let w32 = widen(w);
    let rows_per_task = m.div_ceil(4 * parallel::threads()).max(1);
    parallel::for_each_chunk_mut(out, rows_per_task * n, |t, out_rows| {
        let (mut x_row, mut o_row) = (vec![0.0f32; k], vec![0.0f32; n]);
        for (i, out_row) in out_rows.chunks_mut(n).enumerate() {
            let row = t * rows_per_task + i;
            T::widen_into(&x[row * k..(row + 1) * k], &mut x_row);
            for (j, o) in o_row.iter_mut().enumerate() {
                let v = dot(&x_row, &w32[j * k..(j + 1) * k]) * scale;
                *o = if accumulate { out_row[j].to_f32() + v } else { v };
            }
            T::narrow_from(&o_row, out_row);
        }
    });
    Ok(())
}

/// `u = x @ a.T` for `x` `(m, k)`, `a` `(r, k)`, `u` `(m, r)`.
pub fn lora_down<T: Element>(x: &[T], a: &[T], k: usize, r: usize, u: &mut [T]) -> Result<(), Error> {
    linear(x, a, k, r, 1.0, false, u)
}

/// `y += scale * u @ b.T` for `u` `(m, r)`, `b` `(n, r)`, `y` `(m, n)`.
pub fn lora_up_add<T: Element>(u: &[T], b: &[T], r: usize, n: usize, scale: f32, y: &mut [T]) -> Result<(), Error> {
    linear(u, b, r, n, scale, true, y)
}

/// The LoRA term of a mixed batch, each row through its own adapter (many adapters over one
/// base): `y[t] = scaling[i] * (x[t] @ a[i].T) @ b[i].T` with `i = indices[t]`, and `y[t] = 0`
/// where `i` is -1. `x` is `(rows, k)`, `a` `(n, r, k)` and `b` `(n, o, r)` hold the `n`
/// adapters stacked (ranks padded to `r` with zero rows of `a`), `y` is `(rows, o)`.
/// 16-bit adapters are widened to fp32 once per call, and only those the batch uses.
#[allow(clippy::too_many_arguments)]
pub fn lora_batched<T: Element>(
    x: &[T],
    a: &[T],
    b: &[T],
    indices: &[i64],
    scaling: &[f32],
    k: usize,
    r: usize,
    o: usize,
    y: &mut [T],
) -> Result<(), Error> {
    ensure!(k > 0 && r > 0 && o > 0, "sizes must be positive, got k={k}, r={r}, o={o}");
    let (rows, n) = (indices.len(), scaling.len());
    ensure!(x.len() == rows * k, "x must hold {} values for shape ({rows}, {k}), got {}", rows * k, x.len());
    ensure!(y.len() == rows * o, "y must hold {} values for shape ({rows}, {o}), got {}", rows * o, y.len());
    ensure!(a.len() == n * r * k, "A must hold {} values for shape ({n}, {r}, {k}), got {}", n * r * k, a.len());
    ensure!(b.len() == n * o * r, "B must hold {} values for shape ({n}, {o}, {r}), got {}", n * o * r, b.len());
    let bad = indices.iter().find(|&&i| i < -1 || i >= n as i64);
    ensure!(bad.is_none(), "indices must lie in [-1, {n}), got {}", bad.copied().unwrap_or_default());
    let mut used = vec![false; n];
    for &i in indices.iter().filter(|&&i| i >= 0) {
        used[i as usize] = true;
    }
    // fp32 adapters are read in place; 16-bit ones widened once per call.
    let widened: Vec<Option<(Widened<'_>, Widened<'_>)>> = (0..n)
        .map(|i| used[i].then(|| (widen(&a[i * r * k..(i + 1) * r * k]), widen(&b[i * o * r..(i + 1) * o * r]))))
        .collect();
    let rows_per_task = rows.div_ceil(4 * parallel::threads()).max(1);
    parallel::for_each_chunk_mut(y, rows_per_task * o, |t, out_rows| {
        let (mut x_row, mut h, mut o_row) = (vec![0.0f32; k], vec![0.0f32; r], vec![0.0f32; o]);
        for (j, out_row) in out_rows.chunks_mut(o).enumerate() {
            let row = t * rows_per_task + j;
            let Some((a32, b32)) = usize::try_from(indices[row]).ok().and_then(|i| widened[i].as_ref()) else {
                out_row.fill(T::from_f32(0.0));
                continue;
            };
            T::widen_into(&x[row * k..(row + 1) * k], &mut x_row);
            for (q, hq) in h.iter_mut().enumerate() {
                *hq = dot(&x_row, &a32[q * k..(q + 1) * k]);
            }
            let scale = scaling[indices[row] as usize];
            for (c, v) in o_row.iter_mut().enumerate() {
                *v = scale * dot(&h, &b32[c * r..(c + 1) * r]);
            }
            T::narrow_from(&o_row, out_row);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_rows_match_each_rows_own_adapter() {
        let (k, r, o, n) = (19, 3, 7, 4);
        let indices = [2i64, -1, 0, 2, 3, -1];
        let rows = indices.len();
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let a: Vec<f32> = (0..n * r * k).map(|i| ((i * 5 % 13) as f32 - 6.0) / 7.0).collect();
        let b: Vec<f32> = (0..n * o * r).map(|i| ((i * 3 % 7) as f32 - 3.0) / 2.0).collect();
        let scaling = [0.5f32, 2.0, 1.5, -1.0];
        let mut y = vec![f32::NAN; rows * o];
        lora_batched(&x, &a, &b, &indices, &scaling, k, r, o, &mut y).unwrap();
        for (t, &i) in indices.iter().enumerate() {
            for c in 0..o {
                let expect = if i < 0 {
                    0.0
                } else {
                    let i = i as usize;
                    let h =
                        |q: usize| -> f64 { (0..k).map(|p| x[t * k + p] as f64 * a[(i * r + q) * k + p] as f64).sum() };
                    scaling[i] as f64 * (0..r).map(|q| h(q) * b[(i * o + c) * r + q] as f64).sum::<f64>()
                };
                assert!((y[t * o + c] as f64 - expect).abs() < 1e-3, "row {t} column {c}");
            }
        }
    }

    #[test]
    fn batched_indices_out_of_range_are_errors() {
        let mut y = vec![0.0f32; 2];
        let (x, a, b) = ([1.0f32; 2], [1.0f32; 2], [1.0f32; 2]);
        assert!(lora_batched(&x, &a, &b, &[1], &[1.0], 2, 1, 2, &mut y).is_err());
        assert!(lora_batched(&x, &a, &b, &[-2], &[1.0], 2, 1, 2, &mut y).is_err());
        assert!(lora_batched(&x, &a, &b, &[0, 0], &[1.0], 2, 1, 2, &mut y).is_err());
    }

    #[test]
    fn down_then_up_matches_a_naive_triple_loop() {
        let (m, k, r, n) = (3, 37, 4, 5);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let a: Vec<f32> = (0..r * k).map(|i| ((i * 5 % 13) as f32 - 6.0) / 7.0).collect();
        let b: Vec<f32> = (0..n * r).map(|i| ((i * 3 % 7) as f32 - 3.0) / 2.0).collect();
        let mut u = vec![f32::NAN; m * r];
        lora_down(&x, &a, k, r, &mut u).unwrap();
        let mut y: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
        let y0 = y.clone();
        lora_up_add(&u, &b, r, n, 0.5, &mut y).unwrap();
        for i in 0..m {
            for j in 0..n {
                let mut expect = 0.0f64;
                for t in 0..r {
                    let ui: f64 = (0..k).map(|c| x[i * k + c] as f64 * a[t * k + c] as f64).sum();
                    expect += ui * b[j * r + t] as f64;
                }
                let expect = y0[i * n + j] as f64 + 0.5 * expect;
                assert!((y[i * n + j] as f64 - expect).abs() < 1e-3, "({i},{j})");
            }
        }
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let mut u = vec![0.0f32; 4];
        assert!(lora_down(&[1.0f32; 6], &[1.0f32; 5], 3, 2, &mut u).is_err());
        assert!(lora_down(&[1.0f32; 7], &[1.0f32; 6], 3, 2, &mut u).is_err());
    }
}
