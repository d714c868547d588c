//! The LoRA term of a mixed batch on CPU, each row through its own adapter, in fp32
//! whatever the element type. (A layer's one adapter over its 4-bit weight is an addend of
//! the fused product: `matmul::Addends`.)

use crate::element::{widen, Element, Widened};
use crate::error::{ensure, Error};
use crate::parallel;
use crate::simd::{self, dot, Isa};

/// The LoRA term of a mixed batch, each row through its own adapter (many adapters over one
/// base): `y[t] = scaling[i] * (x[t] @ a[i].T) @ b[i].T` with `i = indices[t]`, and `y[t] = 0`
/// where `i` is -1. `x` is `(rows, k)`, `a` `(n, r, k)` and `b` `(n, o, r)` hold the `n`
/// adapters stacked (ranks padded to `r` with zero rows of `a`), `y` is `(rows, o)`.
/// 16-bit adapters are widened to fp32 once per call, and only those the batch uses.
#[allow(clippy::too_many_arguments)]
pub fn lora_batched<T: Element>(
    isa: Isa,
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
                *hq = dot(isa, &x_row, &a32[q * k..(q + 1) * k]);
            }
            let scale = scaling[indices[row] as usize];
            simd::dots(isa, &h, b32, &mut o_row);
            o_row.iter_mut().for_each(|v| *v *= scale);
            T::narrow_from(&o_row, out_row);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::available;

    type Dims = (usize, usize, usize);

    #[test]
    fn batched_rows_match_each_rows_own_adapter() {
        let (k, r, o, n) = (19, 3, 7, 4);
        let indices = [2i64, -1, 0, 2, 3, -1];
        let rows = indices.len();
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let a: Vec<f32> = (0..n * r * k).map(|i| ((i * 5 % 13) as f32 - 6.0) / 7.0).collect();
        let b: Vec<f32> = (0..n * o * r).map(|i| ((i * 3 % 7) as f32 - 3.0) / 2.0).collect();
        let scaling = [0.5f32, 2.0, 1.5, -1.0];
        for isa in available() {
            let mut y = vec![f32::NAN; rows * o];
            lora_batched(isa, &x, &a, &b, &indices, &scaling, k, r, o, &mut y).unwrap();
            check_batched(&y, &x, &a, &b, &indices, &scaling, (k, r, o));
        }
    }

    fn check_batched(y: &[f32], x: &[f32], a: &[f32], b: &[f32], indices: &[i64], scaling: &[f32], (k, r, o): Dims) {
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
        assert!(lora_batched(Isa::Scalar, &x, &a, &b, &[1], &[1.0], 2, 1, 2, &mut y).is_err());
        assert!(lora_batched(Isa::Scalar, &x, &a, &b, &[-2], &[1.0], 2, 1, 2, &mut y).is_err());
        assert!(lora_batched(Isa::Scalar, &x, &a, &b, &[0, 0], &[1.0], 2, 1, 2, &mut y).is_err());
    }
}
