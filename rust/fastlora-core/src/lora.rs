//! The two dense low-rank products of a LoRA adapter on CPU:
//! `u = x @ A.T` (down-projection to rank r) and `y += scale * u @ B.T` (up-projection added
//! into the base layer's output). fp32 accumulation whatever the element type.

use crate::element::Element;
use crate::error::{ensure, Error};
use crate::parallel;
use crate::simd::dot;

/// `v` as fp32: borrowed when it already is, else widened into a new buffer.
fn widen<T: Element>(v: &[T]) -> std::borrow::Cow<'_, [f32]> {
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
    ensure!(x.len() % k == 0, "x holds {} values, not a whole number of rows of {k}", x.len());
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

#[cfg(test)]
mod tests {
    use super::*;

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
