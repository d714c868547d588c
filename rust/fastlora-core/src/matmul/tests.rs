use super::*;
use crate::codebook::QuantType;
use crate::quantize::{dequantize_4bit, quantize_4bit};
use crate::simd::available;
use crate::testutil::{assert_close, Rng};
use half::bf16;

struct Fixture {
    packed: Vec<u8>,
    absmax: Vec<f32>,
    dense: Vec<f32>,
    n: usize,
    k: usize,
    blocksize: usize,
    qt: QuantType,
}

impl Fixture {
    fn new(rng: &mut Rng, n: usize, k: usize, blocksize: usize, qt: QuantType) -> Self {
        let values = rng.floats(n * k, 1.0);
        let mut packed = vec![0u8; (n * k).div_ceil(2)];
        let mut absmax = vec![0.0f32; (n * k).div_ceil(blocksize)];
        quantize_4bit(&values, blocksize, qt, &mut packed, &mut absmax).unwrap();
        let mut dense = vec![0.0f32; n * k];
        let weight = Packed4bit::new(&packed, &absmax, n * k, blocksize, qt).unwrap();
        dequantize_4bit(Isa::Scalar, &weight, 0, &mut dense).unwrap();
        Fixture { packed, absmax, dense, n, k, blocksize, qt }
    }

    fn weight(&self) -> Packed4bit<'_> {
        Packed4bit::new(&self.packed, &self.absmax, self.n * self.k, self.blocksize, self.qt).unwrap()
    }
}

fn dense_matmul(a: &[f32], b: &[f32], m: usize, inner: usize, cols: usize, b_transposed: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; m * cols];
    for i in 0..m {
        for j in 0..cols {
            let mut s = 0.0f64;
            for t in 0..inner {
                let bv = if b_transposed { b[j * inner + t] } else { b[t * cols + j] };
                s += a[i * inner + t] as f64 * bv as f64;
            }
            out[i * cols + j] = s as f32;
        }
    }
    out
}

const SHAPES: &[(usize, usize, usize, usize)] = &[
    // (m, n, k, blocksize): aligned rows, then rows that straddle blocks and bytes.
    (1, 5, 64, 32),
    (3, 7, 128, 64),
    (4, 9, 256, 128),
    (6, 13, 64, 32),
    (9, 3, 4096, 4096),
    (2, 5, 33, 32),
    (5, 7, 70, 64),
    (1, 1, 1, 32),
    // More rows than the fused kernels are meant for: still right, row group by row group.
    (17, 9, 128, 64),
    (40, 33, 130, 32),
    (20, 3, 7, 32),
];

#[test]
fn forward_matches_dense_product_of_the_dequantized_weight() {
    let mut rng = Rng::new(20);
    for &(m, n, k, blocksize) in SHAPES {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let fx = Fixture::new(&mut rng, n, k, blocksize, qt);
            let x = rng.floats(m * k, 1.0);
            let expected = dense_matmul(&x, &fx.dense, m, k, n, true);
            for isa in available() {
                let mut y = vec![f32::NAN; m * n];
                matmul_4bit(isa, &x, &fx.weight(), n, k, &mut y).unwrap();
                assert_close(&y, &expected, 1e-4, 1e-4 * k as f32, &format!("{} {m}x{n}x{k}", isa.name()));
            }
        }
    }
}

#[test]
fn addends_match_the_dense_adapter_and_bias() {
    let mut rng = Rng::new(23);
    for &(m, n, k, blocksize) in SHAPES {
        for r in [1usize, 16, 17] {
            let fx = Fixture::new(&mut rng, n, k, blocksize, QuantType::Nf4);
            let (x, a, b, bias) =
                (rng.floats(m * k, 1.0), rng.floats(r * k, 1.0), rng.floats(n * r, 1.0), rng.floats(n, 1.0));
            let base = dense_matmul(&x, &fx.dense, m, k, n, true);
            let u = dense_matmul(&x, &a, m, k, r, true);
            let up = dense_matmul(&u, &b, m, r, n, true);
            for with_bias in [false, true] {
                let expected: Vec<f32> =
                    (0..m * n).map(|i| base[i] + 0.75 * up[i] + if with_bias { bias[i % n] } else { 0.0 }).collect();
                let addends = Addends {
                    lora: Some(LoraTerm { a: &a, b: &b, r, scale: 0.75 }),
                    bias: with_bias.then_some(bias.as_slice()),
                };
                for isa in available() {
                    let mut y = vec![f32::NAN; m * n];
                    matmul_4bit_plus(isa, &x, &fx.weight(), n, k, &addends, &mut y).unwrap();
                    let what = format!("{} {m}x{n}x{k} r={r} bias={with_bias}", isa.name());
                    assert_close(&y, &expected, 1e-4, 1e-4 * (k * r) as f32, &what);
                }
            }
        }
    }
}

#[test]
fn a_bias_alone_is_added_and_bf16_is_rounded_once() {
    let mut rng = Rng::new(24);
    let (m, n, k) = (3, 10, 128);
    let fx = Fixture::new(&mut rng, n, k, 64, QuantType::Fp4);
    let x: Vec<bf16> = rng.floats(m * k, 1.0).into_iter().map(bf16::from_f32).collect();
    let bias: Vec<bf16> = rng.floats(n, 1.0).into_iter().map(bf16::from_f32).collect();
    let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let base = dense_matmul(&x32, &fx.dense, m, k, n, true);
    for isa in available() {
        let mut y = vec![bf16::NAN; m * n];
        let addends = Addends { lora: None, bias: Some(bias.as_slice()) };
        matmul_4bit_plus(isa, &x, &fx.weight(), n, k, &addends, &mut y).unwrap();
        for (i, v) in y.iter().enumerate() {
            let sum = base[i] + bias[i % n].to_f32();
            // One rounding of an fp32 sum that is itself within fp32 error of the exact one.
            assert!((v.to_f32() - sum).abs() <= sum.abs() / 256.0 + 1e-4, "{} at {i}: {v} vs {sum}", isa.name());
        }
    }
}

#[test]
fn addends_of_the_wrong_length_are_errors() {
    let mut rng = Rng::new(25);
    let fx = Fixture::new(&mut rng, 4, 64, 64, QuantType::Nf4);
    let x = rng.floats(64, 1.0);
    let mut y = vec![0.0f32; 4];
    let (a, b, bias) = (vec![1.0f32; 2 * 64], vec![1.0f32; 4 * 2], vec![1.0f32; 3]);
    for (lora, bias) in [
        (Some(LoraTerm { a: &a[1..], b: &b[..], r: 2, scale: 1.0 }), None),
        (Some(LoraTerm { a: &a[..], b: &b[1..], r: 2, scale: 1.0 }), None),
        (Some(LoraTerm { a: &a[..0], b: &b[..0], r: 0, scale: 1.0 }), None),
        (None, Some(&bias[..])),
    ] {
        let addends = Addends { lora, bias };
        assert!(matmul_4bit_plus(Isa::Scalar, &x, &fx.weight(), 4, 64, &addends, &mut y).is_err());
    }
}

#[test]
fn backward_matches_dense_product_of_the_dequantized_weight() {
    let mut rng = Rng::new(21);
    for &(m, n, k, blocksize) in SHAPES.iter().chain(&[(3usize, 4usize, 1536usize, 512usize)]) {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let fx = Fixture::new(&mut rng, n, k, blocksize, qt);
            let dy = rng.floats(m * n, 1.0);
            let expected = dense_matmul(&dy, &fx.dense, m, n, k, false);
            for isa in available() {
                let mut dx = vec![f32::NAN; m * k];
                matmul_4bit_t(isa, &dy, &fx.weight(), n, k, &mut dx).unwrap();
                assert_close(&dx, &expected, 1e-4, 1e-4 * n as f32, &format!("{} {m}x{n}x{k}", isa.name()));
            }
        }
    }
}

#[test]
fn bf16_activations_compute_in_fp32_and_round_once() {
    let mut rng = Rng::new(22);
    let (m, n, k) = (2, 6, 128);
    let fx = Fixture::new(&mut rng, n, k, 64, QuantType::Nf4);
    let x: Vec<bf16> = rng.floats(m * k, 1.0).into_iter().map(bf16::from_f32).collect();
    let x32: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let expected = dense_matmul(&x32, &fx.dense, m, k, n, true);
    let mut y = vec![bf16::NAN; m * n];
    matmul_4bit(crate::simd::active(), &x, &fx.weight(), n, k, &mut y).unwrap();
    let y32: Vec<f32> = y.iter().map(|v| v.to_f32()).collect();
    assert_close(&y32, &expected, 1e-2, 1e-2, "bf16");
}

#[test]
fn mismatched_shapes_are_errors() {
    let mut rng = Rng::new(23);
    let fx = Fixture::new(&mut rng, 4, 64, 64, QuantType::Nf4);
    let w = fx.weight();
    let mut y = vec![0.0f32; 8];
    assert!(matmul_4bit(Isa::Scalar, &[0.0f32; 128], &w, 4, 63, &mut y).is_err());
    assert!(matmul_4bit(Isa::Scalar, &[0.0f32; 127], &w, 4, 64, &mut y).is_err());
    assert!(matmul_4bit(Isa::Scalar, &[0.0f32; 128], &w, 4, 64, &mut y[..7]).is_err());
    assert!(matmul_4bit_t(Isa::Scalar, &[0.0f32; 8], &w, 4, 64, &mut vec![0.0f32; 127]).is_err());
}

#[test]
fn every_team_gives_the_same_bits() {
    use crate::parallel::{install, Serial, Team};
    let mut rng = Rng::new(77);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for &(m, n, k, blocksize) in &[(1, 300, 256, 64), (6, 130, 200, 64), (20, 97, 512, 128)] {
        let f = Fixture::new(&mut rng, n, k, blocksize, QuantType::Nf4);
        let x = rng.floats(m * k, 1.0);
        let dy = rng.floats(m * n, 1.0);
        let run = |team: &dyn Team| {
            install(team, || {
                let (mut y, mut dx, mut dense) = (vec![f32::NAN; m * n], vec![f32::NAN; m * k], vec![f32::NAN; n * k]);
                matmul_4bit(Isa::Scalar, &x, &f.weight(), n, k, &mut y).unwrap();
                matmul_4bit_t(Isa::Scalar, &dy, &f.weight(), n, k, &mut dx).unwrap();
                dequantize_4bit(Isa::Scalar, &f.weight(), 0, &mut dense).unwrap();
                let (mut packed, mut absmax) = (vec![0u8; f.packed.len()], vec![0.0f32; f.absmax.len()]);
                quantize_4bit(&f.dense, blocksize, f.qt, &mut packed, &mut absmax).unwrap();
                (y, dx, dense, packed, absmax)
            })
        };
        let (serial, pooled) = (run(&Serial), run(&pool));
        assert!(serial.0.iter().zip(&pooled.0).all(|(a, b)| a.to_bits() == b.to_bits()), "y {m}x{n}x{k}");
        assert!(serial.1.iter().zip(&pooled.1).all(|(a, b)| a.to_bits() == b.to_bits()), "dx {m}x{n}x{k}");
        assert!(serial.2.iter().zip(&pooled.2).all(|(a, b)| a.to_bits() == b.to_bits()), "dense");
        assert_eq!((&serial.3, &serial.4), (&pooled.3, &pooled.4));
        assert_close(&serial.2, &f.dense, 0.0, 0.0, "dense vs fixture");
    }
}
