use super::*;
use crate::codebook::{FP4_CODE, NF4_CODE};
use crate::testutil::{assert_close, Rng};

#[test]
fn every_isa_decodes_like_scalar_bit_for_bit() {
    let mut rng = Rng::new(1);
    for table in [&NF4_CODE, &FP4_CODE] {
        for len in [0usize, 1, 7, 8, 9, 31, 64, 100] {
            let bytes = rng.bytes(len);
            let mut expected = vec![f32::NAN; 2 * len];
            scalar::decode_pairs(table, &bytes, 0.37, &mut expected);
            for isa in available() {
                let mut out = vec![f32::NAN; 2 * len];
                decode_pairs(isa, table, &bytes, 0.37, &mut out);
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{} len {len}",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn every_isa_fused_dot_matches_scalar() {
    let mut rng = Rng::new(2);
    for table in [&NF4_CODE, &FP4_CODE] {
        for (block_bytes, blocks) in [(16usize, 1usize), (32, 3), (64, 2), (2048, 1)] {
            let len = block_bytes * blocks;
            let bytes = rng.bytes(len);
            let scales = rng.floats(blocks, 2.0);
            for rows in 1..=MAX_ROWS {
                let even: Vec<Vec<f32>> = (0..rows).map(|_| rng.floats(len, 1.0)).collect();
                let odd: Vec<Vec<f32>> = (0..rows).map(|_| rng.floats(len, 1.0)).collect();
                let xe: Vec<&[f32]> = even.iter().map(|v| v.as_slice()).collect();
                let xo: Vec<&[f32]> = odd.iter().map(|v| v.as_slice()).collect();
                let mut expected = vec![f32::NAN; rows];
                scalar::fused_row_dot(table, &bytes, &scales, block_bytes, &xe, &xo, &mut expected);
                for isa in available() {
                    let mut out = vec![f32::NAN; rows];
                    fused_row_dot(isa, table, &bytes, &scales, block_bytes, &xe, &xo, &mut out);
                    assert_close(&out, &expected, 1e-4, 1e-3, isa.name());
                }
            }
        }
    }
}

#[test]
fn every_isa_fused_axpy_matches_scalar() {
    let mut rng = Rng::new(3);
    for table in [&NF4_CODE, &FP4_CODE] {
        for (block_bytes, blocks) in [(16usize, 2usize), (128, 1)] {
            let len = block_bytes * blocks;
            let bytes = rng.bytes(len);
            let scales = rng.floats(blocks, 2.0);
            for rows in 1..=MAX_ROWS {
                let coef = rng.floats(rows, 1.5);
                let start: Vec<Vec<f32>> = (0..2 * rows).map(|_| rng.floats(len, 1.0)).collect();
                let run = |isa: Option<Isa>| {
                    let mut acc = start.clone();
                    let (e, o) = acc.split_at_mut(rows);
                    let mut e: Vec<&mut [f32]> = e.iter_mut().map(|v| v.as_mut_slice()).collect();
                    let mut o: Vec<&mut [f32]> = o.iter_mut().map(|v| v.as_mut_slice()).collect();
                    match isa {
                        None => scalar::fused_row_axpy(table, &bytes, &scales, block_bytes, &coef, &mut e, &mut o),
                        Some(isa) => fused_row_axpy(isa, table, &bytes, &scales, block_bytes, &coef, &mut e, &mut o),
                    }
                    acc.concat()
                };
                let expected = run(None);
                for isa in available() {
                    assert_close(&run(Some(isa)), &expected, 1e-5, 1e-5, isa.name());
                }
            }
        }
    }
}

#[test]
fn dot_matches_f64_sum() {
    let mut rng = Rng::new(4);
    for len in [0usize, 1, 8, 13, 1000] {
        let a = rng.floats(len, 1.0);
        let b = rng.floats(len, 1.0);
        let expected: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - expected).abs() < 1e-4);
    }
}
