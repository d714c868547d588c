use super::*;
use crate::codebook::QuantType;
use crate::quantize::{dequantize_4bit, quantize_4bit};
use crate::testutil::Rng;

/// The widest set, where it has the bf16 GEMM (else the CPU cannot run these tests).
fn gemm_isa() -> Option<Isa> {
    simd::available().into_iter().rev().find(|&isa| available(isa))
}

struct Case {
    packed: Vec<u8>,
    absmax: Vec<f32>,
    /// The weight dequantized to bf16 by the scalar definition.
    rounded: Vec<bf16>,
    x: Vec<bf16>,
    n: usize,
    k: usize,
    blocksize: usize,
    qt: QuantType,
    /// `x @ W` (x has `n` columns) instead of `x @ W.T`.
    transposed: bool,
    /// The low-rank term's `u`, factor, rank and scale (rank 0: none).
    u: Vec<bf16>,
    factor: Vec<bf16>,
    rank: usize,
    scale: f32,
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn new(
        rng: &mut Rng,
        m: usize,
        n: usize,
        k: usize,
        blocksize: usize,
        qt: QuantType,
        transposed: bool,
        rank: usize,
    ) -> Self {
        let values = rng.floats(n * k, 1.0);
        let mut packed = vec![0u8; (n * k).div_ceil(2)];
        let mut absmax = vec![0.0f32; (n * k).div_ceil(blocksize)];
        quantize_4bit(&values, blocksize, qt, &mut packed, &mut absmax).unwrap();
        let mut rounded = vec![bf16::ZERO; n * k];
        let weight = Packed4bit::new(&packed, &absmax, n * k, blocksize, qt).unwrap();
        dequantize_4bit(Isa::Scalar, &weight, 0, &mut rounded).unwrap();
        let depth = if transposed { n } else { k };
        let mut bf16s = |count: usize, scale: f32| rng.floats(count, scale).into_iter().map(bf16::from_f32).collect();
        let x = bf16s(m * depth, 2.0);
        let (u, factor) = (bf16s(m * rank, 1.0), bf16s(rank * if transposed { k } else { n }, 0.5));
        Case { packed, absmax, rounded, x, n, k, blocksize, qt, transposed, u, factor, rank, scale: 0.75 }
    }

    fn weight(&self) -> Packed4bit<'_> {
        Packed4bit::new(&self.packed, &self.absmax, self.n * self.k, self.blocksize, self.qt).unwrap()
    }

    fn multiply(&self, isa: Isa, y: &mut [bf16]) -> Result<(), Error> {
        let term = LowRank { u: &self.u, factor: &self.factor, rank: self.rank, scale: self.scale };
        let term = (self.rank > 0).then_some(&term);
        matmul_4bit_bf16(isa, &self.x, &self.weight(), self.n, self.k, self.transposed, term, y)
    }

    /// The weight as the product reads it: row `j` is what output column `j` sums over.
    fn operand_rows(&self) -> Vec<Vec<bf16>> {
        let (n, k) = (self.n, self.k);
        if self.transposed {
            (0..k).map(|j| (0..n).map(|r| self.rounded[r * k + j]).collect()).collect()
        } else {
            self.rounded.chunks(k).map(<[bf16]>::to_vec).collect()
        }
    }

    /// The low-rank term's `(exact, magnitude)` in output `(i, j)`.
    fn low_rank_term(&self, i: usize, j: usize) -> (f64, f64) {
        let columns = self.factor.len() / self.rank.max(1);
        let (mut exact, mut magnitude) = (0.0, 0.0);
        for d in 0..self.rank {
            let f = if self.transposed { self.factor[d * columns + j] } else { self.factor[j * self.rank + d] };
            let term = f64::from(self.scale) * self.u[i * self.rank + d].to_f64() * f.to_f64();
            exact += term;
            magnitude += term.abs();
        }
        (exact, magnitude)
    }

    /// Each output against the f64 sum over the rounded weight (and the low-rank term):
    /// within the bf16 rounding of the result (half a unit in its last place) and fp32
    /// summation's error.
    fn check(&self, y: &[bf16], what: &str) {
        let w = self.operand_rows();
        let (depth, columns) = (w[0].len(), w.len());
        for (i, row) in self.x.chunks(depth).enumerate() {
            for (j, w) in w.iter().enumerate() {
                let (low_rank, low_rank_magnitude) = self.low_rank_term(i, j);
                let exact: f64 = row.iter().zip(w).map(|(a, b)| a.to_f64() * b.to_f64()).sum::<f64>() + low_rank;
                let magnitude: f64 =
                    row.iter().zip(w).map(|(a, b)| (a.to_f64() * b.to_f64()).abs()).sum::<f64>() + low_rank_magnitude;
                let got = y[i * columns + j].to_f64();
                let bound = exact.abs() / 256.0 + magnitude * 1e-6;
                assert!((got - exact).abs() <= bound, "{what}: y[{i}, {j}] = {got}, expected {exact} (bound {bound})");
            }
        }
    }
}

/// Each (m, n, k, blocksize) in both codes, with a low-rank term of `rank` (0: none), into a
/// poisoned output, against the f64 product.
fn multiply_and_check(seed: u64, shapes: &[(usize, usize, usize, usize)], transposed: bool, rank: usize) {
    let Some(isa) = gemm_isa() else { return };
    let mut rng = Rng::new(seed);
    for &(m, n, k, blocksize) in shapes {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let case = Case::new(&mut rng, m, n, k, blocksize, qt, transposed, rank);
            let mut y = vec![bf16::NAN; m * if transposed { k } else { n }];
            case.multiply(isa, &mut y).unwrap();
            let what = format!("{qt:?} transposed={transposed} rank={rank} m={m} n={n} k={k} blocksize={blocksize}");
            case.check(&y, &what);
        }
    }
}

#[test]
fn the_bf16_gemm_matches_the_f64_product_of_the_rounded_weight() {
    // (m, n, k, blocksize): one row and one column; ragged panels of columns and rows
    // (n % 64, m % 6); rows that straddle blocks and a last run of pairs short of 16; two
    // panel depths (k > PANEL_DEPTH); two passes over the weight (m > PASS_MAX_ROWS).
    let shapes =
        [(1, 1, 2, 64), (7, 70, 128, 64), (13, 130, 200, 64), (5, 17, 98, 32), (6, 64, 4160, 128), (1100, 65, 64, 64)];
    multiply_and_check(71, &shapes, false, 0);
}

#[test]
fn the_low_rank_term_is_added_before_the_rounding() {
    // Ranks of one pair and of LoRA's usual 16; a ragged last panel, ragged rows, two panel
    // depths (the term is in the first one's sums), two passes (u's rows follow the pass).
    let shapes = [(7, 70, 128, 64), (6, 64, 4160, 128), (1100, 65, 64, 64)];
    let transposed = [(7, 70, 160, 64), (6, 4160, 64, 128), (1100, 64, 96, 64)];
    for rank in [2, 16] {
        multiply_and_check(75, &shapes, false, rank);
        multiply_and_check(76, &transposed, true, rank);
    }
}

#[test]
fn the_transposed_bf16_gemm_matches_the_f64_product_of_the_rounded_weight() {
    // (m, n, k, blocksize): one pair of weight rows; a last panel of 32 columns (k % 64) and
    // ragged rows (m % 6); k % 32 != 0 (decoded span by span, ragged last panel, rows that
    // straddle blocks); two panel depths (n > PANEL_DEPTH); two passes (m > PASS_MAX_ROWS).
    let shapes =
        [(1, 2, 32, 64), (7, 70, 160, 64), (13, 130, 200, 64), (5, 18, 98, 32), (6, 4160, 64, 128), (1100, 64, 96, 64)];
    multiply_and_check(74, &shapes, true, 0);
}

#[test]
fn the_panel_layout_is_the_transpose_of_the_rows_in_pairs() {
    let Some(_) = gemm_isa() else { return };
    let mut rng = Rng::new(72);
    for pairs in [1, 16, 37] {
        let data: Vec<Vec<u32>> = (0..16).map(|_| (0..pairs).map(|_| rng.next_u64() as u32).collect()).collect();
        let rows: [&[u32]; 16] = std::array::from_fn(|r| data[r].as_slice());
        let mut panel = vec![u32::MAX; pairs * PANEL_COLUMNS];
        // SAFETY: the CPU has AVX-512 (gemm_isa); the panel holds pairs * PANEL_COLUMNS values.
        unsafe { lay_out_16_rows(&rows, pairs, panel.as_mut_ptr()) };
        for p in 0..pairs {
            for r in 0..16 {
                assert_eq!(panel[p * PANEL_COLUMNS + r], data[r][p], "pairs={pairs} p={p} r={r}");
            }
            assert!(panel[p * PANEL_COLUMNS + 16..(p + 1) * PANEL_COLUMNS].iter().all(|&v| v == u32::MAX));
        }
    }
}

#[test]
fn the_bf16_gemm_refuses_what_it_cannot_multiply() {
    let mut rng = Rng::new(73);
    let case = Case::new(&mut rng, 2, 3, 64, 64, QuantType::Nf4, false, 0);
    let mut y = vec![bf16::ZERO; 6];
    let err = case.multiply(Isa::Scalar, &mut y).unwrap_err();
    assert!(err.to_string().contains("AVX512-BF16"), "{err}");
    let Some(isa) = gemm_isa() else { return };
    let weight = case.weight();
    let err = matmul_4bit_bf16(isa, &case.x, &weight, 3, 64, false, None, &mut y[..5]).unwrap_err();
    assert!(err.to_string().contains("y holds 5"), "{err}");
    let err = matmul_4bit_bf16(isa, &case.x[..127], &weight, 3, 64, false, None, &mut y).unwrap_err();
    assert!(err.to_string().contains("not a whole number of rows"), "{err}");
    let err = matmul_4bit_bf16(isa, &case.x, &weight, 6, 32, false, None, &mut y).unwrap_err();
    assert!(err.to_string().contains("y holds 6"), "{err}");
    let odd = Case::new(&mut rng, 1, 3, 7, 64, QuantType::Nf4, false, 0);
    let mut y = vec![bf16::ZERO; 3];
    let err = odd.multiply(isa, &mut y).unwrap_err();
    assert!(err.to_string().contains("even number of columns"), "{err}");
    // x @ W sums over the weight's rows: an odd count of them, and x and y of the wrong width.
    let odd = Case::new(&mut rng, 1, 3, 64, 64, QuantType::Nf4, true, 0);
    let mut y = vec![bf16::ZERO; 64];
    let err = odd.multiply(isa, &mut y).unwrap_err();
    assert!(err.to_string().contains("even number of weight rows"), "{err}");
    let even = Case::new(&mut rng, 2, 4, 64, 64, QuantType::Nf4, true, 0);
    let err = matmul_4bit_bf16(isa, &even.x[..6], &even.weight(), 4, 64, true, None, &mut y).unwrap_err();
    assert!(err.to_string().contains("not a whole number of rows"), "{err}");
    let err = matmul_4bit_bf16(isa, &even.x, &even.weight(), 4, 64, true, None, &mut y).unwrap_err();
    assert!(err.to_string().contains("expected 2 x 64"), "{err}");
    // The low-rank term: an odd rank, u and the factor of the wrong size.
    let mut y = vec![bf16::ZERO; 6];
    let (u, factor) = (vec![bf16::ONE; 4], vec![bf16::ONE; 6]);
    let term = |u, factor, rank| LowRank { u, factor, rank, scale: 1.0 };
    for (term, message) in [
        (term(&u[..3], &factor[..3], 1), "even rank, got 1"),
        (term(&u[..3], &factor, 2), "u holds 3 values, expected 2 x 2"),
        (term(&u, &factor[..5], 2), "factor holds 5 values, expected 3 x 2"),
    ] {
        let err = matmul_4bit_bf16(isa, &case.x, &weight, 3, 64, false, Some(&term), &mut y).unwrap_err();
        assert!(err.to_string().contains(message), "{err}");
    }
}
